"""The three sizes of the suite: ``full`` (the numbers we report), ``quick`` (development, under two
minutes) and ``tiny`` (the smoke test; its numbers mean nothing)."""
from __future__ import annotations

import dataclasses

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    reps: int                        # timed repetitions of the workloads (after one warm-up)
    side_reps: int                   # repetitions in the scaling, interference and fixed-cost sections
    workloads: list[dict]            # specs for workloads.build, each with a "name" and "description"
    scaling_bytes: list[int]         # total state sizes, 4 float32 leaves each
    scaling_leaves: list[int]        # leaf counts at scaling_leaf_bytes in all
    scaling_leaf_bytes: int
    interference_bytes: int          # state saved while the compute loop runs
    lazy_steps: int                  # existing steps when opening a root
    window_s: float                  # how long a timed loop runs (declined saves; the compute loop alone)
    overhead_leaves: int             # array leaves of the state used for the fixed costs
    timeout_s: float                 # per worker call
    isolate: bool = True             # one process per system (False: one for all, faster, polluted RSS)


def _workloads(large: list[int], leaves: tuple[int, int, int], width: int, small: bool = True) -> list[dict]:
    count, lo, hi = leaves
    # From 1 GiB on, DCP sits out: five processes holding such a state each, with their systems' copies,
    # exceed a 24 GiB machine (Orbax's worker was OOM-killed).
    out = [{"name": f"large_{_size(n)}", "kind": "large", "nbytes": n, "count": 4,
            "description": f"4 float32 arrays, {_size(n)}", "without": ("dcp",) if n >= GiB else ()} for n in large]
    out.append({"name": "many_leaves", "kind": "many_leaves", "count": count, "min_bytes": lo, "max_bytes": hi,
                "description": f"{count} arrays of {_size(lo)}..{_size(hi)} + 100 scalars"})
    if small:  # issue 23's small-leaf state: the steady-state async blocking of a save of many tiny leaves
        out.append({"name": "small_leaves", "kind": "many_leaves", "count": 1000, "min_bytes": 256,
                    "max_bytes": 16384, "scalars": 0, "zero_d": 1000,
                    "description": "1000 arrays of 256B..16KiB + 1000 0-d arrays"})
    out.append({"name": "flax_adam", "kind": "flax_adam", "width": width, "depth": 8,
                "description": f"flax TrainState, 8x{width} MLP, adam"})
    out.append({"name": "lightning", "kind": "lightning", "width": width, "depth": 8,
                "description": f"Lightning checkpoint dict, 8x{width} MLP, Adam + StepLR"})
    return out


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n}B"


MODES = {
    "full": Mode("full", reps=5, side_reps=5,
                 workloads=_workloads([64 * MiB, GiB], (1000, 4096, MiB), width=1024),
                 scaling_bytes=[64 * MiB, 256 * MiB, GiB, 4 * GiB], scaling_leaves=[10, 100, 1000, 10000],
                 scaling_leaf_bytes=64 * MiB, interference_bytes=GiB, lazy_steps=2000, window_s=1.0,
                 overhead_leaves=1000, timeout_s=600),
    "quick": Mode("quick", reps=3, side_reps=3,
                  workloads=_workloads([64 * MiB], (1000, 4096, 256 * 1024), width=512),
                  scaling_bytes=[16 * MiB, 64 * MiB, 256 * MiB], scaling_leaves=[10, 100, 1000, 10000],
                  scaling_leaf_bytes=16 * MiB, interference_bytes=128 * MiB, lazy_steps=500, window_s=0.3,
                  overhead_leaves=1000, timeout_s=300),
    "tiny": Mode("tiny", reps=2, side_reps=2,
                 workloads=_workloads([MiB], (50, 1024, 16384), width=32, small=False),
                 scaling_bytes=[MiB, 4 * MiB], scaling_leaves=[10, 100],
                 scaling_leaf_bytes=MiB, interference_bytes=4 * MiB, lazy_steps=20, window_s=0.05,
                 overhead_leaves=50, timeout_s=300, isolate=False),
}
