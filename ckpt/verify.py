"""Re-reads a committed step and checks every byte of its data, leaf by leaf and chunk by chunk.

What is checked: the manifest and its own CRC32, tree.json against the CRC32 in the manifest, every
packed leaf against its CRC32 in tree.json, every chunk of every large leaf (it exists, has its size,
and matches its ``chunk_crc32`` in tree.json, or the crc32c that tensorstore's zarr3 codec stored with
it), and each array's zarr.json against its CRC32 in tree.json (a local step) and the spec there.
Memory stays bounded by two chunks (at most 2 x 16 MiB for large leaves, 2 x 4 MiB for packed ones).

Example::

    from ckpt.verify import verify_step
    result = verify_step("runs/exp1/100")
    for damage in result.damaged:
        print(damage.where, damage.why)     # state['params']['w'] chunk 3 of its array does not match ...
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ckpt import chunks
from ckpt import format as fmt
from ckpt import formats, loading, orbax, progress, storage
from ckpt.errors import CheckpointCorruptedError, UnsupportedLayoutError

_IN_FLIGHT = 2  # chunk reads kept in flight


@dataclasses.dataclass(frozen=True)
class Damage:
    """One damaged part of a step: ``where`` is a key path (``state['w']``) or a file (``tree.json``).

    Example::

        Damage("state['params']['w']", "chunk 3 of its array does not match its CRC32 in tree.json")
    """

    where: str
    why: str


@dataclasses.dataclass
class VerifyResult:
    """What :func:`verify_step` found: how many leaves and bytes it checked, and what is damaged.

    Example::

        result = verify_step("runs/exp1/100")
        print(result.step, result.leaves, result.nbytes, result.ok)   # 100 12 4096 True
    """

    path: storage.Location
    step: int | None
    leaves: int = 0
    nbytes: int = 0
    damaged: list[Damage] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is damaged."""
        return not self.damaged


def verify_step(step_dir: str | os.PathLike | storage.Location) -> VerifyResult:
    """Re-reads one step directory and checks every checksum; damage is reported, not raised.

    Progress is reported on the ``ckpt.progress`` logger when it runs long (see :mod:`ckpt.progress`).

    Example::

        result = verify_step("runs/exp1/100")
        assert result.ok, [d.where for d in result.damaged]
    """
    step_dir = storage.location(step_dir)
    if formats.is_orbax(step_dir):
        return _verify_orbax(step_dir)
    result = VerifyResult(step_dir, None)
    try:
        manifest = loading.read_manifest(step_dir)
    except CheckpointCorruptedError as e:
        result.damaged.append(Damage(fmt.MANIFEST, str(e)))
        return result
    result.step = manifest.get("step")
    try:
        doc = loading.read_tree(step_dir, manifest)
    except CheckpointCorruptedError as e:
        result.damaged.append(Damage(fmt.TREE, str(e)))
        return result
    packed, arrays = [], []
    for name, tree in doc["checkpointables"].items():
        for meta in tree["leaves"]:
            result.leaves += 1
            where = f"{name}{meta['path']}"
            if "packed" in meta:
                packed.append((where, meta))
            elif "array" in meta:
                arrays.append((where, meta))
    total = sum(meta["packed"][1] for _, meta in packed) + sum(loading.array_nbytes(meta) for _, meta in arrays)
    tracker = progress.Tracker(f"verifying {step_dir}", total)
    for where, meta in arrays:
        why = _verify_array(step_dir, meta, tracker)
        if why:
            result.damaged.append(Damage(where, why))
    if packed:
        result.damaged.extend(_verify_packed(step_dir, doc["packed"], packed, tracker))
    tracker.finish()
    result.nbytes = tracker.done_bytes
    return result


def _verify_orbax(step_dir: Path) -> VerifyResult:
    """Reads every array of a step Orbax wrote (tensorstore checks what Orbax's format records: the
    crc32c of each zarr3 shard index, the zstd frames); its metadata must parse as a load parses it."""
    result = VerifyResult(step_dir, formats.step_of(step_dir, {}))
    try:
        step = orbax.Step(step_dir)
    except (CheckpointCorruptedError, UnsupportedLayoutError) as e:
        result.damaged.append(Damage(step_dir.name, str(e)))
        return result
    result.leaves = sum(len(doc["leaves"]) for doc in step.trees.values())
    for where, nbytes, why in step.check_arrays():
        result.nbytes += nbytes
        if why:
            result.damaged.append(Damage(where, why))
    return result


