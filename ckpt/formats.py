"""A committed step directory in either format it may hold: ckpt's own (manifest.json), or Orbax's
(read in place by :mod:`ckpt.orbax`). Listing, loading, metadata and the CLI ask here, so that each
format keeps a reader of its own.

Example::

    from ckpt import formats
    if formats.is_orbax(step_dir):
        print("written by Orbax", formats.info(step_dir)["metrics"])
    trees = formats.load_checkpointables(step_dir, None)
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ckpt import format as fmt
from ckpt import custom, loading, objectstore, orbax, schema, storage
from ckpt.errors import CheckpointableNotFoundError, CheckpointCorruptedError, InvalidLayoutError
from ckpt.objectstore import ObjectPath

logger = logging.getLogger("ckpt")
# The names Orbax gives a step's one tree: a v0 CheckpointManager's single item, and v1's before "state". A lone
# "state" that an Orbax step lacks is read from its only item silently under these names; under another (an item
# beside which Orbax's delete(step, checkpointable_name="state") removed the state), with a warning.
_ORBAX_TREE_NAMES = frozenset({"default", "pytree"})


def is_step(path: storage.Location) -> bool:
    """Whether ``path`` is a committed step directory of either format."""
    return (path / fmt.MANIFEST).exists() or orbax.is_step(path)


def has_step_files(path: Path) -> bool:
    """Whether the local ``path`` holds the files of a step directory of either format, committed or not:
    ckpt's manifest.json beside its tree.json, the step ckpt's (its marker, or a manifest ckpt reads: a
    project's own manifest.json and tree.json are not a step), or Orbax's (see :func:`ckpt.orbax.has_step_files`).
    A few stats."""
    ckpt_files = os.path.isfile(path / fmt.MANIFEST) and os.path.isfile(path / fmt.TREE)
    return (ckpt_files and (storage.is_marked(path) or _reads_as_manifest(path))) or orbax.has_step_files(path)


def first_holding_a_step(paths: list[ObjectPath]) -> ObjectPath | None:
    """The first of ``paths`` on an object store that holds a step of ckpt's, committed or not (its marker: ckpt
    removes what lies below it with it), or committed by an earlier ckpt (a manifest ckpt reads beside its
    tree.json); None when none does. Two requests a path, all at once. A path the store does not let this
    process read is taken as holding none (a bucket's policy may grant the root's prefix alone)."""
    def holds(request: tuple[ObjectPath, str]) -> bool:
        try:
            return request[0].holds(request[1])
        except PermissionError:
            return False

    found = objectstore.each(holds, [(path, name) for path in paths for name in (fmt.MARKER, fmt.MANIFEST)])
    return next((path for path, marked, manifest in zip(paths, found[::2], found[1::2])
                 if marked or (manifest and path.holds(fmt.TREE) and _reads_as_manifest(path))), None)


def _reads_as_manifest(path: storage.Location) -> bool:
    """Whether ``path``'s manifest.json is a ckpt manifest (read and validated)."""
    try:
        loading.read_manifest(path)
    except (CheckpointCorruptedError, InvalidLayoutError, OSError):
        return False
    return True


def _by_orbax(step_dir: storage.Location) -> bool:
    """A step Orbax wrote: asked only of directories without ckpt's manifest (a root's listing asks for
    every step)."""
    return isinstance(step_dir, Path) and not (step_dir / fmt.MANIFEST).exists() and orbax.is_step(step_dir)


def step_of(path: storage.Location, info: dict) -> int | None:
    """The step number of a step directory: from its metadata, else the digits ending its name."""
    step = info.get("step")
    if isinstance(step, int):
        return step
    digits = path.name.rsplit("_", 1)[-1]
    return int(digits) if digits.isascii() and digits.isdigit() else None  # ('²' is a digit to isdigit)


def is_orbax(step_dir: storage.Location) -> bool:
    """Whether the step directory was written by Orbax."""
    return _by_orbax(step_dir)


def is_unread_but_whole(step_dir: storage.Location) -> bool:
    """Whether a step this ckpt cannot read (see ``root.is_damaged_step``) is whole all the same, for all it can tell: a
    newer ckpt wrote it, or Orbax metadata that nests deeper than ckpt reads (Orbax reads it), or its metadata is a file
    this process may not read (another user's)."""
    if _by_orbax(step_dir):
        return orbax.is_whole(step_dir)
    return schema.written_by_newer(step_dir) or storage.may_not_read(step_dir / fmt.MANIFEST)


def info(step_dir: storage.Location) -> dict:
    """The step's manifest (ckpt) or the same fields read from Orbax's files (``"format": "orbax"``):
    metrics, ``init_timestamp_nsecs``, ``commit_timestamp_nsecs``, custom_metadata.

    Raises:
      CheckpointCorruptedError: the step's metadata cannot be read.
    """
    return orbax.info(step_dir) if _by_orbax(step_dir) else loading.read_manifest(step_dir)


def trees(step_dir: storage.Location, names: list[str] | None = None) -> dict[str, dict]:
    """The step's checkpointables (those in ``names``, or all): name -> ``{"tree", "leaves"}`` as in tree.json."""
    if _by_orbax(step_dir):
        return orbax.Step(step_dir, names).trees
    found = loading.read_tree(step_dir, loading.read_manifest(step_dir))["checkpointables"]
    missing = [n for n in names or () if n not in found]
    if missing:
        raise CheckpointableNotFoundError(step_dir, missing, list(found))
    return found if names is None else {n: found[n] for n in names}


