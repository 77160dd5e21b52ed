"""The local run lock is exclusive: processes racing `RunLock.acquire()` on one output at the same instant, on
a fresh output or over an expired lock, end with exactly one winner, every time (issue 19.1).

Each trial, 2 or 8 forked processes wait on one barrier and then all call `acquire()` at once; a winner
keeps its lock (no release) so the others must see it held. 500 trials for each case.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from safemerge_ray.io import LocalDir
from safemerge_ray.store import LOCK, LockHeld, RunLock

TRIALS = 250  # per number of processes: 500 per case


def _racer(root: str, trials: int, index: int, start, results) -> None:
    for trial in range(trials):
        start.wait(timeout=60)
        try:
            lock = RunLock(LocalDir(Path(root) / f"t{trial}"), lease_s=600).acquire()
            lock._stop.set()  # keep it held, without renewals
            won = True
        except LockHeld:
            won = False
        results.put((trial, index, won))


def _race(root: Path, processes: int, trials: int) -> dict[int, int]:
    """Winners per trial."""
    ctx = mp.get_context("fork")
    start, results = ctx.Barrier(processes), ctx.Queue()
    racers = [ctx.Process(target=_racer, args=(str(root), trials, i, start, results), daemon=True)
              for i in range(processes)]
    for p in racers:
        p.start()
    winners = {t: 0 for t in range(trials)}
    deadline = time.monotonic() + 240
    for _ in range(processes * trials):
        trial, _, won = results.get(timeout=max(1.0, deadline - time.monotonic()))
        winners[trial] += won
    for p in racers:
        p.join(timeout=30)
        if p.is_alive():  # only our own children, by their handle
            p.kill()
    return winners


def _stale_locks(root: Path, trials: int) -> None:
    for trial in range(trials):
        lock = root / f"t{trial}" / LOCK
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"owner": "dead-run", "host": "gone", "pid": 1, "acquired_at": "then",
                                    "lease_until": time.time() - 1}))


@pytest.mark.parametrize("expired", [False, True], ids=["fresh", "expired"])
@pytest.mark.parametrize("processes", [2, 8])
def test_exactly_one_process_wins_the_lock(tmp_path, processes, expired):
    if expired:
        _stale_locks(tmp_path, TRIALS)
    winners = _race(tmp_path, processes, TRIALS)
    assert sorted(set(winners.values())) == [1], {t: n for t, n in winners.items() if n != 1}
    for trial in range(TRIALS):  # the lock names the one winner, whole
        body = json.loads((tmp_path / f"t{trial}" / LOCK).read_text())
        assert body["owner"] != "dead-run" and body["lease_until"] > time.time()


def test_a_run_confirms_it_holds_the_lock_before_moving_pointers(tmp_path):
    out = LocalDir(tmp_path / "merged")
    ours = RunLock(out, lease_s=600).acquire()
    ours.confirm()
    ours._stop.set()
    path = tmp_path / "merged" / LOCK  # another run broke the lock (--break-lock) since our last renewal
    RunLock(out, lease_s=600).acquire(break_lock=True)._stop.set()
    assert json.loads(path.read_text())["owner"] != ours.owner
    with pytest.raises(LockHeld, match="taken over by another run; this run committed nothing"):
        ours.confirm()
