"""Where the small leaves go in the packed array, and how a snapshot copies many of them at once.

Every leaf under ``fmt.SMALL_LEAF_BYTES`` is stored in one uint8 array, at an offset aligned to
``fmt.ALIGN`` (see docs/format.md). :func:`place` lays leaves of one type and dtype next to each other
(tiny ones, which fit an alignment slot, grouped by shape too), so that the snapshot of a reused
layout (:mod:`ckpt.layout`) copies each such run of numpy arrays with one numpy call (:class:`Run`)
instead of one call per leaf: a numpy call costs about a microsecond, as long as copying a few KiB.
"""
from __future__ import annotations

import bisect
import dataclasses
import operator
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ckpt import format as fmt
from ckpt import leaves as leaves_lib


PIECE_BYTES = 256 << 10  # a sync save to local files fills and writes the packed array at most this much at a time
MIN_PIECE_BYTES = 128 << 10  # and at least this much (smaller pieces took more time than they saved memory)


def piece_bytes(largest: int = PIECE_BYTES) -> int:
    """The window by which a sync save to local files fills and writes the packed array, so that it holds
    a piece of it at a time (each in one buffer, see :func:`windows`), not a chunk: the smallest power of two from
    :data:`MIN_PIECE_BYTES` to :data:`PIECE_BYTES` that holds ``largest`` bytes (the largest packed leaf's
    slot: a leaf longer than a piece is copied again into each next one), or a whole chunk where that does
    not divide ``fmt.PACKED_CHUNK_BYTES``. Runs of leaves never cross such a window.

    Example::

        assert piece_bytes(16 << 10) == MIN_PIECE_BYTES and piece_bytes(1 << 20) == PIECE_BYTES
    """
    size = min(PIECE_BYTES, max(MIN_PIECE_BYTES, 1 << max(largest - 1, 0).bit_length()))
    return size if fmt.PACKED_CHUNK_BYTES % size == 0 else fmt.PACKED_CHUNK_BYTES


