"""A training loop that saves forever, for the crash tests: ``main(root, mode, log)`` in a child process.

``mode`` is ``sync``, ``async`` or ``mixed`` (async on odd steps). It continues after the latest
committed step of ``root``, keeps the last two steps (``LatestN(2)``, so garbage collection runs after
every commit), and appends ``ready`` to the file ``log``, then ``begin N`` before each save and
``committed N`` once step N is committed. The test kills it with SIGKILL at a random moment.
:func:`start` forks it from a clean forkserver, :func:`wait_for` waits for one of its lines.
:func:`kill_at_the_nth_operation` is the child of the test that kills a save at each of its file operations,
:func:`free_overwrite_killed_after_a_rename` that of the test of a free overwrite killed between its renames.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import ckpt
from ckpt import storage
from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from tests import procs

KEEP = 2


def state(step: int) -> dict:
    """The state saved at ``step``: small leaves (packed), one leaf above 1 MiB (its own array), inline values."""
    return {
        "step": step,
        "name": f"step-{step}",
        "big": np.full(300_000, step, np.float32),
        "small": {f"p{i}": np.arange(64, dtype=np.int32) + step * i for i in range(6)},
        "bytes": bytes([step % 256]) * 33,
    }


def metrics(step: int) -> dict:
    return {"loss": 1.0 / (step + 1)}


def checkpointer(root: str) -> Checkpointer:
    return Checkpointer(root, preservation_policy=pp.LatestN(KEEP))


def main(root: str, mode: str, log: str) -> None:
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)

    def say(line: str) -> None:  # one write per line: the writer thread says lines too
        os.write(out, (line + "\n").encode())

    with checkpointer(root) as ckptr:
        step = 0 if ckptr.latest is None else ckptr.latest.step + 1
        say("ready")
        while True:
            say(f"begin {step}")
            if mode == "sync" or (mode == "mixed" and step % 2 == 0):
                ckptr.save(step, state(step), force=True, metrics=metrics(step))
                say(f"committed {step}")
            else:
                response = ckptr.save_async(step, state(step), force=True, metrics=metrics(step))
                response.on_complete(lambda _, s=step: say(f"committed {s}"))
            step += 1


def kill_at_the_nth_operation(root: str, kill_at: int, overwrite: bool, exchange: bool, log: str) -> None:
    """Saves step 0, then step 0 again (``overwrite``) or step 1, and SIGKILLs itself before the ``kill_at``-th
    file operation (rename, replace, fsync, rmtree, exchange or no-replace rename) of that second save (0:
    never); prints ``operations N``, how many it made, and sends everything it prints to the file ``log``.
    Without ``exchange``, as on a file system that cannot swap two directories atomically (NFS, FUSE)."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    if not exchange:
        storage.rename_exchange = lambda a, b: False
    count = 0

    def counted(fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return call

    with Checkpointer(root) as ckptr:
        ckptr.save(0, {"v": np.zeros(3)}, force=True)
        for owner, name in [(os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree"),
                            (storage, "rename_exchange"), (storage, "rename_noreplace")]:
            if hasattr(owner, name):
                setattr(owner, name, counted(getattr(owner, name)))
        ckptr.save(0 if overwrite else 1, {"v": np.ones(3)}, force=True, overwrite=overwrite)
    print("operations", count, flush=True)


def free_overwrite_killed_after_a_rename(path: str, after: str) -> None:
    """Saves the checkpoint ``path``, then again with ``overwrite=True`` as on a file system that cannot swap two
    directories atomically (NFS, FUSE: the commit renames the old one aside, then the new one into place), and
    SIGKILLs itself once a rename has made ``path + after``."""
    storage.rename_exchange = lambda a, b: False
    ckpt.save(path, {"v": np.zeros(3)})
    rename = os.rename

    def killed_after(a: Any, b: Any) -> None:
        rename(a, b)
        if str(b) == path + after:
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = killed_after
    ckpt.save(path, {"v": np.ones(3)}, overwrite=True)


def start(root: Path, mode: str) -> tuple[multiprocessing.Process, Path]:
    """Forks :func:`main` on ``root`` from a clean forkserver; returns the process and the file of its lines."""
    log = root.with_name(root.name + ".log")
    log.unlink(missing_ok=True)
    worker = procs.forkserver(__name__).Process(target=main, args=(str(root), mode, str(log)))
    worker.start()
    return worker, log


def wait_for(worker: multiprocessing.Process, log: Path, line: str, timeout: float = 60) -> None:
    """Waits until the worker has said ``line``; fails if it exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and f"{line}\n" in log.read_text()):
        assert worker.is_alive() and time.monotonic() < deadline, (
            f"the worker did not say {line!r} (exit {worker.exitcode}):\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.005)
