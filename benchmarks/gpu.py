"""The accelerator benchmark: ckpt against the floors, DCP (torch) and Orbax (jax) on one GPU.

Usage (on a machine with a CUDA GPU, torch with CUDA and/or jax with CUDA; on an H200 with
``--gib 0.5 --reps 3``, 94 s for torch and 118 s for jax before the background figures were added)::

    python benchmarks/gpu.py [--gib 1] [--reps 5] [--out bench-results/gpu.json] [--only torch,jax]

``--device cpu`` runs the same measurements on CPU arrays (no pinned memory, no GPU): the suite's
smoke test runs it that way, tiny, so that the script is known to run before a GPU is lent.

For each framework, two states live on the GPU: ``large`` (4 float32 arrays, ``--gib`` GiB in all) and
``small`` (``--leaves`` float32 arrays of 1-256 KiB plus as many 0-d arrays; 1,000 each, 129 MiB).
Measured, median of ``--reps`` after a warm-up, each system saving into a fresh directory of the same disk:

* blocking time of an async save in the steady state (the second save of the same state by one
  Checkpointer), against the floor: a non-blocking copy of every array into pinned host buffers
  allocated once, synchronized (``torch.Tensor.copy_``; for jax, every ``copy_to_host_async`` started,
  then each array copied into its pinned buffer as it lands);
* the async save until durable: waited for at once (``result()``, which switches ckpt's one-core
  background write to full speed), and for ckpt also left to the background;
* the durable save, against the disk's write floor (the same bytes, already on the host, ``tofile``
  + fsync into one file);
* the load into arrays on the GPU, against the read floor (``readinto`` pinned buffers, then one
  non-blocking copy of each to the GPU, synchronized);
* the same for DCP (``dcp.async_save``, ``dcp.save``, ``dcp.load``) on the torch states and Orbax's
  v1 Checkpointer on the jax states.

Targets (SPEC): blocking <= 1.3x the pinned-copy floor; load >= 0.8x the read floor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax and torch share the GPU
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
MiB = 1 << 20


class Setup(NamedTuple):
    """What a suite measures on: the device (``cuda`` or ``cpu``), the large state's size and the
    number of small leaves (and of 0-d ones)."""

    device: str
    gib: float
    leaves: int

    def sizes(self, kind: str, rng: np.random.Generator) -> list[tuple[int, ...]]:
        if kind == "large":
            rows = max(1, int(self.gib * (1 << 30)) // 4 // 4096)
            return [(rows, 1024)] * 4
        return [(int(n),) for n in rng.integers(256, 64 * 1024, self.leaves)] + [()] * self.leaves


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def write_floor(path: Path, hosts: list[np.ndarray]) -> None:
    with open(path, "wb", buffering=0) as f:
        for host in hosts:
            host.tofile(f)
        os.fsync(f.fileno())


def read_floor(path: Path, hosts: list[np.ndarray]) -> None:
    with open(path, "rb", buffering=0) as f:
        for host in hosts:
            view = memoryview(host.reshape(-1).view(np.uint8))
            while view:
                view = view[f.readinto(view):]


def second_save(save: Callable[[int], Any], until: str = "blocking", sync: Callable[[], None] = lambda: None) -> float:
    """The blocking time of the second of two async saves (a loop's steady state), or its time until
    durable: waited for at once (``until="durable"``: ``result()``, which lets ckpt's write go at full
    speed) or left to the background (``"background"``: ``done()`` polled); ``save(step)`` starts one
    and returns what its ``result()`` waits for."""
    save(0).result()
    sync()
    start = time.perf_counter()
    pending = save(1)
    blocking = time.perf_counter() - start
    if until == "background":
        while not pending.done():
            time.sleep(0.0005)
    pending.result()
    return blocking if until == "blocking" else time.perf_counter() - start


class Runner:
    """Times each named operation ``reps`` times after one warm-up; keeps medians and ranges."""

    def __init__(self, reps: int, scratch: Path):
        self.reps, self.scratch, self.results = reps, scratch, {}

    def run(self, name: str, op: Callable[[Path], float]) -> None:
        times = []
        for rep in range(self.reps + 1):
            root = self.scratch / f"{name.replace('/', '_')}-{rep}"
            try:
                seconds = op(root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            if rep:
                times.append(seconds)
        self.results[name] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
        print(f"  {name:52s} {self.results[name]['median'] * 1e3:9.2f} ms  ({min(times) * 1e3:.2f}-{max(times) * 1e3:.2f})",
              flush=True)


def torch_suite(runner: Runner, kind: str, setup: Setup) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    rng = np.random.default_rng(0)
    state = {f"w{i}": torch.randn(shape, device=setup.device) for i, shape in enumerate(setup.sizes(kind, rng))}
    gpu = setup.device == "cuda"
    sync = torch.cuda.synchronize if gpu else lambda: None
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=gpu) for k, v in state.items()}
    hosts = [p.numpy() for p in pinned.values()]
    reads = [torch.empty_like(p, pin_memory=gpu) for p in pinned.values()]

    def floor_copy(root: Path) -> float:
        return timed(lambda: [pinned[k].copy_(v, non_blocking=True) for k, v in state.items()], sync)

    def floor_write(root: Path) -> float:
        root.mkdir(parents=True)
        return timed(lambda: write_floor(root / "state.bin", hosts), sync)

    def floor_read(root: Path) -> float:
        root.mkdir(parents=True)
        write_floor(root / "state.bin", hosts)
        outs = [torch.empty_like(v) for v in state.values()]

        def load() -> None:
            read_floor(root / "state.bin", [r.numpy() for r in reads])
            for out, r in zip(outs, reads):
                out.copy_(r, non_blocking=True)
        return timed(load, sync)

    def ckpt_blocking(root: Path, until: str = "blocking") -> float:
        with ckpt.Checkpointer(root) as ckptr:
            return second_save(lambda step: ckptr.save_async(step, state, force=True), until)

    def ckpt_save(root: Path) -> float:
        with ckpt.Checkpointer(root) as ckptr:
            return timed(lambda: ckptr.save(0, state, force=True), sync)

    def ckpt_load(root: Path) -> float:
        with ckpt.Checkpointer(root) as ckptr:
            ckptr.save(0, state, force=True)
            abstract = {k: torch.empty_like(v) for k, v in state.items()}
            return timed(lambda: ckptr.load(0, abstract), sync)

    def dcp_blocking(root: Path, until: str = "blocking") -> float:
        return second_save(lambda step: dcp.async_save(state, checkpoint_id=root / str(step)), until, sync)

    def dcp_save(root: Path) -> float:
        return timed(lambda: dcp.save(state, checkpoint_id=root / "0"), sync)

    def dcp_load(root: Path) -> float:
        dcp.save(state, checkpoint_id=root / "0")
        target = {k: torch.empty_like(v) for k, v in state.items()}
        return timed(lambda: dcp.load(target, checkpoint_id=root / "0"), sync)

    prefix = f"torch/{kind}"  # ckpt and its floors first: a run cut short has the targets' figures
    for name, op in (("floor pinned copy", floor_copy), ("ckpt async blocking", ckpt_blocking),
                     ("floor read", floor_read), ("ckpt load", ckpt_load),
                     ("ckpt async until durable", lambda r: ckpt_blocking(r, "durable")),
                     ("ckpt async until durable, in the background", lambda r: ckpt_blocking(r, "background")),
                     ("floor write", floor_write), ("ckpt save", ckpt_save),
                     ("dcp async blocking", dcp_blocking), ("dcp load", dcp_load),
                     ("dcp async until durable", lambda r: dcp_blocking(r, "durable")), ("dcp save", dcp_save)):
        runner.run(f"{prefix}/{name}", op)


def jax_suite(runner: Runner, kind: str, setup: Setup) -> None:
    import jax
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(0)
    gpu = setup.device == "cuda"
    device = jax.devices("gpu" if gpu else "cpu")[0]
    state = {f"w{i}": jax.device_put(rng.standard_normal(shape, np.float32), device)
             for i, shape in enumerate(setup.sizes(kind, rng))}
    sync = lambda: jax.block_until_ready(state)  # noqa: E731
    import torch  # pinned host memory for the floor

    hosts = [torch.empty(v.shape, dtype=torch.float32, pin_memory=gpu).numpy() for v in state.values()]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

    def floor_copy(root: Path) -> float:
        def copy() -> None:
            for v in state.values():
                v.copy_to_host_async()
            for host, v in zip(hosts, state.values()):
                np.copyto(host, np.asarray(v))
        return timed(copy, sync)

    def ckpt_blocking(root: Path, until: str = "blocking") -> float:
        with ckpt.Checkpointer(root) as ckptr:
            return second_save(lambda step: ckptr.save_async(step, state, force=True), until)

    def ckpt_load(root: Path) -> float:
        with ckpt.Checkpointer(root) as ckptr:
            ckptr.save(0, state, force=True)
            return timed(lambda: jax.block_until_ready(ckptr.load(0, abstract)), sync)

    def floor_read(root: Path) -> float:
        root.mkdir(parents=True)
        write_floor(root / "state.bin", hosts)

        def load() -> None:
            read_floor(root / "state.bin", hosts)
            jax.block_until_ready(jax.device_put(hosts, [device] * len(hosts)))
        return timed(load, sync)

    def orbax_blocking(root: Path, until: str = "blocking") -> float:
        with ocp.v1.training.Checkpointer(root) as checkpointer:
            return second_save(lambda step: checkpointer.save_async(step, state, force=True), until)

    def orbax_load(root: Path) -> float:
        with ocp.v1.training.Checkpointer(root) as checkpointer:
            checkpointer.save(0, state, force=True)
            return timed(lambda: jax.block_until_ready(checkpointer.load(0, abstract_state=abstract)), sync)

    prefix = f"jax/{kind}"
    for name, op in (("floor pinned copy", floor_copy), ("ckpt async blocking", ckpt_blocking),
                     ("floor read", floor_read), ("ckpt load", ckpt_load),
                     ("ckpt async until durable", lambda r: ckpt_blocking(r, "durable")),
                     ("ckpt async until durable, in the background", lambda r: ckpt_blocking(r, "background")),
                     ("orbax async blocking", orbax_blocking), ("orbax load", orbax_load),
                     ("orbax async until durable", lambda r: orbax_blocking(r, "durable"))):
        runner.run(f"{prefix}/{name}", op)


def targets(results: dict) -> list[str]:
    lines = []
    for prefix in sorted({name.rsplit("/", 1)[0] for name in results}):
        get = lambda what: results.get(f"{prefix}/{what}", {}).get("median")  # noqa: E731
        if get("floor pinned copy") and get("ckpt async blocking"):
            r = get("ckpt async blocking") / get("floor pinned copy")
            lines.append(f"{prefix}: async blocking / pinned copy floor {r:.2f}x (goal <= 1.3) {'ok' if r <= 1.3 else 'MISSED'}")
        if get("floor read") and get("ckpt load"):
            r = get("floor read") / get("ckpt load")
            lines.append(f"{prefix}: load throughput / read floor {r:.2f}x (goal >= 0.8) {'ok' if r >= 0.8 else 'MISSED'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the large state")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="torch,jax")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--leaves", type=int, default=1000, help="arrays (and 0-d arrays) of the small state")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")) / "gpu.json")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-gpu-", dir=args.scratch))
    runner = Runner(args.reps, scratch)
    setup = Setup(args.device, args.gib, args.leaves)
    suites = {"torch": torch_suite, "jax": jax_suite}
    report = {"device": device_name(args.device), "gib": args.gib, "reps": args.reps, "results": runner.results,
              "errors": {}}
    start = time.perf_counter()
    try:
        for name in args.only.split(","):
            for kind in ("large", "small"):
                print(f"[{time.perf_counter() - start:.0f} s] {name} {kind}", flush=True)
                try:
                    suites[name](runner, kind, setup)
                except Exception as e:  # a missing framework or a failing peer: the rest still runs
                    report["errors"][f"{name}/{kind}"] = f"{type(e).__name__}: {e}"
                    print(f"  failed: {report['errors'][f'{name}/{kind}']}", flush=True)
                write_report(args.out, report, start)  # after each suite: a run cut short keeps what it measured
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(report["targets"]))
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


def device_name(device: str) -> str:
    """The GPU's name as torch reports it (a label only), or ``device``."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if device == "cuda" else device
    except Exception:  # noqa: BLE001 - no torch, or no CUDA in it
        return device


def write_report(out: Path, report: dict, start: float) -> None:
    report.update(targets=targets(report["results"]), seconds=round(time.perf_counter() - start, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
