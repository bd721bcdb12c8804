"""The chunk files of a zarr3 array, read straight into the destination array.

A large leaf (not spread over processes), and the packed array of the small leaves, is one zarr3
array with the plain ``bytes`` codec, chunked along its first axis, so chunk ``i`` is one contiguous
slab of the C-order bytes, stored in the file ``c/i/0/...`` (written through tensorstore, or, a whole
chunk whose bytes lie aligned in memory, straight from there: :func:`ckpt.storage.write_direct`; the
same bytes either way). Saving records each chunk's word sum in
tree.json (``chunk_sum64``; a large leaf's chunks also get a CRC32 for ``ckpt verify``); loading a
local step reads each chunk file with ``readinto`` into its slab of the result (no intermediate copy)
and checks its word sum as it reads, several chunks at once (file reads and numpy sums release the
GIL); a step on an object store reads each chunk through tensorstore, several at once as well.
"""
from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
import os
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

import numpy as np

from ckpt import format as fmt
from ckpt import host_memory, objectstore, progress, storage

_SUM_BLOCK = 2 << 20  # read, then summed while still in the CPU's caches (2 MiB measured best here)


@functools.cache
def pool() -> tuple[concurrent.futures.ThreadPoolExecutor, int]:
    """The threads that read chunks (shared by every load; a snapshot's large copies run on them too),
    and how many there are."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # One more thread than CPUs: a thread that returns from a read waits for the GIL while
    # another holds it, and the extra one keeps every CPU copying meanwhile. On 2 CPUs, loads of
    # 96 MiB in 24 files went from 0.66-0.78x to 0.78-0.89x the speed of one readinto.
    threads = min(4, cpus) + 1
    return concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-read"), threads


# A forked child has none of its parent's threads, and a pool that counted them as idle would queue
# every read forever: the child's first load makes its own.
os.register_at_fork(after_in_child=pool.cache_clear)


class Chunk(NamedTuple):
    """Chunk ``key`` (``c/3/0``) holds bytes ``[start, stop)`` of the array's C-order bytes. Its file has
    ``file_bytes``: zarr3 stores an edge chunk whole, the rows past the array's end as fill."""

    key: str
    start: int
    stop: int
    file_bytes: int


class LocalArray(NamedTuple):
    """An array of a local step: its directory, and the step's files, each looked at (a regular file
    of the size tree.json implies, reached through no link) before anything is allocated for it."""

    directory: str
    files: storage.LocalFiles


def layout(meta: dict) -> list[Chunk]:
    """The chunks of a leaf's array, plain slabs along axis 0 (what tree.json's chunk checksums
    describe; :mod:`ckpt.schema` refuses any other array with them)."""
    return spec_layout(meta["array"])


def spec_layout(spec: dict) -> list[Chunk]:
    """The chunks of a zarr3 array made of plain slabs along axis 0 (a spec from tree.json)."""
    metadata = spec["metadata"]
    return _slabs(metadata, 0, _slab_count(metadata))


