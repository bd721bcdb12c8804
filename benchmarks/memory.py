"""Peak resident memory of one operation in this process (Linux).

Before an operation, :func:`reset_peak` returns freed heap memory to the OS (``malloc_trim``) and
resets the kernel's high-water mark (``/proc/self/clear_refs``); afterwards :func:`peak_increase`
reads it back. Each benchmark system runs in its own worker process, so the numbers of one system
never include another's allocations.
"""
from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_LIBC = ctypes.CDLL("libc.so.6")


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS} has no {field}: peak memory needs Linux")
    return int(match.group(1)) << 10


def reset_peak() -> int:
    """Frees what can be freed, resets the peak to the current RSS, and returns that RSS in bytes."""
    gc.collect()
    _LIBC.malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    return _status_bytes("VmRSS")


def peak_increase(baseline: int) -> int:
    """Bytes by which the peak RSS since :func:`reset_peak` exceeded ``baseline``."""
    return max(0, _status_bytes("VmHWM") - baseline)