def slot(nbytes: Any) -> Any:
    """The bytes a packed leaf of ``nbytes`` takes in the packed array (padded to the alignment); of
    each, for an array of sizes."""
    return -(-nbytes // fmt.ALIGN) * fmt.ALIGN


def group(meta: dict, nbytes: int) -> tuple:
    """The key :func:`place` lays leaves together by: the leaf's type and dtype, and its shape when it
    fits one alignment slot (such leaves are copied as one strided array)."""
    return meta["type"], meta["dtype"], tuple(meta["shape"]) if nbytes <= fmt.ALIGN else None


def place(indices: list[int], metas: list[dict], nbytes: list[int], offset: list[int]) -> int:
    """Sets ``offset[i]`` for each packed leaf i of ``indices`` (ascending; ``metas[i]`` its manifest
    entry, ``nbytes[i]`` its size): the leaves of one :func:`group` one after another, groups in order
    of first appearance; returns the packed array's size.

    Example::

        packed_nbytes = place(small, metas, nbytes, offset)
    """
    sizes = list(map(nbytes.__getitem__, indices))
    keys = list(map(group, map(metas.__getitem__, indices), sizes))
    rank = {key: r for r, key in enumerate(dict.fromkeys(keys))}
    order = np.argsort(np.array(list(map(rank.__getitem__, keys)), np.int64), kind="stable")  # stable: flatten order
    slots = slot(np.array(sizes, np.int64)[order])
    ends = np.cumsum(slots)
    for i, start in zip(np.array(indices, np.int64)[order].tolist(), (ends - slots).tolist()):
        offset[i] = start
    return int(ends[-1]) if len(ends) else 0


@dataclasses.dataclass
class Run:
    """Numpy array leaves of one dtype (stored as ``dtype``) laid one after another in the packed
    array, copied together: with ``shape`` (every leaf's, each in one slot) as one strided array, else
    concatenated with their padding (``pads``) into the run's bytes.

    Example::

        run = Run([0, 1], start=0, stop=128, dtype=np.dtype(np.float32), shape=(), pads=[])
        run.copy([np.float32(1.0), np.float32(2.0)], run.target(np.zeros(128, np.uint8)))
    """

    indices: list[int]
    start: int
    stop: int
    dtype: np.dtype
    shape: tuple[int, ...] | None
    pads: list[np.ndarray]

    def __post_init__(self):
        self._pick = picker(self.indices)

    def target(self, buffer: np.ndarray) -> np.ndarray:
        """Where :meth:`copy` writes in ``buffer`` (the packed staging buffer)."""
        if self.shape is None:
            return buffer[self.start: self.stop].view(self.dtype)
        inner = np.empty(self.shape, self.dtype).strides  # C order, of at most ALIGN bytes
        return np.ndarray((len(self.indices), *self.shape), self.dtype, buffer, self.start,
                          (slot(self.dtype.itemsize * int(np.prod(self.shape))), *inner))

    def copy(self, values: list[Any], target: np.ndarray) -> None:
        """Copies the run's leaves (``values[i]`` for each of its indices) into ``target``."""
        chosen = self._pick(values)
        if self.shape is not None:
            target[...] = chosen  # an assignment casts as astype does (a storage dtype)
            return
        parts: list[Any] = [None] * (2 * len(chosen))
        parts[::2], parts[1::2] = chosen, self.pads
        np.concatenate(parts, axis=None, out=target, casting="unsafe")


def picker(indices: list[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A function that picks the items at ``indices`` from a sequence, in one C call.

    Example::

        assert picker([2, 0])("abc") == ("c", "a")
    """
    if len(indices) < 2:  # itemgetter of one index returns the item itself
        return lambda values: tuple(values[i] for i in indices)
    return operator.itemgetter(*indices)


def runs(order: list[int], keys: dict[int, Any], meta: list[dict], offset: list[int], nbytes: list[int],
         window: int) -> tuple[list[Run], list[int]]:
    """Splits the packed leaves (indices in offset order) into runs of two or more leaves next to each
    other with one key (``keys[i]``: the :func:`group` of a numpy array leaf and its own dtype; a leaf
    without one is copied alone) that start in one ``window`` of the packed array, and the leaves left to copy
    one by one. The leaves are compared as numpy columns.

    Example::

        together, alone = runs(order, keys, meta, offset, nbytes, piece_bytes())
    """
    if not order:
        return [], []
    ids: dict[Any, int] = {}
    key_ids = np.array([-1 if key is None else ids.setdefault(key, len(ids)) for key in map(keys.get, order)])
    starts = np.array(list(map(offset.__getitem__, order)), np.int64)
    sizes = np.array(list(map(nbytes.__getitem__, order)), np.int64)
    ends = starts + slot(sizes)
    joined = ((key_ids[1:] == key_ids[:-1]) & (key_ids[1:] >= 0) & (starts[1:] == ends[:-1])
              & (starts[1:] // window == starts[:-1] // window))
    bounds = [0, *(np.flatnonzero(~joined) + 1).tolist(), len(order)]
    together, alone = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        indices, first = order[a: b], order[a]
        dtype = leaves_lib.parse_dtype(meta[first]["dtype"])
        shape = group(meta[first], nbytes[first])[2]
        if b - a < 2 or (shape is None and fmt.ALIGN % dtype.itemsize):
            alone.extend(indices)
            continue
        pads: list[np.ndarray] = []
        if shape is None:  # the zeros after each leaf, to its slot's end
            lengths = ((ends[a: b] - starts[a: b] - sizes[a: b]) // dtype.itemsize).tolist()
            zeros = {length: np.zeros(length, dtype) for length in set(lengths)}
            pads = list(map(zeros.__getitem__, lengths))
        together.append(Run(indices, int(starts[a]), int(ends[b - 1]), dtype, shape, pads))
    return together, alone


def by_window(together: list[Run], alone: list[int], offset: list[int], size: int) -> list[tuple[list[Run], list[int]]]:
    """The runs (each starting in one window, see :func:`runs`) and lone leaves of each window of ``size``
    bytes of the packed array, by the window each leaf starts in, each run placed from its window's
    start (its last leaf may end past the window). A save that makes the packed array one chunk at a
    time (a sync save, which holds no copy of the whole state) fills each chunk with them.

    Example::

        per_window = by_window(together, alone, offset, fmt.PACKED_CHUNK_BYTES)
    """
    starts = [run.start for run in together] + [offset[i] for i in alone]
    out: list[tuple[list[Run], list[int]]] = [([], []) for _ in range(max(starts, default=-size) // size + 1)]
    for run in together:
        base = run.start // size * size
        out[run.start // size][0].append(dataclasses.replace(run, start=run.start - base, stop=run.stop - base))
    for i in alone:
        out[offset[i] // size][1].append(i)
    return out


def windows(fill: Callable[[np.ndarray, int, int], int], total: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """The packed array of ``total`` bytes in chunks of ``size`` (each yielded as ``(start, bytes)``):
    ``fill(buffer, lo, hi)`` writes the slot of each leaf that starts in ``[lo, hi)`` at
    ``buffer[offset - lo:]``, the leaf's bytes and the zeros of its padding (the buffer holds what an
    earlier chunk left), and returns where the last slot ends in ``buffer``; the bytes a slot puts past
    the chunk begin the next one. An empty array has one empty chunk. A chunk's buffer is filled again
    only once nothing references it: a caller may hand a chunk to a write without a copy (tensorstore
    lets go of a write's source when the write commits) and hold on to the last few. A caller that lets
    go of each chunk before it asks for the next (a sync save's pieces) gets them all in one buffer.

    Example::

        for start, chunk in windows(fill, plan.packed_nbytes, fmt.PACKED_CHUNK_BYTES):
            write(start, chunk)
    """
    pool: list[np.ndarray] = []  # (held by index here: the last chunk's buffer is free once its caller lets go)
    width, previous, carry = min(size, total) + fmt.SMALL_LEAF_BYTES, 0, 0
    for lo in range(0, max(total, 1), size):  # one empty chunk when every leaf is empty
        hi = min(lo + size, total)
        at = _unreferenced(pool, width)
        if carry:  # (from the same buffer too: numpy copies overlapping bytes as memmove does)
            pool[at][:carry] = pool[previous][size: size + carry]
        end = max(fill(pool[at], lo, hi), carry)
        yield lo, pool[at][: hi - lo]
        carry, previous = max(end - (hi - lo), 0), at


def _unreferenced(pool: list[np.ndarray], width: int) -> int:
    """The index of a buffer of ``pool`` that nothing else references (holding what it last held); of a
    new one, added to the pool, when each is still in use."""
    for i in range(len(pool)):
        if sys.getrefcount(pool[i]) == 2:  # the pool's reference and the call's argument: no view of it is alive
            return i
    pool.append(np.empty(width, np.uint8))
    return len(pool) - 1


def in_order(indices: list[int], offset: Sequence[int], nbytes: Sequence[int]) -> list[int]:
    """The packed leaves ``indices`` (``offset[i]``, ``nbytes[i]``) in the order they lie in the packed array:
    by offset, an empty leaf before the leaf that begins where it lies (:func:`place` puts a group of empty
    leaves where the next group begins), so that their ends never decrease either, as :class:`Checksums` needs.

    Example::

        assert in_order([0, 1, 2], [0, 0, 0], [8, 0, 0]) == [1, 2, 0]
    """
    return sorted(indices, key=lambda i: (offset[i], nbytes[i]))


class Checksums:
    """The CRC32 of each packed leaf (at ``offsets``, of ``sizes`` bytes, in :func:`in_order`'s order), taken
    from the chunks of the packed array as they are fed in order (a leaf may span chunks).

    Example::

        crcs = Checksums([0, 64], [8, 4])
        crcs.feed(0, np.zeros(128, np.uint8))
        assert crcs.values == [fmt.crc32(bytes(8)), fmt.crc32(bytes(4))]
    """

    def __init__(self, offsets: Sequence[int], sizes: Sequence[int]):
        self._offsets = offsets
        self._ends = list(map(operator.add, offsets, sizes))  # non-decreasing: the leaves do not overlap
        self.values = [0] * len(offsets)  # the CRC32 of no bytes: zero-size leaves are never fed
        self._next = 0

    def feed(self, start: int, chunk: np.ndarray) -> None:
        """Takes in the chunk of the packed array at ``start``."""
        offsets, ends, values = self._offsets, self._ends, self.values
        data, stop, i = memoryview(chunk), start + chunk.size, self._next
        if i < len(ends) and offsets[i] < start:  # a leaf begun in an earlier chunk
            values[i] = fmt.crc32(data[: min(ends[i], stop) - start], values[i])
            if ends[i] > stop:
                return
            i += 1
        whole = bisect.bisect_right(ends, stop, i)  # the leaves from i to whole lie in the chunk
        values[i: whole] = map(fmt.crc32, [data[a - start: b - start] for a, b in zip(offsets[i: whole], ends[i: whole])])
        if whole < len(ends) and offsets[whole] < stop:  # a leaf that goes on in the next chunk
            values[whole] = fmt.crc32(data[offsets[whole] - start:])
        self._next = whole