def _slab_count(metadata: dict) -> int:
    shape = metadata["shape"]
    return -(-shape[0] // metadata["chunk_grid"]["configuration"]["chunk_shape"][0]) if shape else 1


def _slabs(metadata: dict, first: int, stop: int) -> list[Chunk]:
    """Chunks ``first`` to ``stop`` (excluded) of a plain-slab array."""
    shape = metadata["shape"]
    row_bytes = _row_bytes(metadata)  # for a 0-d array, the bytes of its one element
    if not shape:
        return [Chunk("c", 0, row_bytes, row_bytes)]
    rows, tail = metadata["chunk_grid"]["configuration"]["chunk_shape"][0], "/0" * (len(shape) - 1)
    total = row_bytes * shape[0]
    return [Chunk(f"c/{i}{tail}", i * rows * row_bytes, min(total, (i + 1) * rows * row_bytes), rows * row_bytes)
            for i in range(first, stop)]


def grid(metadata: dict) -> Iterator[tuple[tuple[slice, ...], str, int]]:
    """Each chunk of a zarr3 array's regular grid, in C order: its index in the array, its key
    (``c/3/0``) and its file's size (the whole chunk, plus 4 bytes with the ``crc32c`` codec)."""
    shape, chunk_shape = metadata["shape"], metadata["chunk_grid"]["configuration"]["chunk_shape"]
    file_bytes = np.dtype(metadata["data_type"]).itemsize * math.prod(chunk_shape)
    file_bytes += 4 * any(codec["name"] == "crc32c" for codec in metadata["codecs"])
    counts = [-(-dim // step) for dim, step in zip(shape, chunk_shape)]
    if 0 in counts:  # an empty array has no chunks
        return
    position = [0] * len(counts)  # counted up in place: a forged grid of 2**40 chunks costs nothing until read
    while True:
        box = tuple(slice(i * c, min((i + 1) * c, dim)) for i, c, dim in zip(position, chunk_shape, shape))
        yield box, "/".join(["c", *map(str, position)]), file_bytes
        for axis in reversed(range(len(counts))):
            position[axis] += 1
            if position[axis] < counts[axis]:
                break
            position[axis] = 0
        else:
            return


def check_file(source: LocalArray, key: str, file_bytes: int) -> str | None:
    """Why the file of chunk ``key`` (or ``zarr.json``) cannot be read as one of ``file_bytes`` bytes
    (missing, a link, not a regular file, another size), or None."""
    path = f"{source.directory}/{key}"
    try:
        size = source.files.size(path)
    except FileNotFoundError:
        return f"chunk file {path} is missing"
    except (ValueError, OSError) as e:
        return str(e)
    return None if size == file_bytes else f"chunk file {path} has {size} bytes, not the {file_bytes} expected"


def _checked(source: Any, found: Iterator[Chunk]) -> list[Chunk]:
    """``found``, each chunk's file checked first when the array is local; ValueError at the first
    that cannot be read, before anything is allocated for the rest (so a forged size never is)."""
    out = []
    for chunk in found:
        why = check_file(source, chunk.key, chunk.file_bytes) if isinstance(source, LocalArray) else None
        if why:
            raise ValueError(why)
        out.append(chunk)
    return out


def check_array_files(source: LocalArray, meta: dict) -> str | None:
    """Why a local array cannot be handed to tensorstore, which follows links and waits on FIFOs: its
    zarr.json (against its CRC32 in ``meta``, a leaf's entry or 'packed' in tree.json), then each
    chunk file of its grid, each looked at as :func:`check_file` does; None when all are sound."""
    why = check_metadata(source, meta)
    if why:
        return why
    for _, key, file_bytes in grid(meta["array" if "array" in meta else "spec"]["metadata"]):
        why = check_file(source, key, file_bytes)
        if why:
            return why
    return None


def check_metadata(source: LocalArray, meta: dict) -> str | None:
    """Why the array's zarr.json (which other readers depend on) is not the one saved, or None."""
    path = f"{source.directory}/zarr.json"
    try:
        source.files.size(path)
        data = storage.read_json_bytes(path, fmt.ZARR_JSON_MAX_BYTES)
    except FileNotFoundError:
        return f"{path} is missing"
    except (ValueError, OSError) as e:
        return str(e)
    if fmt.crc32(data) != meta.get("zarr_json_crc32"):
        return f"{path} does not match its CRC32 in tree.json"
    return None


def checksums(data: np.ndarray, chunks: list[Chunk]) -> list[int]:
    """The CRC32 of each chunk of ``data`` (a flat uint8 array of the leaf's bytes)."""
    return [fmt.crc32(data[c.start:c.stop]) for c in chunks]


def sum64(data: np.ndarray) -> int:
    """The sum of ``data``'s bytes read as little-endian 64-bit words (the tail zero-padded), modulo 2**64.

    The check a load makes: it changes with any flipped bit and runs at memory speed (about 8x a
    CRC32 here), so loading stays close to reading; ``ckpt verify`` checks the CRC32 as well.
    """
    whole = data.size // 8 * 8
    total = int(data[:whole].view("<u8").sum(dtype=np.uint64))
    return (total + int.from_bytes(data[whole:].tobytes(), "little")) & 0xFFFFFFFFFFFFFFFF


def sums(data: np.ndarray, chunks: list[Chunk]) -> list[int]:
    """The :func:`sum64` of each chunk of ``data``."""
    return [sum64(data[c.start:c.stop]) for c in chunks]


def read_chunk(path: str, out: np.ndarray, file_bytes: int, expected_crc32: int | None,
               expected_sum64: int | None = None) -> str | None:
    """Reads the first ``out.size`` bytes of a chunk file of ``file_bytes`` bytes into ``out`` (the rest
    is an edge chunk's fill) and checks its :func:`sum64` (or, without one, its CRC32); returns why it
    is damaged, or None."""
    try:
        fd, size = storage.open_regular(path)
        with open(fd, "rb", buffering=0) as f:
            n, total = _read_summed(f, out, expected_sum64 is not None) if size == file_bytes else (0, 0)
    except FileNotFoundError:
        return f"chunk file {path} is missing"
    except ValueError as e:
        return str(e)
    if size != file_bytes or n != out.size:
        return f"chunk file {path} has {size} bytes, not the {file_bytes} expected"
    why = _mismatch(out, total, expected_crc32, expected_sum64)
    return None if why is None else f"chunk file {path} does not match its {why} in tree.json"


def _mismatch(out: np.ndarray, found_sum64: int | None, expected_crc32: int | None,
              expected_sum64: int | None) -> str | None:
    """The checksum in tree.json that a chunk's bytes ``out`` fail: its word sum when tree.json has
    one (``found_sum64``, which the caller took), else its CRC32; None if they match."""
    if expected_sum64 is not None:
        return None if found_sum64 == expected_sum64 else "checksum (chunk_sum64)"
    if expected_crc32 is not None and fmt.crc32(out) != expected_crc32:
        return "CRC32 (chunk_crc32)"
    return None


def _read_summed(f: BinaryIO, out: np.ndarray, summed: bool) -> tuple[int, int]:
    """Fills ``out`` from ``f``; returns the bytes read and (when ``summed``) their :func:`sum64`, taken
    block by block while each block is still in the CPU cache, so the check adds no pass over memory."""
    total = 0
    for start in range(0, out.size, _SUM_BLOCK):
        block = out[start: start + _SUM_BLOCK]
        filled = 0
        while filled < block.size:
            got = f.readinto(block[filled:])
            if not got:
                return start + filled, 0
            filled += got
        if summed:
            total += sum64(block)
    return out.size, total & 0xFFFFFFFFFFFFFFFF


class Read(NamedTuple):
    """Reading one chunk of ``nbytes``: ``run()`` fills its part of the result and returns why the
    chunk is damaged, or None."""

    run: Callable[[], str | None]
    nbytes: int


def leaf_reads(source: LocalArray | Any, meta: dict) -> tuple[np.ndarray, list[Read]]:
    """A new flat uint8 buffer for a leaf's bytes, and the reads of every chunk into it, for
    :func:`run_all`. ``source`` is the leaf's array in a local step, whose chunk files are checked
    first (ValueError), or the array being opened (see :func:`range_reads`)."""
    crcs, chunk_sums = meta["chunk_crc32"], meta.get("chunk_sum64")
    found = _checked(source, layout(meta))
    metadata = meta["array"]["metadata"]
    out = host_memory.empty(found[-1].stop if found else 0)
    row_bytes = _row_bytes(metadata)
    return out, [Read(functools.partial(_read, source, c, out[c.start:c.stop], row_bytes, crc, total), c.stop - c.start)
                 for c, crc, total in zip(found, crcs, chunk_sums or [None] * len(found))]


def run_all(reads: list[Read], tracker: progress.Tracker) -> list[str | None]:
    """Runs ``reads`` on the reading threads, each thread taking the next read as it finishes one
    (``tracker`` counts the bytes read), and returns what each returned, in order. The caller prepares
    every read first and then only waits, so that no thread returning from a file read waits for the
    GIL while the caller runs Python."""
    results: list[str | None] = [None] * len(reads)
    claim = itertools.count()  # next() on it is atomic: each read is taken by one thread

    def work() -> None:
        i = next(claim)
        while i < len(reads):
            results[i] = reads[i].run()
            tracker.advance(reads[i].nbytes)
            i = next(claim)

    threads, count = pool()
    workers = [threads.submit(work) for _ in range(min(len(reads), count))]
    concurrent.futures.wait(workers)  # all of them, even after one failed: none writes into the result later
    for worker in workers:
        worker.result()
    return results


def range_reads(source: LocalArray | Any, spec: dict, sums: list[int] | None, lo: int,
                hi: int) -> tuple[int, np.ndarray, list[tuple[Chunk, Read]]]:
    """The reads of the whole chunks of a flat uint8 array (the packed leaves) that hold bytes
    ``[lo, hi)``, into a new buffer, each checked against its entry in ``sums`` (the chunks'
    :func:`sum64`) when given. ``source`` is the array in a local step (each chunk file is checked
    before the buffer is allocated: ValueError), or the tensorstore future of the array being opened
    (any other step). Returns where the buffer starts in the array, the buffer, and the reads.
    """
    metadata = spec["metadata"]
    size = metadata["chunk_grid"]["configuration"]["chunk_shape"][0]
    first = lo // size
    held = _checked(source, (_slabs(metadata, i, i + 1)[0] for i in range(first, -(-hi // size)))) if hi > lo else []
    start = held[0].start if held else lo
    out = host_memory.empty((held[-1].stop if held else lo) - start)
    return start, out, [(c, Read(functools.partial(_read, source, c, out[c.start - start: c.stop - start], 1, None,
                                                   None if sums is None else sums[first + i]), c.stop - c.start))
                        for i, c in enumerate(held)]


def _row_bytes(metadata: dict) -> int:
    """The bytes of one index along a zarr3 array's first axis (a chunk holds whole ones)."""
    return np.dtype(metadata["data_type"]).itemsize * math.prod(metadata["shape"][1:])


def _read(source: LocalArray | Any, chunk: Chunk, out: np.ndarray, row_bytes: int, expected_crc32: int | None,
          expected_sum64: int | None) -> str | None:
    """Reads one chunk into ``out`` and checks it: from its file when ``source`` is a local array,
    else through tensorstore. Returns why it is damaged, or None."""
    if isinstance(source, LocalArray):
        return read_chunk(f"{source.directory}/{chunk.key}", out, chunk.file_bytes, expected_crc32, expected_sum64)
    what = f"reading chunk {chunk.key}"  # (a request refused or unanswered is no damage: an OSError)
    try:
        with objectstore.access_errors(what):
            store = source.result()
    except ValueError as e:  # the same for every chunk of the array: a load says it once
        return f"the array cannot be opened: {e}"
    try:
        with objectstore.access_errors(what):
            rows = store[chunk.start // row_bytes: chunk.stop // row_bytes]
            out[...] = np.ascontiguousarray(rows.read().result()).reshape(-1).view(np.uint8)
    except ValueError as e:
        return f"chunk {chunk.key} cannot be read: {e}"
    why = _mismatch(out, None if expected_sum64 is None else sum64(out), expected_crc32, expected_sum64)
    return None if why is None else f"chunk {chunk.key} does not match its {why} in tree.json"
