"""New host memory for the bytes a load reads into and a snapshot copies into.

Fresh memory costs a page fault on first touch, and at 4 KiB a fault that cost is a third of a load
of large arrays from the page cache. numpy asks for transparent huge pages for arrays of 4 MiB or
more, but malloc seldom places them on a 2 MiB boundary, so about half of a 4 MiB array gets them.
A buffer of 4 MiB or more is therefore a private anonymous mapping of its own, whose length is a
whole number of 2 MiB pages (Linux then starts it on such a page) and whose whole 2 MiB pages are
asked to be huge (``madvise``): its first touch faults in 2 MiB at a time. The part of its last
2 MiB page past the buffer's bytes is left alone, so the buffer uses no more memory than its bytes;
it is freed with the last array viewing it. Smaller buffers, often memory that malloc reuses, or
where no mapping can be made, come from numpy. Every buffer starts at a multiple of
``format.ALIGN`` bytes: jax on CPU adopts an array viewing it without a copy.

Memory touched already is faster still: within :func:`reusing`, :func:`empty` first hands out the
spare buffers it was given (a Checkpointer's load reads into the staging buffers of its last async
save, which it frees anyway).
"""
from __future__ import annotations

import contextlib
import contextvars
import mmap
from typing import Callable, Iterator

import numpy as np

from ckpt import format as fmt

HUGE_PAGE = 2 << 20
MAPPED_FROM = 4 << 20
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
    if nbytes >= MAPPED_FROM and hasattr(mmap, "MADV_HUGEPAGE"):  # (Linux)
        try:
            return _mapped(nbytes)
        except OSError:  # no mapping left (vm.max_map_count): numpy's memory
            pass
    raw = make(nbytes + fmt.ALIGN, np.uint8)
    start = -raw.ctypes.data % fmt.ALIGN
    return raw[start: start + nbytes]


def _mapped(nbytes: int) -> np.ndarray:
    """``nbytes`` at the start of a mapping of their own (zeros until written), huge pages asked for;
    OSError where no mapping can be made."""
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(mapping, np.uint8, count=nbytes)
    base = array.ctypes.data
    first, stop = -base % HUGE_PAGE, (base + nbytes) // HUGE_PAGE * HUGE_PAGE - base  # the whole huge pages
    if stop > first:
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE, first, stop - first)
        except OSError:  # advice only: the buffer works without it
            pass
    return array
