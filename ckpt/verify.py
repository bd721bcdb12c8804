"""Re-reads a committed step and checks every byte of its data, leaf by leaf and chunk by chunk.

What is checked: the manifest and its own CRC32, tree.json against the CRC32 in the manifest, every
packed leaf against its CRC32 in tree.json, every chunk of every large leaf (it exists, has its size,
and matches its ``chunk_crc32`` in tree.json, or the crc32c that tensorstore's zarr3 codec stored with
it), and each array's zarr.json against its CRC32 in tree.json (a local step) and the spec there; and
every chunk's word sum (``chunk_sum64``, of the packed array and of large leaves), the check a load
makes, so that a step that passes ``verify`` loads; and, where jax is installed, that it takes each saved PRNG
key's implementation and key data's shape, as a load does.
Memory stays bounded by two chunks (at most 2 x 16 MiB for large leaves, 2 x 4 MiB for packed ones).
A step Orbax wrote is checked by reading every array of it through tensorstore, one at a time. A
checkpointable a handler wrote (:mod:`ckpt.custom`) is named in ``unchecked``: no checksum covers its files.

Example::

    from ckpt.verify import verify_step
    result = verify_step("runs/exp1/100")
    for damage in result.damaged:
        print(damage.where, damage.why)     # state['params']['w'] chunk 3 of its array does not match ...
"""
from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from ckpt import chunks
from ckpt import leaves as leaves_lib
from ckpt import format as fmt
from ckpt import formats, loading, objectstore, orbax, progress, root, storage
from ckpt.errors import CheckpointCorruptedError, InvalidLayoutError, UnsupportedLayoutError

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
    unchecked: dict[str, str] = dataclasses.field(default_factory=dict)  # an item only its handler reads -> why

    @property
    def ok(self) -> bool:
        """True when nothing is damaged."""
        return not self.damaged


def verify_step(step_dir: str | os.PathLike | storage.Location, *, step: int | None = None) -> VerifyResult:
    """Re-reads one step directory and checks every checksum; damage is reported, not raised.

    ``step`` is the number the step is listed under in its root (see :func:`ckpt.path.step.find_all`);
    by default the one in its manifest, else the digits ending its directory's name.
    Progress is reported on the ``ckpt.progress`` logger when it runs long (see :mod:`ckpt.progress`).

    Raises:
      StepNotFoundError: the step was deleted while it was checked (by another process's garbage
        collection): what could not be read is gone, not damaged; or, given ``step``, its directory is
        a symbolic link or a file now; StepReplacedError (one) when it was saved again with
        ``overwrite=True`` meanwhile.

    Example::

        result = verify_step("runs/exp1/100")
        assert result.ok, [d.where for d in result.damaged]
    """
    step_dir = storage.location(step_dir)
    if step is not None:  # a listed step: never checked through a link put at its name since
        root.check_still_a_step(step_dir, step)
    with root.reading(step_dir, step) as gone:
        result = _verify_orbax(step_dir) if formats.is_orbax(step_dir) else _verify(step_dir)
    if step is not None:
        result.step = step
    error = result.damaged and gone(f"{result.damaged[0].where}: {result.damaged[0].why}")
    if error:
        raise error
    return result


def _verify(step_dir: storage.Location) -> VerifyResult:
    """Checks a step ckpt wrote (see the module's docstring)."""
    result = VerifyResult(step_dir, formats.step_of(step_dir, {}))
    try:
        manifest = loading.read_manifest(step_dir)
    except (CheckpointCorruptedError, InvalidLayoutError) as e:
        result.damaged.append(Damage(fmt.MANIFEST, str(e)))
        return result
    result.step = manifest.get("step")
    try:
        doc = loading.read_tree(step_dir, manifest)
    except CheckpointCorruptedError as e:
        result.damaged.append(Damage(fmt.TREE, str(e)))
        return result
    result.unchecked = formats.unread_handled(doc.get("handled", {}))
    packed, arrays = [], []
    for name, tree in doc["checkpointables"].items():
        for meta in tree["leaves"]:
            result.leaves += 1
            where = f"{name}{meta['path']}"
            why = meta["type"] == "jax_key" and leaves_lib.refused_keys(meta)
            if why:
                result.damaged.append(Damage(where, why))
            if "packed" in meta:
                packed.append((where, meta))
            elif "array" in meta:
                arrays.append((where, meta))
    total = sum(meta["packed"][1] for _, meta in packed) + sum(loading.array_nbytes(meta) for _, meta in arrays)
    tracker = progress.Tracker(f"verifying {step_dir}", total)
    files = storage.LocalFiles(step_dir) if isinstance(step_dir, Path) else None
    for where, meta in arrays:
        why = _verify_array(step_dir, files, meta, tracker)
        if why:
            result.damaged.append(Damage(where, why))
    if packed:
        result.damaged.extend(_verify_packed(step_dir, files, doc["packed"], packed, tracker))
    tracker.finish()
    result.nbytes = tracker.done_bytes
    return result


def _verify_orbax(step_dir: Path) -> VerifyResult:
    """Reads every array of a step Orbax wrote (tensorstore checks what Orbax's format records: the
    crc32c of each zarr3 shard index, the zstd frames); its metadata must parse as a load parses it, and
    as a listing reads it (metrics, times). An item ckpt does not read (a grain iterator's) is named in
    ``unchecked``, not damaged."""
    result = VerifyResult(step_dir, formats.step_of(step_dir, {}))
    try:
        orbax.info(step_dir)
        step = orbax.Step(step_dir, skip_unreadable=True)
    except (CheckpointCorruptedError, UnsupportedLayoutError) as e:
        result.damaged.append(Damage(step_dir.name, str(e)))
        return result
    result.unchecked = step.unreadable
    result.leaves = sum(len(doc["leaves"]) for doc in step.trees.values())
    for where, nbytes, why in step.check_arrays():
        result.nbytes += nbytes
        if why:
            result.damaged.append(Damage(where, why))
    return result


