"""Copies a root of steps (Orbax's or ckpt's) into a new ckpt root, step by step (``ckpt convert``).

The root keeps its custom metadata; each step keeps its directory name, metrics, custom metadata and
times, and its trees as saved (jax arrays stay jax arrays, typed keys typed keys, an Orbax
``EmptyState``'s None stays None and is received by an ``EmptyState`` again). Each converted step is read back and compared with its source,
leaf by leaf and byte for byte, before the next one is converted.

Example::

    for done in convert_root("orbax_run", "ckpt_run"):
        print(done.step, done.leaves, done.nbytes)        # after each step is written and checked
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ckpt import formats, saving, storage
from ckpt import format as fmt
from ckpt import leaves as leaves_lib
from ckpt import tree as tree_lib
from ckpt.errors import CheckpointCorruptedError


@dataclasses.dataclass(frozen=True)
class Converted:
    """One converted step: its number, its directory in the new root, its leaves and their bytes.

    Example::

        done = next(convert_root("orbax_run", "ckpt_run"))
        print(f"step {done.step}: {done.leaves} leaves, {done.nbytes} bytes -> {done.path}")
    """

    step: int
    path: Path
    leaves: int
    nbytes: int


def steps_of(root: Path) -> list[tuple[int, Path]]:
    """The committed steps of either format under ``root`` (any step names), ascending."""
    found = []
    for name in storage.list_names(root):
        path = root / name
        if not name.endswith((fmt.TMP_SUFFIX, fmt.DELETING_SUFFIX)) and formats.is_step(path):
            step = formats.step_of(path, formats.info(path))
            if step is not None:
                found.append((step, path))
    return sorted(found)


def convert_root(source: str | os.PathLike, destination: str | os.PathLike) -> Iterator[Converted]:
    """Converts every step of ``source`` into ``destination`` (a new or empty directory), yielding each
    once it is written and checked against its source. The arguments are checked when it is called.

    Raises:
      ValueError: ``source`` or ``destination`` is not a local directory.
      FileExistsError: ``destination`` holds anything (before anything is written).
      FileNotFoundError: ``source`` holds no step.
      CheckpointCorruptedError: a converted step differs from its source (named with the key path);
        raised by the iterator.

    Example::

        ckpt.save("runs/old/1", {"w": np.ones(3)})
        assert [c.step for c in convert_root("runs/old", "runs/new")] == [1]
    """
    source, destination = storage.location(source), storage.location(destination)
    if not isinstance(source, Path) or not isinstance(destination, Path):
        raise ValueError("ckpt convert reads and writes local directories")
    steps = steps_of(source) if source.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{source} holds no checkpoint steps to convert")
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} is not empty; convert into a new directory")
    return _convert_steps(steps, source, destination)


def _convert_steps(steps: list[tuple[int, Path]], source: Path, destination: Path) -> Iterator[Converted]:
    storage.make_dir(destination)
    lock = storage.DirectoryLock(destination / fmt.LOCK)
    lock.acquire()
    try:
        custom = formats.root_custom_metadata(source)
        if custom is not None:
            storage.write_file_atomic(destination / fmt.ROOT_METADATA, fmt.root_metadata_bytes(custom))
        for step, path in steps:
            yield _convert_step(step, path, destination / path.name)
    finally:
        lock.release()


def _convert_step(step: int, path: Path, final: Path) -> Converted:
    info = formats.info(path)
    trees = formats.load_checkpointables(path, None)
    plan = saving.plan(trees, metrics=fmt.decode_json(info, "metrics"),
                       custom_metadata=fmt.decode_json(info, "custom_metadata"))
    plan.init_timestamp_nsecs = info.get("init_timestamp_nsecs") or plan.init_timestamp_nsecs
    plan.commit_timestamp_nsecs = info.get("commit_timestamp_nsecs")
    saving.StepWriter(plan, storage.temporary_for(final), final).run(step)
    count = _check_same(trees, formats.load_checkpointables(final, None), final)
    return Converted(step, final, count, plan.nbytes)


def _check_same(source: dict[str, Any], copy: dict[str, Any], where: Path) -> int:
    """Raises unless every leaf of ``copy`` is stored as its source's is (type, dtype, shape, bytes);
    returns the number of leaves."""
    count = 0
    for name, tree in source.items():
        want, got = tree_lib.flatten(tree), tree_lib.flatten(copy.get(name))
        if tree_lib.leaf_paths(want[0]) != tree_lib.leaf_paths(got[0]):
            raise CheckpointCorruptedError(f"{where}: the converted {name!r} has another tree than its source",
                                           path=where)
        for (path, a), (_, b) in zip(want[1], got[1]):
            host_a, host_b = leaves_lib.to_host(path, a), leaves_lib.to_host(path, b)
            if host_a.meta != host_b.meta or not _same_bytes(host_a.array, host_b.array):
                raise CheckpointCorruptedError(f"{where}: leaf {name}{tree_lib.keystr(path)} differs from its source",
                                               path=where, key_paths=(f"{name}{tree_lib.keystr(path)}",))
            count += 1
    return count


def _same_bytes(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
