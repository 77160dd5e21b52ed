"""`make demo`, as the README's first lines show it, works (with the demo written to a temp dir)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray  # it starts a local Ray of its own


def test_make_demo_as_the_readme_says(tmp_path):
    block = re.search(r"```\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (command,) = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("make demo")]
    assert command == "make demo"
    demo = tmp_path / "demo"
    proc = subprocess.run([*command.split(), f"DEMO={demo}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "8 published" in text and (demo / "merged" / "report.html").is_file()
    assert len(list((demo / "merged" / "latest").glob("*.json"))) == 8
