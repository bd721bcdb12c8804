"""Copies a root of steps (Orbax's or ckpt's) into a new ckpt root, step by step (``ckpt convert``).

The root keeps its custom metadata; each step keeps its directory name, metrics, custom metadata and
times, and its trees as saved (their structure, namedtuples and pytree nodes with their names, an Orbax
``EmptyState``'s None, which an ``EmptyState`` receives again; jax arrays stay jax arrays with their sharding,
typed keys typed keys). Each converted step is read back and compared with its source, structure and
leaves, byte for byte, before the next one is converted.

Example::

    for done in convert_root("orbax_run", "ckpt_run"):
        print(done.step, done.leaves, done.nbytes)        # after each step is written and checked
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ckpt import formats, saving, storage
from ckpt import format as fmt
from ckpt import root as root_lib
from ckpt.path import step as step_lib
from ckpt import leaves as leaves_lib
from ckpt import tree as tree_lib
from ckpt.errors import CheckpointCorruptedError, CheckpointNotFoundError, StepNotFoundError, UnsupportedLayoutError


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
    """The steps of either format under ``root``, ascending, as a Checkpointer given the root's step name
    format (:func:`ckpt.path.step.name_format_of`) lists them: a user's directory named like a step, a
    symbolic link, a checkpoint named otherwise are not steps of the root and never read.

    Raises:
      CheckpointCorruptedError: a step of ckpt's there is damaged (its manifest missing or unreadable).
      StepNotFoundError: a step is set aside under another name (``5.ckpt-replaced``: a save with
        ``overwrite=True`` that a crash interrupted), which a Checkpointer opened on the root puts back and
        lists; a convert, which never changes its source, would leave it out.
      PermissionError: a directory named like a step, or like a step set aside (``5.ckpt-replaced``, with nothing
        at ``5``), is one this process may not read (it may be a step).
    """
    found, name_format = [], step_lib.name_format_of(root)
    for entry in root_lib.scan(root, name_format):
        if entry.kind in root_lib.LISTED:
            found.append((entry.step, entry.path))
        elif root_lib.is_damaged_step(entry):
            raise CheckpointCorruptedError(f"{root} holds step {entry.step}, which is damaged ({entry.holds}); "
                                           "move it away to convert the other steps", path=entry.path)
        elif root_lib.is_unreadable(entry) and (named := _named_like_a_step(entry, name_format)) is not None:
            raise PermissionError(errno.EACCES, f"{root} holds {entry.path.name}, {named}, which may be a step a "
                                  f"convert would leave out: {entry.holds}; convert as a user who may read it, or "
                                  "move it away", str(entry.path))
        elif entry.kind is root_lib.Kind.TEMPORARY and (final := storage.set_aside_step(entry.path)) is not None:
            raise StepNotFoundError(f"{root} holds step {final.name} set aside as {entry.path.name} by a save with "
                                    "overwrite=True that a crash interrupted, which a convert would leave out: open a "
                                    f"Checkpointer on {root} (it puts the step back), then convert",
                                    step=name_format.parse_name(final.name), path=root)
    return found


def _named_like_a_step(entry: root_lib.Entry, name_format: Any) -> str | None:
    """How ``entry``, a directory this process may not read, may be a step of its root, in words: named like one, or
    like one set aside by a save with ``overwrite=True`` that a crash interrupted (its step's name free); else None."""
    if entry.step is not None:
        return f"named like step {entry.step}"
    name = entry.path.name.removesuffix(fmt.REPLACED_SUFFIX)
    step = name_format.parse_name(name) if name != entry.path.name else None
    if step is None or os.path.lexists(entry.path.with_name(name)):
        return None
    return f"named like step {step} set aside by a save with overwrite=True that a crash interrupted"


def convert_root(source: str | os.PathLike, destination: str | os.PathLike) -> Iterator[Converted]:
    """Converts every step of ``source`` (a root, see :func:`steps_of`) into ``destination`` (a new or
    empty directory), yielding each once it is written and checked against its source. The arguments are
    checked when it is called. A convert that fails leaves ``destination`` as it found it: what it made
    there is removed. One killed before it could clean up (SIGKILL, SIGTERM) is resumed by running it
    again: the steps it committed are checked against their source and kept.

    Raises:
      ValueError: ``source`` or ``destination`` is not a local directory, or ``destination`` is ``source`` or
        lies in it, or is (or lies in) a directory named like a temporary of ckpt's.
      FileExistsError: ``destination`` holds anything but what a convert of the same steps left, or is not
        a directory (before anything is written).
      RootDirectoryError: ``destination`` lies below a file or a symbolic link loop (raised by the iterator,
        before anything is written).
      DirectoryLockedError: another writer (a Checkpointer, a convert) holds ``destination`` (raised by the
        iterator, before anything is written).
      FileNotFoundError: ``source`` holds no step; or it is one checkpoint, or a temporary of ckpt's, not a root;
        StepNotFoundError (one) when a step of it is set aside by a crash, to put back first (see :func:`steps_of`).
      CheckpointCorruptedError: a step of ``source`` is damaged (before anything is written), or a
        converted step differs from its source (named with the key path; raised by the iterator).
      StepNotFoundError: a step was deleted while it was converted (by a run saving there), or replaced by a
        symbolic link or a file since it was listed (raised by the iterator).
      UnsupportedLayoutError: a step holds a checkpointable that only its handler reads (an Orbax item of
        grain's, one a handler of :mod:`ckpt.custom` wrote), which cannot be copied, or metrics or custom
        metadata a ckpt manifest (or the root's metadata) cannot hold (Orbax's, nested or larger past its limits),
        or a leaf's saved sharding that is not JSON (a NaN; raised by the iterator).

    Example::

        ckpt.save("runs/old/1", {"w": np.ones(3)})
        assert [c.step for c in convert_root("runs/old", "runs/new")] == [1]
    """
    source, destination = storage.location(source), storage.location(destination)
    for what, path in (("source", source), ("destination", destination)):
        if not isinstance(path, Path):
            raise ValueError(f"ckpt convert reads and writes local directories, and its {what} {path} is on an "
                             "object store: convert a local copy of the root, into a local directory (then copy "
                             "that to the store if it is wanted there)")
    root_lib.check_outside_temporaries(destination, "the root a convert writes")
    if os.path.lexists(destination) and not destination.is_dir():
        raise FileExistsError(f"{destination} is {storage.describe(destination)}, not a directory; "
                              "convert into a new or empty directory")
    if source.is_dir() and formats.is_step(source):
        try:
            root_lib.check_committed(source)
        except CheckpointNotFoundError as e:
            raise FileNotFoundError(str(e)) from None
        raise FileNotFoundError(f"{source} is one checkpoint, not a root of steps; convert its root "
                                f"({source.parent}), the directory that holds the steps")
    steps = steps_of(source) if source.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{source} holds no checkpoint steps to convert")
    real_source, real_destination = Path(os.path.realpath(source)), Path(os.path.realpath(destination))
    if real_destination.is_relative_to(real_source):  # (an entry of the root: at a step's name, in that step's way)
        where = "is the root being converted" if real_destination == real_source else (
            f"lies in the root being converted ({source})")
        raise ValueError(f"{destination} {where}; convert into a new directory outside it")
    done = _converted_before(destination, steps, source) if destination.exists() else set()
    return _convert_steps(steps, source, destination, done)


def _converted_before(destination: Path, steps: list[tuple[int, Path]], source: Path) -> set[str]:
    """The names of the steps a convert of the same source, killed before it could clean up, committed in
    ``destination``: the rest of what it may have left there is ckpt's own (its lock, the root's metadata
    it copied from ``source`` or was copying, a temporary of the step it was writing, a step it was deleting
    as it cleaned up). Empty for an empty directory.

    Raises:
      FileExistsError: ``destination`` holds anything else (another run's root metadata included).
    """
    names = {path.name for _, path in steps}
    written = storage.atomic_temporary(destination / fmt.ROOT_METADATA).name  # (killed before its rename)
    done = set()
    for name in sorted(os.listdir(destination)):
        entry = destination / name
        if name in names and root_lib.classify(entry, None).kind is root_lib.Kind.STEP:
            done.add(name)
        elif name in (fmt.ROOT_METADATA, written) and _copied_root_metadata(entry, source, whole=name != written):
            continue
        elif name != fmt.LOCK and not root_lib.is_temporary(entry, (fmt.TMP_SUFFIX, fmt.DELETING_SUFFIX)):
            raise FileExistsError(f"{destination} is not empty (it holds {name!r}, not left by a convert of these "
                                  "steps); convert into a new directory")
    return done


def _copied_root_metadata(path: Path, source: Path, *, whole: bool) -> bool:
    """Whether ``path`` (a destination's ckpt-root.json) holds what a convert of ``source`` writes there; not
    ``whole``: or the start of it (its temporary, which a convert killed while writing it left partly written)."""
    custom = formats.root_custom_metadata(source)
    try:
        if custom is None:
            return False
        found, expected = storage.read_json_bytes(path), fmt.root_metadata_bytes(custom)
    except (OSError, ValueError):  # not a file ckpt reads, or metadata a convert could not have written
        return False
    return found == expected if whole else expected.startswith(found)


def _convert_steps(steps: list[tuple[int, Path]], source: Path, destination: Path, done: set[str]) -> Iterator[Converted]:
    made = [p for p in (destination, *destination.parents) if not os.path.lexists(p)]  # innermost first
    root_lib.make(destination)
    lock = storage.DirectoryLock(destination / fmt.LOCK)
    made_lock = not os.path.lexists(lock.path)  # (a finished convert's, or a Checkpointer's, is kept)
    lock.acquire()
    written: list[Path] = []  # what this convert wrote in destination, removed if it fails
    try:
        _remove_deletions_left(destination)
        custom = formats.root_custom_metadata(source)
        if custom is not None and not os.path.lexists(destination / fmt.ROOT_METADATA):  # (a resumed convert's)
            with _storable(source, "the root's custom metadata"):
                data = fmt.root_metadata_bytes(custom)
            written.append(destination / fmt.ROOT_METADATA)
            storage.write_file_atomic(written[-1], data)
        for step, path in steps:
            root_lib.check_still_a_step(path, step)  # (a link put at its name since the listing is never read)
            if path.name in done:  # committed by the convert this one resumes: checked again, kept
                yield _check_step(step, path, destination / path.name)
                continue
            yield _convert_step(step, path, destination / path.name, written)
    except (Exception, KeyboardInterrupt):
        _undo(written, lock if made_lock else None, made)
        raise
    finally:
        lock.release()


@contextlib.contextmanager
def _storable(where: Path, what: str) -> Iterator[None]:
    """Raises the ValueError of metadata ckpt cannot store (Orbax's JSON: nested deeper, or larger, than a
    manifest or ckpt-root.json holds) as UnsupportedLayoutError naming ``where`` (a step, or the root) and ``what``."""
    try:
        yield
    except ValueError as e:
        raise UnsupportedLayoutError(f"{where}: ckpt convert cannot store {what} as it is: {e}", path=where) from None


def _remove_deletions_left(destination: Path) -> None:
    """Removes the steps a convert killed while it cleaned up after a failure was deleting (see :func:`_undo`)."""
    for name in os.listdir(destination):
        if root_lib.is_temporary(destination / name, (fmt.DELETING_SUFFIX,)):
            storage.remove_owned(destination / name)


def _undo(written: list[Path], lock: storage.DirectoryLock | None, made: list[Path]) -> None:
    """Removes what a failed convert wrote: its steps (deleted as a Checkpointer deletes, renamed aside first, so
    that a convert killed meanwhile, at a second Ctrl-C, leaves no half-removed step to resume on; one never
    committed is already gone), the root's metadata, the lock when it made it, and the directories it created
    while they are empty."""
    for path in reversed(written):
        with contextlib.suppress(OSError):  # (ForeignEntryError too: what ckpt did not make stays)
            os.unlink(path) if path.name == fmt.ROOT_METADATA else root_lib.delete_step(path, None)
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock.path)  # still held: no other convert or Checkpointer took it meanwhile
    for directory in made:
        try:
            os.rmdir(directory)
        except OSError:
            break  # not empty: something else is there now