def _verify_array(step_dir: storage.Location, files: storage.LocalFiles | None, meta: dict,
                  tracker: progress.Tracker) -> str | None:
    """Reads a large leaf chunk by chunk; the first damage found, or None.

    In a local step, its zarr.json and every chunk file are looked at first (each a regular file of its
    size, reached through no link); tensorstore checks that each chunk exists, has its size and (for
    arrays written with the crc32c codec) its crc32c; chunks listed in ``chunk_crc32`` are checked
    here against their CRC32.
    """
    spec = meta["array"]
    expected = meta.get("chunk_crc32"), meta.get("chunk_sum64")
    try:
        with objectstore.access_errors(f"verifying {step_dir}"):  # (an OSError: no damage)
            why = files and chunks.check_array_files(_source(spec, step_dir, files), meta)
            if why:
                return why
            store = storage.open_for_read(storage.resolve_kvstore(spec, step_dir))
            pending: collections.deque = collections.deque()
            for index, (box, _, _) in enumerate(chunks.grid(spec["metadata"])):
                pending.append((index, store[box].read()))
                if len(pending) >= _IN_FLIGHT:
                    why = _check_chunk(*pending.popleft(), *expected, tracker)
                    if why:
                        return why
            while pending:
                why = _check_chunk(*pending.popleft(), *expected, tracker)
                if why:
                    return why
    except ValueError as e:
        return str(e)
    return None


def _source(spec: dict, step_dir: Path, files: storage.LocalFiles) -> chunks.LocalArray:
    return chunks.LocalArray(storage.local_array_dir(spec, step_dir), files)


def _check_chunk(index: int, read: Any, crcs: list[int] | None, sums: list[int] | None,
                 tracker: progress.Tracker) -> str | None:
    """Waits for one chunk's read; why it is damaged (its CRC32 or its word sum in tree.json), or None."""
    data = read.result()
    tracker.advance(data.nbytes)
    raw = data.reshape(-1).view(np.uint8)
    if crcs is not None and fmt.crc32(raw) != crcs[index]:
        return f"chunk {index} of its array does not match its CRC32 in {fmt.TREE}"
    if sums is not None and chunks.sum64(raw) != sums[index]:
        return f"chunk {index} of its array does not match its checksum (chunk_sum64) in {fmt.TREE}"
    return None


def _verify_packed(step_dir: storage.Location, files: storage.LocalFiles | None, packed_doc: dict,
                   leaves: list[tuple[str, dict]], tracker: progress.Tracker) -> list[Damage]:
    """Checks each packed leaf's CRC32, reading the chunks that hold it one at a time, in offset order
    (a chunk shared by neighbours is read once). A chunk that cannot be read damages the leaves in it; one
    whose word sum is not its ``chunk_sum64`` (the check a load makes) though every leaf in it matches
    its CRC32 is damaged itself (between its leaves, or in tree.json)."""
    spec, sums = packed_doc["spec"], packed_doc.get("chunk_sum64")
    window = spec["metadata"]["chunk_grid"]["configuration"]["chunk_shape"][0]
    try:
        why = files and chunks.check_metadata(_source(spec, step_dir, files), packed_doc)
        if why:
            raise ValueError(why)
        with objectstore.access_errors(f"verifying {step_dir}"):
            store = storage.open_for_read(storage.resolve_kvstore(spec, step_dir))
    except ValueError as e:
        return [Damage(where, f"the packed array {fmt.PACKED}/ cannot be opened: {e}") for where, _ in leaves]
    held: tuple[int, Any, str] = (-1, None, "")  # the chunk read last: its index, bytes, why it cannot be read
    mismatched: set[int] = set()  # the chunks whose word sum is not their chunk_sum64

    def chunk(i: int) -> tuple[int, Any, str]:
        why = files and chunks.check_file(_source(spec, step_dir, files), f"c/{i}", window)
        if why:
            return i, None, f"its bytes in {fmt.PACKED}/ cannot be read: {why}"
        try:
            with objectstore.access_errors(f"verifying {step_dir}"):
                data = store[i * window: min((i + 1) * window, packed_doc["nbytes"])].read().result()
        except ValueError as e:
            return i, None, f"its bytes in {fmt.PACKED}/ cannot be read: {e}"
        tracker.advance(data.nbytes)
        if sums is not None and chunks.sum64(data) != sums[i]:
            mismatched.add(i)
        return i, data, ""

    damaged: list[Damage] = []
    hit: set[int] = set()  # the chunks that hold a leaf found damaged
    for where, meta in sorted(leaves, key=lambda item: item[1]["packed"][0]):
        offset, nbytes = meta["packed"]
        crc, why, spans = 0, "", range(offset // window, -(-(offset + nbytes) // window))
        for i in spans:
            held = held if held[0] == i else chunk(i)
            why = held[2]
            if why:
                break
            start = i * window
            crc = fmt.crc32(held[1][max(offset, start) - start: min(offset + nbytes, start + window) - start], crc)
        if why:
            damaged.append(Damage(where, why))
        elif crc != meta["crc32"]:
            damaged.append(Damage(where, f"its bytes in {fmt.PACKED}/ do not match the CRC32 in {fmt.TREE}"))
        else:
            continue
        hit.update(spans)
    why = f"its word sum does not match its chunk_sum64 in {fmt.TREE}, though every leaf in it matches its CRC32"
    return damaged + [Damage(f"{fmt.PACKED}/c/{i}", why) for i in sorted(mismatched - hit)]
