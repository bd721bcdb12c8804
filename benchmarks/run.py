"""Runs the ckpt benchmark suite: prints tables and writes JSON.

Usage::

    python benchmarks/run.py [--quick | --tiny] [--out bench-results/results.json] [--only NAME[,NAME]]

Sections (``--only`` takes section or workload names): the workloads (ckpt against the floors,
Orbax, torch.save and torch's DCP, alternating, median of the repetitions after a warm-up), ``scaling`` (state
size and leaf count), ``interference`` (a compute loop while a save persists) and ``overheads``
(opening a root with thousands of steps, a step that does not save). Every measurement runs in a
worker process of its own system; see harness.py and worker.py.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import chart
import config
import harness
import report

SYSTEMS = ["floor", "ckpt", "orbax", "torch", "dcp"]
OPS = ["save", "async", "load"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _processes(systems: list[str], mode: config.Mode) -> dict[str, list[str]]:
    return {s: [s] for s in systems} if mode.isolate else {"all": systems}


def _measure(spec: dict, processes: dict[str, list[str]], ops: list[str], reps: int, mode: config.Mode,
             scratch: Path, *, memory_pass: bool) -> dict:
    """Warm-up, ``reps`` alternating repetitions of ``ops`` per system, then (optionally) the memory pass."""
    with harness.WorkerGroup(spec, processes, scratch, mode.timeout_s) as group:
        group.warmup(ops)
        runs = group.alternate(reps, lambda s, w, rep: w.call("rep", system=s, rep=rep, ops=ops))
        if memory_pass:
            for system, worker in group.host.items():
                runs[system].append(worker.call("rep", system=system, rep="memory", ops=ops, memory_pass=True))
        info = group.info
    return {"nbytes": info["nbytes"], "leaves": info["leaves"],
            "systems": {s: harness.summarize(r) for s, r in runs.items()}}


def run_workload(spec: dict, systems: list[str], mode: config.Mode, scratch: Path) -> dict:
    """The main table's entry for one workload: every system (but those it is ``without``) in its own
    process, alternating."""
    present = [s for s in systems if s not in spec.get("without", ())]
    return {"name": spec["name"], "description": spec["description"],
            **_measure(spec, _processes(present, mode), OPS, mode.reps, mode, scratch / spec["name"], memory_pass=True)}


def _scaling_point(spec: dict, mode: config.Mode, scratch: Path) -> dict:
    # no async save: its snapshot would add one more copy of a 4 GiB state to the process
    return _measure(spec, {"scaling": ["floor", "ckpt"]}, ["save", "save_again", "load"], mode.side_reps, mode, scratch,
                    memory_pass=False)


def run_scaling(mode: config.Mode, scratch: Path) -> dict:
    """ckpt and the floors (one process) as the state grows in bytes and in leaves."""
    by_bytes = [_scaling_point({"kind": "large", "nbytes": n, "count": 4}, mode, scratch / f"bytes-{n}")
                for n in mode.scaling_bytes]
    by_leaves = []
    for count in mode.scaling_leaves:
        size = mode.scaling_leaf_bytes // count
        spec = {"kind": "many_leaves", "count": count, "min_bytes": size, "max_bytes": size, "scalars": 0}
        by_leaves.append(_scaling_point(spec, mode, scratch / f"leaves-{count}"))
    return {"bytes": by_bytes, "leaves": by_leaves}


def run_interference(systems: list[str], mode: config.Mode, scratch: Path) -> dict:
    """Slowdown of a main-thread compute loop while each system persists a save in the background."""
    spec = {"kind": "large", "nbytes": mode.interference_bytes, "count": 4}
    savers = [s for s in systems if s != "floor"]
    with harness.WorkerGroup(spec, _processes(savers, mode), scratch, mode.timeout_s) as group:
        group.warmup(["async"])
        runs = group.alternate(mode.side_reps, lambda s, w, rep: w.call(
            "interference", system=s, rep=rep, compute_bytes=1 << 20, alone_s=mode.window_s))
        info = group.info
    return {"nbytes": info["nbytes"], "systems": {s: harness.summarize(r) for s, r in runs.items()}}


def run_overheads(systems: list[str], mode: config.Mode, scratch: Path) -> dict:
    """Opening a root with ``mode.lazy_steps`` steps, and a save the policy declines there."""
    spec = {"kind": "many_leaves", "count": mode.overhead_leaves, "min_bytes": 1024, "max_bytes": 16384}
    savers = [s for s in systems if s in ("ckpt", "orbax")]
    args = {"steps": mode.lazy_steps, "reps": mode.side_reps, "seconds": mode.window_s}
    with harness.WorkerGroup(spec, _processes(savers, mode), scratch, mode.timeout_s) as group:
        costs = {s: group.host[s].call("fixed_costs", system=s, args=args) for s in savers}
        return {"leaves": group.info["leaves"], "steps": mode.lazy_steps, "systems": costs}


def _environment(mode: config.Mode, systems: list[str]) -> dict:
    versions = {}
    for dist in ("numpy", "tensorstore", "torch", "orbax-checkpoint", "jax", "flax", "pytorch-lightning"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"mode": mode.name, "reps": mode.reps, "systems": systems, "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="smaller states (64 MiB at most in the table), under two minutes")
    size.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                      help="KiB-sized states, 2 repetitions: a smoke test, the numbers mean nothing")
    parser.add_argument("--out", type=Path, default=Path("bench-results/results.json"))
    parser.add_argument("--only", default="", help="comma-separated sections or workload names")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="where checkpoints are written (default: a new directory under the temp dir)")
    args = parser.parse_args(argv)
    mode = config.MODES[args.mode or "full"]
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    only = set(filter(None, args.only.split(",")))
    names = [spec["name"] for spec in mode.workloads] + ["scaling", "interference", "overheads"]
    if only - set(names):
        parser.error(f"--only: unknown {sorted(only - set(names))}; {mode.name} mode has {', '.join(names)}")
    wanted = lambda name: not only or name in only  # noqa: E731

    results: dict = {"environment": _environment(mode, systems), "workloads": []}
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.scratch))
    start = time.perf_counter()
    try:
        for spec in mode.workloads:
            if wanted(spec["name"]):
                _log(f"[{harness.elapsed(start)}] workload {spec['name']}")
                results["workloads"].append(run_workload(spec, systems, mode, scratch))
        if wanted("scaling") and "ckpt" in systems:
            _log(f"[{harness.elapsed(start)}] scaling")
            results["scaling"] = run_scaling(mode, scratch / "scaling")
        if wanted("interference"):
            _log(f"[{harness.elapsed(start)}] interference")
            results["interference"] = run_interference(systems, mode, scratch / "interference")
        if wanted("overheads"):
            _log(f"[{harness.elapsed(start)}] overheads")
            results["overheads"] = run_overheads(systems, mode, scratch / "overheads")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["environment"]["seconds"] = round(time.perf_counter() - start, 1)
    results["targets"] = report.targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    chart_path = args.out.with_name("chart.png")
    chart.draw(results, chart_path)
    print(report.render(results))
    print(f"\nwrote {args.out} and {chart_path} ({results['environment']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