def _chunk_boxes(shape: list[int], chunk_shape: list[int]) -> Iterator[tuple[slice, ...]]:
    """The index of each chunk of a regular grid, in C order (one empty index for a 0-d array)."""
    starts = itertools.product(*(range(0, dim, step) for dim, step in zip(shape, chunk_shape)))
    for start in starts:
        yield tuple(slice(s, min(s + c, dim)) for s, c, dim in zip(start, chunk_shape, shape))


def _verify_array(step_dir: storage.Location, meta: dict, tracker: progress.Tracker) -> str | None:
    """Reads a large leaf chunk by chunk; the first damage found, or None.

    Tensorstore checks that each chunk exists, has its size and (for arrays written with the crc32c
    codec) its crc32c; chunks listed in ``chunk_crc32`` are checked here against their CRC32.
    """
    spec = meta["array"]
    metadata = spec["metadata"]
    boxes = list(_chunk_boxes(metadata["shape"], metadata["chunk_grid"]["configuration"]["chunk_shape"]))
    expected = meta.get("chunk_crc32")
    if expected is not None and len(expected) != len(boxes):
        return f"{fmt.TREE} lists {len(expected)} chunk checksums for {len(boxes)} chunks"
    try:
        why = _check_zarr_json(step_dir, spec, meta)
        if why:
            return why
        store = storage.open_for_read(storage.resolve_kvstore(spec, step_dir))
        pending: collections.deque = collections.deque()
        for index, box in enumerate(boxes):
            pending.append((index, store[box].read()))
            if len(pending) >= _IN_FLIGHT:
                why = _check_chunk(*pending.popleft(), expected, tracker)
                if why:
                    return why
        while pending:
            why = _check_chunk(*pending.popleft(), expected, tracker)
            if why:
                return why
    except ValueError as e:
        return str(e)
    return None


def _check_zarr_json(step_dir: storage.Location, spec: dict, doc: dict) -> str | None:
    """Why a local array's zarr.json is not the one saved (its CRC32 in tree.json), or None."""
    if not isinstance(step_dir, Path) or "zarr_json_crc32" not in doc:
        return None
    return chunks.check_metadata(storage.local_array_dir(spec, step_dir), doc)


def _check_chunk(index: int, read: Any, expected: list[int] | None, tracker: progress.Tracker) -> str | None:
    """Waits for one chunk's read; why it is damaged, or None."""
    data = read.result()
    tracker.advance(data.nbytes)
    if expected is not None and zlib.crc32(data.reshape(-1).view(np.uint8)) != expected[index]:
        return f"chunk {index} of its array does not match its CRC32 in {fmt.TREE}"
    return None


def _verify_packed(step_dir: storage.Location, packed_doc: dict, leaves: list[tuple[str, dict]],
                   tracker: progress.Tracker) -> list[Damage]:
    """Streams the packed array chunk by chunk, computing each leaf's CRC32 across chunk borders."""
    spec = packed_doc["spec"]
    window = spec["metadata"]["chunk_grid"]["configuration"]["chunk_shape"][0]
    leaves = sorted(leaves, key=lambda item: item[1]["packed"][0])
    try:
        why = _check_zarr_json(step_dir, spec, packed_doc)
        if why:
            raise ValueError(why)
        store = storage.open_for_read(storage.resolve_kvstore(spec, step_dir))
    except ValueError as e:
        return [Damage(where, f"the packed array {fmt.PACKED}/ cannot be opened: {e}") for where, _ in leaves]
    damaged: list[Damage] = []
    partial: dict[int, int | str] = {}  # leaf index -> CRC32 so far, or why its bytes cannot be read
    first = 0  # the first leaf not finished yet
    for start in range(0, packed_doc["nbytes"], window):
        end = min(start + window, packed_doc["nbytes"])
        try:
            data, error = store[start:end].read().result(), ""
        except ValueError as e:
            data, error = None, f"its bytes in {fmt.PACKED}/ cannot be read: {e}"
        i = first
        while i < len(leaves) and leaves[i][1]["packed"][0] < end:
            where, meta = leaves[i]
            offset, nbytes = meta["packed"]
            state = partial.pop(i, 0)
            if isinstance(state, int):
                state = error or zlib.crc32(data[max(offset, start) - start: min(offset + nbytes, end) - start], state)
            if offset + nbytes > end:
                partial[i] = state
            elif isinstance(state, str):
                damaged.append(Damage(where, state))
            elif state != meta.get("crc32"):
                damaged.append(Damage(where, f"its bytes in {fmt.PACKED}/ do not match the CRC32 in {fmt.TREE}"))
            i += 1
        while first < len(leaves) and sum(leaves[first][1]["packed"]) <= end:
            first += 1
        tracker.advance(end - start)
    return damaged
