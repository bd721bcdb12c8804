"""ckpt against torch's DCP (``torch.distributed.checkpoint``) on the same sharded state, 2 ranks side by side.

    python benchmarks/bench_dcp.py [--mib 256] [--small 200] [--reps 5] [--out bench-results/dcp.json]

Two gloo ranks on 127.0.0.1 (forked from this process) hold a state dict of DTensors sharded on their
first dimension: ``--mib`` MiB of large tensors in 16 MiB pieces, plus ``--small`` tensors of 4 KiB (an
optimizer's scalars and biases). Each measurement runs on both ranks at once and takes the slower
rank's time; the systems alternate, and each figure is the median of ``--reps`` runs after a warm-up:

* durable save: ckpt's ``Checkpointer.save`` (fsync'd, committed by an atomic rename, the root
  fsync'd) against ``dcp.save`` (files fsync'd by its FileSystemWriter) followed by the fsync of the
  checkpoint's directory and its parent, which DCP omits;
* load into templates: ``Checkpointer.load_checkpointables`` with DTensor templates against
  ``dcp.load`` into the same templates, in place (each rank reads its own shards in both);
* async save blocking: what ``save_async`` / ``dcp.async_save`` take on the calling thread, at steady
  state (the previous save finished; ckpt reuses its staging buffers, DCP stages anew on each call);
* time until durable: from the async call until the step is durable (``result()``; for DCP the
  future's result, then the directory fsyncs).

Prints a table and the ratios (DCP time / ckpt time: above 1, ckpt is faster) and writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from torch_state import fsync_dir

FIGURES = ("save_s", "load_s", "blocking_s", "durable_s")


def sharded_state(mesh: Any, mib: int, small: int) -> dict[str, Any]:
    """DTensors sharded on dim 0 over ``mesh``: 16 MiB float32 pieces making ``mib`` MiB, and ``small`` 4 KiB ones."""
    generator = torch.Generator().manual_seed(0)
    state = {f"large.{i}": torch.randn(1024, 4096, generator=generator) for i in range(max(1, mib // 16))}
    state.update({f"small.{i}": torch.randn(1024, generator=generator) for i in range(small)})
    return {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in state.items()}


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes on the slowest rank (both start together)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


class Ckpt:
    name = "ckpt"

    def __init__(self, root: Path, state: dict):
        self.state = state
        self.ckptr = Checkpointer(root, preservation_policy=pp.LatestN(1))
        self.step = 0
        self.response = None

    def save(self) -> None:
        self.step += 1
        self.ckptr.save(self.step, self.state, force=True)

    def load(self) -> None:
        loaded = self.ckptr.load(abstract_state=self.state)
        assert torch.equal(loaded["large.0"].to_local(), self.state["large.0"].to_local())

    def save_async(self) -> None:
        self.step += 1
        self.response = self.ckptr.save_async(self.step, self.state, force=True)

    def wait(self) -> None:
        self.response.result()

    def close(self) -> None:
        self.ckptr.close()


class Dcp:
    name = "dcp"

    def __init__(self, root: Path, state: dict):
        self.root, self.state = root, state
        self.step = 0
        self.future = None
        self.group = dist.new_group(backend="gloo")  # async_save's own collectives, off the default group

    def _dir(self) -> Path:
        return self.root / str(self.step)

    def _durable(self) -> None:
        if dist.get_rank() == 0:
            fsync_dir(self._dir())
            fsync_dir(self.root)
            previous = self.root / str(self.step - 1)  # keep the latest only, as ckpt's LatestN(1)
            shutil.rmtree(previous, ignore_errors=True)

    def save(self) -> None:
        self.step += 1
        dcp.save(self.state, checkpoint_id=self._dir())
        self._durable()

    def load(self) -> None:
        dcp.load(self.state, checkpoint_id=self._dir())

    def save_async(self) -> None:
        self.step += 1
        self.future = dcp.async_save(self.state, checkpoint_id=self._dir(), process_group=self.group)

    def wait(self) -> None:
        self.future.result()
        self._durable()

    def close(self) -> None:
        pass


def measure(system: Any, figures: dict[str, list[float]]) -> None:
    figures["save_s"].append(timed(system.save))
    figures["load_s"].append(timed(system.load))
    figures["blocking_s"].append(timed(system.save_async))
    start = time.perf_counter()
    system.wait()
    elapsed = torch.tensor([time.perf_counter() - start + figures["blocking_s"][-1]], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    figures["durable_s"].append(float(elapsed))


def rank_main(rank: int, port: int, args: argparse.Namespace, scratch: Path) -> dict | None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    state = sharded_state(mesh, args.mib, args.small)
    systems = [Ckpt(scratch / "ckpt", state), Dcp(scratch / "dcp", state)]
    results = {s.name: {f: [] for f in FIGURES} for s in systems}
    for rep in range(args.reps + 1):  # the first is a warm-up
        for system in systems if rep % 2 == 0 else systems[::-1]:
            figures = {f: [] for f in FIGURES} if rep == 0 else results[system.name]
            measure(system, figures)
    for system in systems:
        system.close()
    dist.destroy_process_group()
    if rank != 0:
        return None
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"nbytes": nbytes, "tensors": len(state), "reps": args.reps,
            "systems": {name: {f: {"median": statistics.median(runs), "runs": runs} for f, runs in figures.items()}
                        for name, figures in results.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(results: dict) -> str:
    lines = [f"== sharded state: {results['nbytes'] / 2**20:.0f} MiB in {results['tensors']} DTensors, 2 ranks "
             f"(medians of {results['reps']}) ==",
             f"{'figure':<12}{'ckpt':>12}{'dcp':>12}{'dcp / ckpt':>12}"]
    for figure in FIGURES:
        ours, theirs = (results["systems"][s][figure]["median"] for s in ("ckpt", "dcp"))
        lines.append(f"{figure:<12}{ours * 1e3:>10.1f}ms{theirs * 1e3:>10.1f}ms{theirs / ours:>11.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of large tensors (16 MiB each)")
    parser.add_argument("--small", type=int, default=200, help="number of 4 KiB tensors")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scratch", type=Path, help="where the checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-bench-dcp-", dir=args.scratch))
    result_file = scratch / "results.json"
    port, pids = free_port(), []
    try:
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    results = rank_main(rank, port, args, scratch)
                    if results is not None:
                        result_file.write_text(json.dumps(results))
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                os._exit(code)
            pids.append(pid)
        if any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids):
            sys.exit("a rank failed")
        results = json.loads(result_file.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["environment"] = {"torch": torch.__version__, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
