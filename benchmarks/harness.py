"""Worker processes seen from the parent, and the alternating repetition schedule.

A :class:`WorkerGroup` starts one worker per system for one workload (each builds the same seeded
state; builds run concurrently), warms them up one after another, then runs the repetitions with the
systems in a rotating order so that slow drifts of the machine hit every system alike.
"""
from __future__ import annotations

import json
import os
import selectors
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent

# Memory a process frees goes back to the guest kernel, whose virtio-balloon free-page reporting hands
# it to the host within seconds; touching it again then costs ~0.3 GB/s instead of ~10 GB/s, for every
# system alike. So that the figures measure software, not the hypervisor, workers keep freed memory in
# their heap (glibc: no mmap'd chunks, no trimming). A real training host keeps its memory.
WARM_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 50)}
_ENV = {**os.environ, **WARM_HEAP, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


class WorkerError(RuntimeError):
    pass


class WorkerProcess:
    """One ``worker.py`` process; every call is bounded by ``timeout`` seconds and the process is
    killed on any failure."""

    def __init__(self, spec: dict, log: Path, timeout: float):
        self.log_path = log
        self.timeout = timeout
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), json.dumps(spec)], cwd=HERE,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=_ENV,
                                     text=True, bufsize=1)
        self.info: dict = {}

    def receive(self) -> dict:
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(self.timeout):
                self.kill()
                raise WorkerError(f"worker timed out after {self.timeout} s; log: {self.log_path}")
        line = self.proc.stdout.readline()
        if not line:
            self.kill()
            raise WorkerError(f"worker died; last lines of {self.log_path}:\n{self.tail()}")
        reply = json.loads(line)
        if "error" in reply:
            self.kill()
            raise WorkerError(reply["error"])
        return reply

    def call(self, cmd: str, **args: Any) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def quit(self) -> None:
        """Asks the worker to exit (without waiting: see :meth:`close`)."""
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
        except OSError:
            self.kill()

    def close(self) -> None:
        self.quit()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class WorkerGroup:
    """Workers for one workload: ``processes`` maps a process name to the systems it hosts."""

    def __init__(self, workload: dict, processes: dict[str, list[str]], scratch: Path, timeout: float):
        self.workers: dict[str, WorkerProcess] = {}
        self.host: dict[str, WorkerProcess] = {}
        try:
            for name, systems in processes.items():
                spec = {"workload": workload, "systems": systems, "scratch": str(scratch / name)}
                (scratch / name).mkdir(parents=True, exist_ok=True)
                worker = WorkerProcess(spec, scratch / f"{name}.log", timeout)
                self.workers[name] = worker
                self.host.update({s: worker for s in systems})
            for worker in self.workers.values():
                worker.info = worker.receive()
        except BaseException:
            self.close()
            raise

    @property
    def systems(self) -> list[str]:
        return list(self.host)

    @property
    def info(self) -> dict:
        return next(iter(self.workers.values())).info

    def warmup(self, ops: list[str]) -> None:
        for worker in self.workers.values():
            worker.call("warmup", ops=ops)

    def alternate(self, reps: int, call: Callable[[str, WorkerProcess, int], dict]) -> dict[str, list[dict]]:
        """Runs ``call(system, worker, rep)`` for every system in every repetition, rotating the order."""
        systems = self.systems
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for rep in range(reps):
            shift = rep % len(systems)
            for system in systems[shift:] + systems[:shift]:
                runs[system].append(call(system, self.host[system], rep))
        return runs

    def close(self) -> None:
        for worker in self.workers.values():
            worker.quit()
        for worker in self.workers.values():
            worker.close()

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per figure: the median and every run's value."""
    keys = {k for run in runs for k in run}
    return {k: {"median": statistics.median(r[k] for r in runs if k in r), "runs": [r[k] for r in runs if k in r]}
            for k in sorted(keys)}


def elapsed(since: float) -> str:
    return f"{time.perf_counter() - since:.1f} s"
