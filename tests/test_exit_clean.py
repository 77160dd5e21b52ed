"""Read-only commands exit 0, every time (issue 18.1).

`status` used to abort at interpreter exit now and then (`terminate called without an active exception`,
exit 134): Arrow's reader held a Python file object, one of Arrow's pool threads dropped it last while the
interpreter finalized, and the thread, refused the GIL, was ended through a C++ destructor. A script or an
alert that reads the exit status cannot live with one abort in twenty, so each command runs 30 times.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config

RUNS_EACH = 30

pytestmark = pytest.mark.slow


def _cli(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "safemerge_ray", *args], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


def test_read_only_commands_always_exit_zero(local_fleet, ray_local):
    config_path = local_fleet / "fleet.yaml"
    first = run_fleet(load_config(config_path), progress=False)
    raw = yaml.safe_load(config_path.read_text())
    raw["merge"] = {**(raw.get("merge") or {}), "tau": 0.3}
    config_path.write_text(yaml.safe_dump(raw))
    second = run_fleet(load_config(config_path), progress=False)
    assert first.exit_code == second.exit_code == ExitStatus.OK and first.run_id and second.run_id
    out = str(local_fleet / "merged")
    commands = {"status": ["status", out], "runs": ["runs", out], "report": ["report", out],
                "diff": ["diff", out, first.run_id, second.run_id], "verify": ["verify", out]}
    jobs = [(name, argv) for name, argv in commands.items() for _ in range(RUNS_EACH)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: (job[0], *_cli(job[1])), jobs))
    failed = [(name, code, err.strip().splitlines()[-1:]) for name, code, err in results if code != 0]
    assert failed == [], f"{len(failed)} of {len(results)} runs failed: {failed[:5]}"
    assert not any("terminate called" in err for _, _, err in results)
