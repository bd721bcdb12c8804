"""A sync save of jax arrays sharded over several CPU devices: its peak extra memory and its time,
against the same save of the arrays as numpy.

Usage (CPU is enough; under a minute)::

    python benchmarks/sharded_save.py [--mib 256] [--reps 5] [--out bench-results/sharded_save.json]

Eight float32 arrays of ``--mib`` in all, each sharded over a (4, 2) mesh of 8 CPU devices (both
axes), are saved with ``Checkpointer.save`` ``--reps`` times after a warm-up, alternating with the
same save of their numpy copies (one buffer each in host memory, which a save writes from without a
copy), each save of new arrays (``x + 1``, as a training step makes them). Then one more save of each
measures its peak RSS increase (``memory.py``). Targets (SPEC):
the sync save's extra memory <= 0.1x the state; its time, the ratio of the two saves' medians, near 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax  # noqa: E402
import numpy as np  # noqa: E402

import ckpt  # noqa: E402
import memory  # noqa: E402


def measure(mib: int, reps: int, root: Path) -> dict:
    """Seconds of each save (lists of ``reps``), each kind's peak RSS increase, and the ratios."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    rows = max(8, (mib << 20) // 8 // (2048 * 4) // 8 * 8)
    host = {f"w{i}": np.random.default_rng(i).standard_normal((rows, 2048), np.float32) for i in range(8)}
    states = {"sharded": jax.block_until_ready({k: jax.device_put(v, sharding) for k, v in host.items()}),
              "numpy": host}
    nbytes = sum(v.nbytes for v in host.values())
    times: dict[str, list[float]] = {"sharded": [], "numpy": []}
    peaks: dict[str, int] = {}
    with ckpt.Checkpointer(root) as checkpointer:
        step = 0
        for rep in range(reps + 2):  # a warm-up, the timed repetitions, the memory pass
            for name in states:
                # new arrays, as a training step makes (a jax array keeps the host copy a gather made)
                state = states[name] = {k: v + 1 for k, v in states[name].items()}
                jax.block_until_ready(state)
                if rep == reps + 1:
                    base = memory.reset_peak()
                    checkpointer.save(step, state, force=True)
                    peaks[name] = memory.peak_increase(base)
                else:
                    start = time.perf_counter()
                    checkpointer.save(step, state, force=True)
                    if rep:
                        times[name].append(time.perf_counter() - start)
                step += 1
    return {"state_bytes": nbytes, "save_sharded_s": times["sharded"], "save_numpy_s": times["numpy"],
            "time_ratio": statistics.median(times["sharded"]) / statistics.median(times["numpy"]),
            "peak_bytes": peaks, "peak_ratio": {name: peak / nbytes for name, peak in peaks.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results/sharded_save.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckpt-sharded-save-") as scratch:
        result = measure(args.mib, args.reps, Path(scratch) / "root")
    result["environment"] = {"jax": jax.__version__, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"sync save of {result['state_bytes'] >> 20} MiB over 8 CPU devices: "
          f"{statistics.median(result['save_sharded_s']):.3f} s, as numpy {statistics.median(result['save_numpy_s']):.3f} s "
          f"(sharded / numpy {result['time_ratio']:.2f}); peak extra memory {result['peak_ratio']['sharded']:.3f}x the "
          f"state (as numpy {result['peak_ratio']['numpy']:.3f}x; target <= 0.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
