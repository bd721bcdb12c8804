"""Running real subprocesses in tests: bounded in time, always killed, output captured."""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    """The test environment plus ``extra``, with the repository importable and output unbuffered."""
    out = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    out.update(extra)
    return out


def run_script(code_or_path: str | Path, *args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    """Runs a Python file (or a code string) to completion; returns the CompletedProcess (text output)."""
    cmd = [sys.executable, str(code_or_path)] if isinstance(code_or_path, Path) else [sys.executable, "-c", code_or_path]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def start(code_or_path: str | Path, *args: str, stdin: bool = False, **extra_env: str) -> subprocess.Popen:
    """Starts a Python file (or code string) with stdout (and with ``stdin``, stdin) piped; pair with :func:`stop`."""
    cmd = [sys.executable, str(code_or_path)] if isinstance(code_or_path, Path) else [sys.executable, "-c", code_or_path]
    return subprocess.Popen(cmd + list(args), stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env(**extra_env), start_new_session=True)


def _lines(proc: subprocess.Popen) -> "queue.Queue[str | None]":
    """A queue fed by a thread that reads the process's output line by line (None at the end)."""
    if not hasattr(proc, "_line_queue"):
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        proc._line_queue = lines
        proc._seen = []
    return proc._line_queue


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 60) -> str:
    """Reads the process's output until a line starting with ``prefix``; kills it and fails on exit or timeout."""
    lines = _lines(proc)
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            stop(proc)
            raise AssertionError(f"no line starting with {prefix!r}; output:\n{''.join(proc._seen)}")
        proc._seen.append(line)
        if line.startswith(prefix):
            return line


def output(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Everything the process printed (what :func:`wait_for_line` read included), once it exits."""
    lines = _lines(proc)
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            stop(proc)
            raise AssertionError(f"the process did not exit within {timeout} s; output:\n{''.join(proc._seen)}") from None
        if line is None:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return "".join(proc._seen)
        proc._seen.append(line)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    """Sends ``sig`` to the process group, waits, and returns the exit code."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def forkserver(preload: str) -> multiprocessing.context.BaseContext:
    """The forkserver context whose children are forks of a clean interpreter that imported ``preload``.

    Tensorstore aborts in a fork of a process that used it, so children are forked from a server that
    never ran it, and skip the interpreter's start-up and imports. The server is one per test process:
    ``preload`` counts only for the first caller, and a later child imports its own module itself.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([preload])
    return context


def in_fork(child: Callable[[], bytes], timeout: int = 30) -> bytes:
    """Forks this process (threads and all: what a DataLoader worker inherits), runs ``child`` there and
    returns what it returned; b"" when it raised, or hung past ``timeout`` seconds (it is then killed)."""
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(timeout)
            os.write(writable, child())
        finally:
            os._exit(0)
    os.close(writable)
    with os.fdopen(readable, "rb") as reply:
        said = reply.read()
    os.waitpid(pid, 0)
    return said