def readable_trees(step_dir: storage.Location) -> tuple[dict[str, dict], dict[str, str]]:
    """:func:`trees` of every checkpointable ckpt reads without a program's handlers, and the others, name ->
    why: an Orbax item written by a handler ckpt does not read (a grain iterator's), and in ckpt's steps
    those a handler or the object itself wrote (:func:`unread_handled`)."""
    if _by_orbax(step_dir):
        step = orbax.Step(step_dir, skip_unreadable=True)
        return step.trees, step.unreadable
    doc = loading.read_tree(step_dir, loading.read_manifest(step_dir))
    return doc["checkpointables"], unread_handled(doc.get("handled", {}))


def unread_handled(records: dict[str, dict]) -> dict[str, str]:
    """Why ckpt's own readers (``ckpt show``, ``verify``, ``convert``) leave the checkpointables a handler or
    the object itself wrote (:func:`handled`'s records) unread, name -> why: only that handler reads them,
    in a program holding it."""
    return {name: f"written by {record['handler']}, which only that handler reads (in a program that registers it)"
            if record.get("handler") else "saved by the object itself (a StatefulCheckpointable), which only that "
            "object reads (passed to a load as the object to load into)" for name, record in records.items()}


def metadata_trees(step_dir: storage.Location) -> dict[str, Any]:
    """Each checkpointable's tree with :class:`ckpt.LeafMetadata` leaves; None for an item Orbax's JsonHandler
    wrote, as Orbax reports the metadata of one."""
    names = None
    if _by_orbax(step_dir):  # (an item only its handler reads: :func:`handled`)
        names = [name for name in orbax.items(step_dir) if name not in orbax.handled(step_dir)]
    return {name: None if doc.get("json") else loading.tree_metadata(doc)
            for name, doc in trees(step_dir, names).items()}


def handled(step_dir: storage.Location) -> dict[str, dict]:
    """The step's checkpointables saved by handlers (:mod:`ckpt.custom`): name -> record (of Orbax's, those
    written by a handler ckpt does not read itself: :func:`ckpt.orbax.handled`)."""
    if _by_orbax(step_dir):
        return orbax.handled(step_dir)
    return loading.read_tree(step_dir, loading.read_manifest(step_dir)).get("handled", {})


def load_checkpointables(step_dir: storage.Location, abstract: dict[str, Any] | None, *,
                         partial_load: bool = False, registry: Any = None) -> dict[str, Any]:
    """Loads the named checkpointables of a step of either format (all of them when ``abstract`` is None;
    ``registry``: the handlers of custom checkpointables, see :mod:`ckpt.custom`)."""
    if _by_orbax(step_dir):
        abstract = loading.unwrap(abstract)
        records = orbax.handled(step_dir)
        wanted = {name: None for name in orbax.items(step_dir)} if abstract is None else abstract
        customs = {name: target for name, target in wanted.items()
                   if name in records and custom.loads(name, records[name], target, registry)}
        if customs:  # an item ckpt reads only through its handler, or the object that saved it
            rest = {name: target for name, target in wanted.items() if name not in customs}
            trees = load_checkpointables(step_dir, rest, partial_load=partial_load) if rest else {}
            return {**trees, **custom.load(step_dir, records, customs, registry)}
        only = None if abstract is None else loading.only_tree(orbax.items(step_dir), {}, abstract)
        if only is not None:  # a lone "state" the step lacks: its only item (a v0 CheckpointManager's default/)
            (name, tree), = abstract.items()
            if name != fmt.AUTO and only not in _ORBAX_TREE_NAMES:
                logger.warning("ckpt: %s has no checkpointable %r (Orbax's Checkpointer.load raises here; its delete "
                               "may have removed it): loading its only one, %r, in its place (pass "
                               "checkpointable_name=%r to load it by name)", step_dir, name, only, only)
            return {name: orbax.Step(step_dir, [only]).load({only: tree}, partial_load=partial_load)[only]}
        return orbax.Step(step_dir, None if abstract is None else list(abstract)).load(abstract, partial_load=partial_load)
    return loading.load_checkpointables(step_dir, abstract, partial_load=partial_load, registry=registry)


def has_root_metadata(root: storage.Location) -> bool:
    """Whether the root holds its metadata, ckpt's or Orbax's: the first Checkpointer's, which a later one
    given other custom metadata keeps (as Orbax does)."""
    return storage.exists(root / fmt.ROOT_METADATA) or (isinstance(root, Path) and orbax.has_root_metadata(root))


def root_custom_metadata(root: storage.Location) -> Any:
    """The custom metadata of a root: ckpt's (``ckpt-root.json``), else Orbax's (see
    :func:`ckpt.orbax.root_custom_metadata`).

    Raises:
      CheckpointCorruptedError: the file is not what ckpt (or Orbax) writes there: not a regular file,
        not JSON, not a JSON object.
    """
    path = root / fmt.ROOT_METADATA
    try:
        doc = json.loads(storage.read_json_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        return orbax.root_custom_metadata(root) if isinstance(root, Path) else None
    except (ValueError, RecursionError, OSError) as e:  # a link, a FIFO, too large, not UTF-8 or not JSON
        raise CheckpointCorruptedError(f"{path} cannot be read as the root's metadata ({type(e).__name__}: {e})",
                                       path=path) from None
    if not isinstance(doc, dict):
        raise CheckpointCorruptedError(f"{path} is not a JSON object, as the root's metadata is", path=path)
    return fmt.decode_json(doc, "custom_metadata")
