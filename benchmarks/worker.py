"""A benchmark worker process: builds one workload, hosts one or more systems, answers commands.

Started by :mod:`harness` as ``python worker.py SPEC_JSON``; reads one JSON command per line on
stdin and answers one JSON line on the original stdout (anything libraries print goes to stderr).
Commands: ``warmup`` (one verified repetition per system), ``rep`` (one timed repetition of one
system, or its memory pass), ``interference``, ``fixed_costs``, ``quit``.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

import memory
import workloads

SYSTEMS = {"floor": ("baselines", "Floor"), "ckpt": ("system_ckpt", "CkptSystem"),
           "orbax": ("system_orbax", "OrbaxSystem"), "torch": ("system_torch", "TorchSystem"),
           "dcp": ("system_dcp", "DcpSystem")}


def make_system(name: str, tree: Any) -> Any:
    module, cls = SYSTEMS[name]
    return getattr(importlib.import_module(module), cls)(tree)


def count_files(path: Path) -> int:
    if path.is_file():
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def materialize(result: Any) -> None:
    """Waits for device transfers a load may leave in flight (jax arrays)."""
    for leaf in workloads.iter_leaves(result):
        ready = getattr(leaf, "block_until_ready", None)
        if ready is not None:
            ready()


def train_step(arrays: list[np.ndarray]) -> None:
    """Reads every byte of the state, as the training step before a save does. Without it, a save
    that follows a background write of 1 GiB finds the state's pages cold on these VMs (the
    hypervisor reclaims idle guest memory while the guest's page cache grows) and its copy takes 2-3x
    as long, while the floor, which writes nothing between its copies, never pays that."""
    for array in arrays:
        np.count_nonzero(array.reshape(-1).view(np.uint8))


def repetition(system: Any, root: Path, ops: list[str], *, memory_pass: bool = False,
               expected: list | None = None) -> dict:
    """One repetition in a fresh root: durable save of step 0, async saves of steps 1 and 2, load of step 0.

    Each operation is timed alone (``save_s``, ``save_again_s`` (step 3, when ``ops`` has
    "save_again"), ``blocking_first_s``, ``blocking_s`` and
    ``async_total_s``, ``load_s``), each save after a :func:`train_step` over ``system.state`` (what
    the system saves). Step 1 is the first async save of a newly opened system
    (``blocking_first_s``); step 2 is the steady state of a training loop, which saves again with the
    same object (``blocking_s``, ``async_total_s``). A
    memory pass records each operation's peak RSS increase instead (``*_peak_bytes``): it trims the
    heap first, which hands memory back to the hypervisor and so slows the allocations that follow
    (see ``harness.WARM_HEAP``); run it after the timed repetitions. ``expected`` (a fingerprint)
    checks that the load returned the saved arrays.
    """
    out: dict[str, float | int] = {}
    arrays = workloads.raw_arrays(system.state)

    def measure(seconds_key: str | None, peak_key: str, run: Callable[[], Any]) -> None:
        if memory_pass:
            base = memory.reset_peak()
            run()
            out[peak_key] = memory.peak_increase(base)
        else:
            gc.collect()
            os.sync()  # the writeback the last repetition (of any system) left is not this operation's
            start = time.perf_counter()
            run()
            if seconds_key:
                out[seconds_key] = time.perf_counter() - start

    def save_async() -> None:
        for step, key in ((1, "blocking_first_s"), (2, "blocking_s")):
            train_step(arrays)
            start = time.perf_counter()
            pending = system.save_async(step)
            if not memory_pass:
                out[key] = time.perf_counter() - start
            pending.wait()
            if not memory_pass:
                out["async_total_s"] = time.perf_counter() - start

    def load() -> None:
        result = system.load(0)
        materialize(result)
        if expected is not None and workloads.fingerprint(result) != expected:
            raise AssertionError(f"{system.name}: the loaded arrays differ from the saved ones")

    system.open(root)
    try:
        if "save" in ops:
            train_step(arrays)
            measure("save_s", "save_peak_bytes", lambda: system.save(0))
            out["files"] = count_files(system.step_path(0))
        if "save_again" in ops:  # a training loop's next durable save of the same tree, by the same object
            train_step(arrays)
            measure("save_again_s", "save_again_peak_bytes", lambda: system.save(3))
        if "async" in ops:
            measure(None, "async_peak_bytes", save_async)
        if "load" in ops:
            measure("load_s", "load_peak_bytes", load)
    finally:
        system.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


class Worker:
    def __init__(self, spec: dict):
        self.scratch = Path(spec["scratch"])
        self.scratch.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        workload = dict(spec["workload"])
        if workload["kind"] == "lightning":
            workload["workdir"] = str(self.scratch)
        self.tree = workloads.build(workload)
        self.systems = {name: make_system(name, self.tree) for name in spec["systems"]}
        self.info = {**workloads.describe(self.tree), "build_s": time.perf_counter() - start}
        gc.freeze()  # the imported libraries' objects: a full collection before each measurement then costs ~0

    def root(self, system: str, tag: Any) -> Path:
        return self.scratch / f"{system}-{tag}"

    def handle(self, command: dict) -> dict:
        cmd = command["cmd"]
        if cmd == "warmup":
            expected = workloads.fingerprint(self.tree)
            return {name: repetition(s, self.root(name, "warmup"), command["ops"], expected=expected)
                    for name, s in self.systems.items()}
        system = self.systems[command["system"]]
        if cmd == "rep":
            return repetition(system, self.root(system.name, command["rep"]), command["ops"],
                              memory_pass=command.get("memory_pass", False))
        if cmd == "interference":
            import interference

            return interference.measure(system, self.root(system.name, f"int-{command['rep']}"),
                                        command["compute_bytes"], command["alone_s"])
        if cmd == "fixed_costs":
            import overheads

            return overheads.fixed_costs(system, self.tree, self.root(system.name, cmd), **command["args"])
        raise ValueError(f"unknown command {cmd!r}")


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr, never into the reply stream
    try:
        worker = Worker(json.loads(sys.argv[1]))
        replies.write(json.dumps({"ready": True, **worker.info}) + "\n")
    except BaseException:
        replies.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        return
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        try:
            reply = worker.handle(command)
        except BaseException:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
