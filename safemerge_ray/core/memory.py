"""Memory known before it is spent: a worker's peak from the plan, and the memory there is.

Scoring one module holds, above the process itself: the two model weights as stored (and the next
module's, read ahead), V in float32, every adapter's (A, B) in float32 (twice: as read, and as repaired
for the repair's rho), and `lora_rho`'s batch,
`4 N r_max (2 in + 3 out)` bytes (a_all and V^T B of width `in`; b_all, b_wide and P of width `out`);
SafeLoRA keeps each repaired layer's projected B (`4 out r`). The baseline (torch, Ray's worker) is
counted apart.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .subspace import PANEL

PROCESS_BASELINE = 600 * 2**20  # a Ray worker with torch imported, before any tensor (RSS, measured)
# The terms above, measured against a process's peak RSS (tests/test_limits.py), leave about 10% to
# temporaries and the allocator (the float32 copy while V is taken, GEMM outputs before reshapes).
OVERHEAD = 1.2
BATCH_MIN = 64 * 2**20  # the batch cap on small modules, whose quarter would be a handful of adapters


@dataclass(frozen=True)
class ModuleCost:
    module: str
    out_features: int
    in_features: int
    nbytes: int  # both model weights as stored
    ranks: tuple[int, ...]  # one per adapter scored against this module
    projected: int = 0  # adapters whose repaired layer keeps a projected B (SafeLoRA)

    @property
    def fixed(self) -> int:
        """What scoring the module holds whatever the adapters: this module's weight pair and the next
        one's being read, and V in float32."""
        return 2 * self.nbytes + 4 * self.out_features * self.in_features

    def per_adapter(self, rank: int) -> int:
        """What each adapter of rank `rank` adds while its chunk is scored: its factors as read and as
        repaired, its share of the batched GEMM, and (SafeLoRA) its projected B."""
        out, inp = self.out_features, self.in_features
        projected = 4 * out * rank if self.projected else 0
        return 2 * 4 * rank * (inp + out) + 4 * rank * (2 * inp + 3 * out) + projected

    @property
    def peak(self) -> int:
        """Bytes above the process baseline with no budget: the module and its largest batch (per rank, up
        to the batch cap)."""
        batch = max((self.per_adapter(r) * min(n, self.chunk(r, None)) for r, n in Counter(self.ranks).items()),
                    default=0)
        return int(OVERHEAD * (self.fixed + batch))

    @property
    def least(self) -> int:
        """Bytes above the process baseline with one adapter (the largest rank) at a time: below this,
        the module cannot be scored at all."""
        return int(OVERHEAD * (self.fixed + self.per_adapter(max(self.ranks, default=0))))

    @property
    def batch_cap(self) -> int:
        """Bytes one batch of adapters may take, even with memory to spare: a quarter of what the module
        holds anyway (at least BATCH_MIN). The GEMMs are as efficient at that width (on an 11008 x 4096
        module, 29 rank-16 adapters, which `chunk` rounds down to whole panels: 24, 384 columns), and a
        worker's peak then stays flat in the fleet's size."""
        return max(self.fixed // 4, BATCH_MIN)

    def chunk(self, rank: int, budget: int | None) -> int:
        """How many adapters of `rank` to score at once: within the batch cap and under `budget` bytes."""
        room = self.batch_cap if budget is None else min(self.batch_cap, int(budget / OVERHEAD) - self.fixed)
        n = max(1, room // max(1, self.per_adapter(rank)))
        per_panel = PANEL // rank if rank and PANEL % rank == 0 else 0
        # Whole projection panels: a chunk of 29 rank-16 adapters would zero-pad 464 columns to 512.
        return n - n % per_panel if per_panel and n > per_panel else n


def check_fits(cost: ModuleCost, have: int, where: str) -> None:
    """Raise, naming the module and both numbers, when even one adapter at a time needs more than `have`."""
    from ..errors import EnvironmentFailure

    if cost.least > have:
        raise EnvironmentFailure(
            f"not enough memory: scoring module {cost.module} (rank up to {max(cost.ranks)}, {fmt(cost.nbytes)} of "
            f"model weights) needs about {fmt(cost.least)} beyond the process itself even one adapter at a time, "
            f"but {where}; give it more memory (larger nodes, ray.memory_per_worker)")


def fmt(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{max(n, 0) / 2**10:.0f} KiB"


def available_memory() -> int:
    """Memory this process may still take: the smaller of the machine's available memory and what its
    cgroup (a container's limit) leaves."""
    free = _meminfo_available()
    limit = _cgroup_left()
    return min(free, limit) if limit is not None else free


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_left() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # v1
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max" or int(raw) >= 2**60:  # no limit
                return None
            return max(0, int(raw) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None
