"""A sync save of jax arrays sharded over several CPU devices: its peak extra memory and its time,
against the same save of the arrays as numpy.

Usage (CPU is enough; under a minute)::

    python benchmarks/sharded_save.py [--mib 256] [--reps 5] [--out bench-results/sharded_save.json]

Eight float32 arrays of ``--mib`` in all, each sharded over a (4, 2) mesh of 8 CPU devices (both
axes), are saved with ``Checkpointer.save`` and then with ``save_async`` (its blocking time, in the
steady state of a reused layout and staging buffers) ``--reps`` times after a warm-up, alternating
with the same saves of their numpy copies (one buffer each in host memory), each save of new arrays
(``x + 1``, as a training step makes them). Then one more round measures each one's peak RSS increase
(``memory.py``). Targets (SPEC): a sync save's extra memory <= 0.1x the state; the times, sharded
over numpy (the ratio of the medians), near 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax  # noqa: E402
import numpy as np  # noqa: E402

import ckpt  # noqa: E402
import memory  # noqa: E402
import standalone  # noqa: E402


def measure(mib: int, reps: int, root: Path) -> dict:
    """Seconds of each sync save and each async save's blocking (lists of ``reps``), each one's peak
    RSS increase, and the ratios, sharded over numpy."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    rows = max(8, (mib << 20) // 8 // (2048 * 4) // 8 * 8)
    host = {f"w{i}": np.random.default_rng(i).standard_normal((rows, 2048), np.float32) for i in range(8)}
    states = {"sharded": jax.block_until_ready({k: jax.device_put(v, sharding) for k, v in host.items()}),
              "numpy": host}
    nbytes = sum(v.nbytes for v in host.values())
    times: dict[str, list[float]] = {f"{op}_{name}": [] for op in ("save", "blocking") for name in states}
    peaks: dict[str, float] = {}
    checkpointers = {(op, name): ckpt.Checkpointer(root / f"{op}_{name}")
                     for op in ("save", "blocking") for name in states}
    step = 0
    for rep in range(reps + 2):  # a warm-up, the timed repetitions, the memory pass
        for name in states:
            for op in ("save", "blocking"):  # each on a Checkpointer of its own, as a training loop saves
                checkpointer = checkpointers[op, name]
                save = checkpointer.save if op == "save" else checkpointer.save_async
                # new arrays, as a training step makes (a jax array keeps the host copy a gather made)
                state = states[name] = jax.block_until_ready({k: v + 1 for k, v in states[name].items()})
                base = memory.reset_peak() if rep == reps + 1 else 0
                start = time.perf_counter()
                save(step, state, force=True)
                elapsed = time.perf_counter() - start
                if rep == reps + 1:
                    peaks[f"{op}_{name}"] = memory.peak_increase(base) / nbytes
                elif rep:
                    times[f"{op}_{name}"].append(elapsed)
                checkpointer.wait()
                step += 1
    for checkpointer in checkpointers.values():
        checkpointer.close()
    median = {key: statistics.median(values) for key, values in times.items()}
    return {"state_bytes": nbytes, "seconds": times, "peak_ratio": peaks,
            "time_ratio": {op: median[f"{op}_sharded"] / median[f"{op}_numpy"] for op in ("save", "blocking")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results/sharded_save.json"))
    args = parser.parse_args(argv)
    result = standalone.measure_into(args.out, lambda root: measure(args.mib, args.reps, root), "ckpt-sharded-save-",
                                     jax=jax.__version__)
    seconds = {key: statistics.median(values) for key, values in result["seconds"].items()}
    peaks, ratio = result["peak_ratio"], result["time_ratio"]
    print(f"{result['state_bytes'] >> 20} MiB over 8 CPU devices: sync save "
          f"{seconds['save_sharded']:.3f} s, as numpy {seconds['save_numpy']:.3f} s "
          f"(sharded / numpy {ratio['save']:.2f}), peak extra "
          f"memory {peaks['save_sharded']:.3f}x the state (as numpy {peaks['save_numpy']:.3f}x; target <= 0.1x); "
          f"async blocking {seconds['blocking_sharded'] * 1e3:.0f} ms, as numpy "
          f"{seconds['blocking_numpy'] * 1e3:.0f} ms (sharded / numpy {ratio['blocking']:.2f}), "
          f"peak extra {peaks['blocking_sharded']:.3f}x (as numpy {peaks['blocking_numpy']:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