def _convert_step(step: int, path: Path, final: Path, written: list[Path]) -> Converted:
    """Converts one step of the source into ``final``, added to ``written`` once this convert committed it (not
    before: what took its name meanwhile, which the commit refuses, is not the convert's to remove)."""
    with root_lib.reading(path, step):  # a step a run saving there deletes meanwhile: StepNotFoundError
        info = formats.info(path)
        trees = _source_trees(path)
    with _storable(path, f"step {step}"):
        plan = saving.plan(trees, metrics=fmt.decode_json(info, "metrics"),
                           custom_metadata=fmt.decode_json(info, "custom_metadata"))
    plan.init_timestamp_nsecs = info.get("init_timestamp_nsecs") or plan.init_timestamp_nsecs
    plan.commit_timestamp_nsecs = info.get("commit_timestamp_nsecs")
    saving.StepWriter(plan, storage.temporary_for(final), final).run(step)
    written.append(final)
    count = _check_same(trees, _as_saved(final), final)
    return Converted(step, final, count, plan.nbytes)


def _check_step(step: int, path: Path, final: Path) -> Converted:
    """A step converted before, checked against its source as :func:`_convert_step` checks its copy.

    Raises:
      FileExistsError: the step is not a copy of its source (a convert of another run left it).
    """
    with root_lib.reading(path, step):
        trees = _source_trees(path)
    copy = _as_saved(final)
    try:
        count = _check_same(trees, copy, final)
    except CheckpointCorruptedError as e:
        raise FileExistsError(f"{final.parent} is not empty: its step {final.name} is not a copy of {path} ({e}), "
                              "so no convert of these steps left it; convert into a new directory") from None
    return Converted(step, final, count, saving.plan(trees).nbytes)


