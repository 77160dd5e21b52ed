"""`safemerge-ray report`: a self-contained page, checked in a real headless browser (Chromium)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest
from PIL import Image

from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.io import LocalDir
from safemerge_ray.store import fleet_status
from safemerge_ray.views import render

# The page reports, in its own title, whether every image decoded; the test adds this to a copy.
_CHECK = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
          "document.title = 'images ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + "
          "imgs.length; });</script>")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `make test` installs it (Debian package chromium)")
    return path


def _browser(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--allow-file-access-from-files", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_opens_offline_with_its_images_in_a_real_browser(local_fleet, ray_local, tmp_path, capsys):
    first = run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    out = local_fleet / "merged"
    assert main(["report", str(out)]) == ExitStatus.OK
    page_path = out / "report.html"
    assert f"report of 4 adapters, 56 layers: {out}/report.html" in capsys.readouterr().out
    page = page_path.read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens offline
    # It explains itself (issue 18.12): what rho and tau are, when and from what it was made.
    assert re.search(r'<p id="made">Made \d{4}-\d\d-\d\dT[\d:]+Z by safemerge-ray [\d.]+ from ' + re.escape(str(out)),
                     page)
    assert "is below <b>tau</b>" in page and "<b>rho</b> is" in page

    # Its data: one row per adapter, one heatmap column per layer.
    statuses, rows = fleet_status(LocalDir(out))
    _, table, modules = render(rows, "t", None)
    assert [t.adapter for t in table] == ["gsm8k", "legal", "medqa", "support"]
    assert len(modules) == 14 and len(set(modules)) == 14
    assert [m.rsplit(".", 1)[-1] for m in modules] == sorted(m.rsplit(".", 1)[-1] for m in modules)  # by type
    assert len(re.findall(r"<tr><td>", page)) == 4
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    for data in images:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.width > 300 and image.height > 150

    # In Chromium: every image decodes (the page reports it in its title) ...
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", _CHECK + "</body>"))
    dom = _browser("--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    assert "<title>images 2/2</title>" in dom.stdout, dom.stdout[:500] + dom.stderr[-2000:]
    # ... and the rendered page shows the heatmap's colours, not broken-image icons.
    shot = tmp_path / "page.png"
    _browser(f"--screenshot={shot}", "--window-size=1400,1800", "--hide-scrollbars", page_path.as_uri())
    pixels = Image.open(shot).convert("RGB")
    colourful = sum(1 for r, g, b in pixels.getdata() if max(r, g, b) - min(r, g, b) > 80)
    assert colourful > 20_000, colourful

    # One run's report goes beside the run, and gc leaves it there.
    assert main(["report", str(out), "--run", first.run_id]) == ExitStatus.OK
    assert (out / "runs" / first.run_id / "report.html").is_file()
    assert main(["gc", str(out), "--keep", "0"]) == ExitStatus.OK
    assert (out / "runs" / first.run_id / "report.html").is_file()
    assert main(["report", str(out), "--run", "nope"]) == 2
