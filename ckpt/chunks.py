"""The chunk files of a large leaf's zarr3 array, read straight into the destination array.

A large leaf (not spread over processes) is one zarr3 array with the plain ``bytes`` codec, chunked
along its first axis, so chunk ``i`` is one contiguous slab of the C-order bytes, stored in the file
``c/i/0/...``. Saving records each chunk's CRC32 in tree.json (``chunk_crc32``); loading a local
step reads each chunk file with ``readinto`` into its slab of the result (no intermediate copy) and
checks it, several chunks at once (file reads and CRC32 release the GIL).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import zlib
from pathlib import Path
import numpy as np

_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that read chunks (shared by every load)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckpt-read")
    return _POOL


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Chunk ``key`` (``c/3/0``) holds bytes ``[start, stop)`` of the array's C-order bytes. Its file has
    ``file_bytes``: zarr3 stores an edge chunk whole, the rows past the array's end as fill."""

    key: str
    start: int
    stop: int
    file_bytes: int


def layout(meta: dict) -> list[Chunk] | None:
    """The chunks of a leaf stored as plain slabs along axis 0, or None for any other layout."""
    return spec_layout(meta["array"]) if meta.get("array") else None


def spec_layout(spec: dict) -> list[Chunk] | None:
    """The chunks of a zarr3 array (a spec from tree.json) made of plain slabs along axis 0, or None."""
    metadata = spec["metadata"]
    shape = metadata["shape"]
    chunk_shape = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    if [c["name"] for c in metadata["codecs"]] != ["bytes"] or list(chunk_shape[1:]) != list(shape[1:]):
        return None
    itemsize = np.dtype(metadata["data_type"]).itemsize
    if not shape:
        return [Chunk("c", 0, itemsize, itemsize)]
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows, tail = chunk_shape[0], "/0" * (len(shape) - 1)
    total = row_bytes * shape[0]
    return [Chunk(f"c/{i}{tail}", i * rows * row_bytes, min(total, (i + 1) * rows * row_bytes), rows * row_bytes)
            for i in range(-(-shape[0] // rows))]


def check_metadata(array_dir: Path, meta: dict) -> str | None:
    """Why the array's zarr.json (which other readers depend on) is not the one saved, or None."""
    path = array_dir / "zarr.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{path} is missing"
    if zlib.crc32(data) & 0xFFFFFFFF != meta.get("zarr_json_crc32"):
        return f"{path} does not match its CRC32 in tree.json"
    return None


def checksums(data: np.ndarray, chunks: list[Chunk]) -> list[int]:
    """The CRC32 of each chunk of ``data`` (a flat uint8 array of the leaf's bytes)."""
    return [zlib.crc32(data[c.start:c.stop]) & 0xFFFFFFFF for c in chunks]


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


def read_chunk(path: Path, out: np.ndarray, file_bytes: int, expected_crc32: int | None,
               expected_sum64: int | None = None) -> str | None:
    """Reads the first ``out.size`` bytes of a chunk file of ``file_bytes`` bytes into ``out`` (the rest
    is an edge chunk's fill) and checks its :func:`sum64` (or, without one, its CRC32); returns why it
    is damaged, or None."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            n = f.readinto(out) if size == file_bytes else 0
    except FileNotFoundError:
        return f"chunk file {path} is missing"
    if size != file_bytes or n != out.size:
        return f"chunk file {path} has {size} bytes, not the {file_bytes} expected"
    if expected_sum64 is not None:
        if sum64(out) != expected_sum64:
            return f"chunk file {path} does not match its checksum (chunk_sum64) in tree.json"
    elif expected_crc32 is not None and zlib.crc32(out) & 0xFFFFFFFF != expected_crc32:
        return f"chunk file {path} does not match its CRC32 in tree.json"
    return None


def start_read(array_dir: Path, meta: dict, out: np.ndarray) -> list[concurrent.futures.Future]:
    """Starts reading every chunk of a leaf into ``out`` (flat uint8); each future gives a damage or None."""
    crcs, chunk_sums = meta["chunk_crc32"], meta.get("chunk_sum64") or [None] * len(meta["chunk_crc32"])
    return [pool().submit(read_chunk, array_dir / c.key, out[c.start:c.stop], c.file_bytes, crc, total)
            for c, crc, total in zip(layout(meta), crcs, chunk_sums)]


def start_range_read(array_dir: Path, spec: dict, lo: int, hi: int, out: np.ndarray) -> list[concurrent.futures.Future]:
    """Starts reading bytes ``[lo, hi)`` of a flat uint8 array (the packed leaves) into ``out``, from
    the chunk files that hold them; each future gives a damage or None."""
    futures = []
    for c in spec_layout(spec):
        start, stop = max(lo, c.start), min(hi, c.stop)
        if start < stop:
            futures.append(pool().submit(_read_part, array_dir / c.key, c.file_bytes, start - c.start,
                                         out[start - lo: stop - lo]))
    return futures


def _read_part(path: Path, file_bytes: int, offset: int, out: np.ndarray) -> str | None:
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size == file_bytes:
                f.seek(offset)
                n = f.readinto(out)
    except FileNotFoundError:
        return f"chunk file {path} is missing"
    if size != file_bytes or n != out.size:
        return f"chunk file {path} has {size} bytes, not the {file_bytes} expected"
    return None