def _source_trees(path: Path) -> dict[str, Any]:
    """The trees of a step of the source, as saved (:func:`_as_saved`).

    Raises:
      UnsupportedLayoutError: a checkpointable of the step was written by a handler or by the object itself
        (:mod:`ckpt.custom`): only that handler reads it, so it can be neither copied nor checked.
    """
    unread = formats.unread_handled(formats.handled(path))
    if unread:
        raise UnsupportedLayoutError(f"{path}: ckpt convert copies trees only, and " + "; ".join(
            f"checkpointable {name!r} is {why}" for name, why in unread.items()) + "; move the step away to "
            "convert the others", path=path)
    return _as_saved(path)


_SAVED_AS = ("type", "sharding", "impl", "key_shape")  # what a framework's leaf was saved as, beyond its bytes
_FRAMEWORK_TYPES = ("jax", "jax_key", "torch")


def _as_saved(step_dir: Path) -> dict[str, tree_lib.Stored]:
    """The trees of ``step_dir``, loaded without an abstract tree, as the step stores them: each with its
    saved structure (namedtuples and pytree nodes, which such a load gives as dicts or None), and each jax
    array, typed key and torch tensor as the leaf it was saved as (a ``HostLeaf``: its type, saved sharding
    and key implementation, and its bytes), which this process may not be able to restore: without jax or
    torch it loads as numpy, without the saved mesh's devices on the default device (without the load's
    warning that it is: the copy keeps the saved sharding)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ckpt: the saved sharding", category=UserWarning)
        trees = formats.load_checkpointables(step_dir, None)
    docs = formats.trees(step_dir, list(trees))
    out = {}
    for name, tree in trees.items():
        node = tree_lib.from_json(docs[name]["tree"])
        leaves = zip(tree_lib.leaf_paths(node), tree_lib.stored_leaves(node, tree), docs[name]["leaves"])
        out[name] = tree_lib.Stored(node, [_saved_leaf(step_dir, name, path, leaf, saved)
                                           for path, leaf, saved in leaves])
    return out


def _saved_leaf(step_dir: Path, name: str, path: tree_lib.KeyPath, leaf: Any, saved: dict) -> Any:
    """The leaf at ``path`` of checkpointable ``name`` as saved in ``step_dir``.

    Raises:
      UnsupportedLayoutError: what the leaf was saved as is not JSON a ckpt step can hold (a NaN in its sharding).
    """
    if saved.get("type") not in _FRAMEWORK_TYPES:
        return leaf
    host = leaves_lib.to_host(path, leaf)
    meta = {key: value for key, value in host.meta.items() if key not in _SAVED_AS}
    kept = {key: saved[key] for key in _SAVED_AS if key in saved}
    with _storable(step_dir, f"leaf {name}{tree_lib.keystr(path)}"):
        fmt.to_json_bytes(kept, f"what it was saved as ({', '.join(kept)})")
    return leaves_lib.HostLeaf({**meta, **kept}, host.array)


def _check_same(source: dict[str, Any], copy: dict[str, Any], where: Path) -> int:
    """Raises unless every leaf of ``copy`` is stored as its source's is (type, dtype, shape, bytes);
    returns the number of leaves."""
    count = 0
    for name, tree in source.items():
        want, got = tree_lib.flatten(tree), tree_lib.flatten(copy.get(name))
        if tree_lib.to_text(want[0]) != tree_lib.to_text(got[0]):
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
