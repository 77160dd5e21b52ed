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


def test_make_demo_loop_as_the_readme_says(tmp_path):
    """train-safety -> fleet behind the gate -> eval, on the synthetic fleet, as `make demo-loop` runs it."""
    block = re.search(r"## Closing the loop.*?```\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (command,) = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("make demo-loop")]
    loop = tmp_path / "loop"
    proc = subprocess.run([*command.split(), f"LOOP={loop}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    manifest = (loop / "safety-trained" / "manifest.json").read_text()
    assert '"kind": "safety-adapter"' in manifest and "loss" in text
    assert "(aligned model)" in text and (loop / "eval" / "eval.parquet").is_file()
    # Whatever the gate decided, the published and held adapters add up, and each held one says why.
    published = {p.stem for p in (loop / "merged" / "latest").glob("*.json")}
    held = set(re.findall(r"^(\w+)\s+held\s", text, re.M))
    assert published | held == {"gsm8k", "legal", "medqa", "support"} and not published & held
    assert all(f"{name}" in text for name in held) and ("max_harmful_rate 0.5" in text) == bool(held)
