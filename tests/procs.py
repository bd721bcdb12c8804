"""Running real subprocesses in tests: bounded in time, always killed, output captured."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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


def start(code_or_path: str | Path, *args: str, **extra_env: str) -> subprocess.Popen:
    """Starts a Python file (or code string) with stdout piped; pair with :func:`stop`."""
    cmd = [sys.executable, str(code_or_path)] if isinstance(code_or_path, Path) else [sys.executable, "-c", code_or_path]
    return subprocess.Popen(cmd + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(**extra_env), start_new_session=True)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 60) -> str:
    """Reads the process's output until a line starting with ``prefix``; fails on exit or timeout."""
    import selectors
    import time

    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    seen = []
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line
    stop(proc)
    raise AssertionError(f"no line starting with {prefix!r}; output:\n{''.join(seen)}")


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
