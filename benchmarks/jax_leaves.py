"""Many small jax leaves: a load into a ``jax.eval_shape`` target against the same load into numpy.

Usage (CPU is enough; under a minute)::

    python benchmarks/jax_leaves.py [--leaves 5000] [--reps 9] [--out bench-results/jax_leaves.json]

One step of ``--leaves`` jax arrays of 16 float32 each is saved once; then the two loads alternate,
each timed ``--reps`` times after a warm-up: into the abstract tree ``jax.eval_shape`` gives (every
leaf a jax array on the default device, waited for with ``block_until_ready``) and into numpy arrays
of the same shapes. The ratio is jax's time over numpy's, the median of the per-pair ratios (a pair:
one load of each, back to back, so that a busy machine slows both alike). Target (issue 23): <= 1.5.
The difference, also given per leaf (jax's part: the two times' difference over the leaves), is
mostly jax's own per-array transfer (``jax.device_put``'s C++ path, 8-12 us an array on CPU), which a
load calls once per leaf. Each load's result is freed after its clock stops.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import numpy as np  # noqa: E402

import ckpt  # noqa: E402
import standalone  # noqa: E402


def measure(leaves: int, reps: int, root: Path) -> dict:
    """Seconds of each load (lists of ``reps``) and the median of the per-pair ratios."""
    rng = np.random.default_rng(0)
    state = {f"leaf_{i}": jax.numpy.asarray(rng.standard_normal(16).astype(np.float32)) for i in range(leaves)}
    targets = {"jax": jax.eval_shape(lambda: state), "numpy": {k: np.zeros(16, np.float32) for k in state}}
    times: dict[str, list[float]] = {"jax": [], "numpy": []}
    with ckpt.Checkpointer(root) as checkpointer:
        checkpointer.save(0, state, force=True)
        for rep in range(reps + 1):  # the first repetition is the warm-up
            for name, target in targets.items():
                start = time.perf_counter()
                loaded = jax.block_until_ready(checkpointer.load(0, abstract_state=target))
                elapsed = time.perf_counter() - start
                del loaded  # after the clock: freeing the last load's 5,000 jax arrays takes jaxlib 3-4 us each
                if rep:
                    times[name].append(elapsed)
    ratios = [j / n for j, n in zip(times["jax"], times["numpy"])]
    jax_part = [(j - n) / leaves * 1e6 for j, n in zip(times["jax"], times["numpy"])]
    return {"leaves": leaves, "load_jax_s": times["jax"], "load_numpy_s": times["numpy"],
            "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "jax_us_per_leaf": statistics.median(jax_part), "jax_us_per_leaf_range": [min(jax_part), max(jax_part)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("bench-results/jax_leaves.json"))
    args = parser.parse_args(argv)
    result = standalone.measure_into(args.out, lambda root: measure(args.leaves, args.reps, root), "ckpt-jax-leaves-",
                                     jax=jax.__version__)
    print(f"{args.leaves} jax leaves: load into eval_shape {statistics.median(result['load_jax_s']):.3f} s, "
          f"into numpy {statistics.median(result['load_numpy_s']):.3f} s; jax / numpy {result['ratio']:.2f} "
          f"(pairs {result['ratio_range'][0]:.2f}-{result['ratio_range'][1]:.2f}; target <= 1.5); jax's part "
          f"{result['jax_us_per_leaf']:.1f} us a leaf (pairs {result['jax_us_per_leaf_range'][0]:.1f}-"
          f"{result['jax_us_per_leaf_range'][1]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
