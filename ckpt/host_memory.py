"""New host memory for the bytes a load reads into and a snapshot copies into.

Fresh memory costs a page fault on first touch, and at 4 KiB a fault that cost is a third of a load
of large arrays from the page cache. numpy asks for transparent huge pages for allocations of 4 MiB
or more, but malloc seldom places them on a 2 MiB boundary, so about half of a 4 MiB array gets them.
A buffer of 4 MiB or more is therefore cut from a numpy allocation 2 MiB longer, starting on a 2 MiB
boundary: every whole 2 MiB page of it can be huge, and its first touch faults 2 MiB at a time. It
is still malloc's memory: where the allocator keeps freed memory (glibc below its mmap threshold,
which rises to the size of the buffers freed, tcmalloc, jemalloc), the next load reads into memory
touched already instead of fresh pages. Every buffer starts at a multiple of ``format.ALIGN`` bytes
(those of 4 MiB or more on a page: O_DIRECT writes take them): jax on CPU adopts an array viewing it
without a copy.

Memory touched already is faster still: within :func:`reusing`, :func:`empty` first hands out the
spare buffers it was given (a Checkpointer's load reads into the staging buffers of its last async
save, which it frees anyway).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import resource
from typing import Callable, Iterator

import numpy as np

from ckpt import format as fmt

HUGE_PAGE = 2 << 20
HUGE_FROM = 4 << 20  # numpy asks for huge pages from here on
_SPARE: contextvars.ContextVar[dict[int, list[np.ndarray]] | None] = contextvars.ContextVar("spare", default=None)


def empty(nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` (its contents undefined) that starts at a multiple of ``format.ALIGN``:
    a spare buffer of that size (see :func:`reusing`), or new memory."""
    spare = _SPARE.get()
    if spare and spare.get(nbytes):
        return spare[nbytes].pop()
    return _new(nbytes, np.empty)


@contextlib.contextmanager
def reusing(buffers: list[np.ndarray]) -> Iterator[None]:
    """Within it (in this thread), :func:`empty` hands out ``buffers`` (flat uint8 arrays that start at
    a multiple of ``format.ALIGN`` and that nothing else uses any more), which it takes out of the
    list, before making new ones; those left over are dropped at its end."""
    spare: dict[int, list[np.ndarray]] = {}
    for buffer in buffers:
        spare.setdefault(buffer.size, []).append(buffer)
    buffers.clear()
    token = _SPARE.set(spare)
    try:
        yield
    finally:
        _SPARE.reset(token)
        spare.clear()


def zeros(nbytes: int) -> np.ndarray:
    """A new uint8 array of ``nbytes`` zeros that starts at a multiple of ``format.ALIGN``."""
    return _new(nbytes, np.zeros)


def _new(nbytes: int, make: Callable[..., np.ndarray]) -> np.ndarray:
    align = HUGE_PAGE if nbytes >= HUGE_FROM else fmt.ALIGN
    raw = make(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start: start + nbytes]


def allocatable() -> int:
    """The bytes this process may still allocate: the machine's available memory (its whole memory where
    /proc does not say), within what its control groups' memory limits (a container's) and its address-space
    limit (RLIMIT_AS) leave."""
    page = os.sysconf("SC_PAGE_SIZE")
    limit = page * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        with open("/proc/meminfo") as f:
            limit = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    limit = min(limit, cgroup_room())
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        used = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * page
        limit = min(limit, soft - used)
    return limit


# Per cgroup version: the files of a control group's limit and its usage, and the fields of its memory.stat that count
# its page cache (which the kernel reclaims before it kills: free for this purpose) and the part of it that is tmpfs
# or shared memory (which it cannot reclaim without swap: not free).
_CGROUP_FILES = {2: ("memory.max", "memory.current", "file", "shmem"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")}


def cgroup_room(cgroups: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> float:
    """What the memory limits of this process's control group and those above it leave (the least of them), its
    page cache (but not its tmpfs or shared memory) counted as free; infinity where none is set or readable.
    ``cgroups`` and ``mount``: the files read (cgroup v2 under ``mount``, v1 under ``mount``/memory)."""
    room = float("inf")
    with contextlib.suppress(OSError):
        with open(cgroups, errors="surrogateescape") as f:  # (a group's name is any bytes: read as the file
            lines = f.read().splitlines()                    # system's names are, never refused)
        for line in lines:
            number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if number == "0" and not controllers:
                version, base = 2, mount
            elif "memory" in controllers.split(","):
                version, base = 1, os.path.join(mount, "memory")
            else:
                continue
            directory = os.path.normpath(base + "/" + path)
            while True:
                room = min(room, _group_room(directory, *_CGROUP_FILES[version]))
                if directory == base or not directory.startswith(base):
                    break
                directory = os.path.dirname(directory)
    return room


def _group_room(directory: str, limit_file: str, usage_file: str, cache_field: str, shmem_field: str) -> float:
    """What one control group's memory limit leaves (see :func:`cgroup_room`): none where its usage is past it."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(os.path.join(directory, limit_file)) as f:
            text = f.read().strip()
        if text == "max" or int(text) >= 1 << 62:  # (v1's "no limit" is the largest page multiple of a long)
            return float("inf")
        with open(os.path.join(directory, usage_file)) as f:
            used = int(f.read())
        return max(int(text) - max(used - _reclaimable(directory, cache_field, shmem_field), 0), 0)
    return float("inf")


def _reclaimable(directory: str, cache_field: str, shmem_field: str) -> int:
    """The page cache of one control group less its tmpfs and shared memory (see :data:`_CGROUP_FILES`); none where
    its memory.stat cannot be read."""
    stat: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(directory, "memory.stat")) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name in (cache_field, shmem_field):
                    stat[name] = int(value)
    return max(stat.get(cache_field, 0) - stat.get(shmem_field, 0), 0)

