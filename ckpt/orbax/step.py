"""One Orbax step directory: its items, its metrics and times, and loading its items as ckpt loads a step.

Layouts read (Orbax 0.5 and later, local file systems)::

    <step>/_CHECKPOINT_METADATA    item_handlers (item name -> handler class), timestamps, custom metadata
    <step>/commit_success.txt
    <step>/<item>/                 v1 training.Checkpointer: state/ and other checkpointables; v0
                                   CheckpointManager: default/ (one item) or one directory per named item
    <step>/metrics/metrics         the metrics (JSON), a checkpointable of their own
    <step>/_METADATA, ...          a v0 direct checkpoint (``StandardCheckpointer().save(path, tree)``): one
                                   tree in the directory itself, loaded as ``state``

An item written by a PyTree handler (``PyTreeHandler``, ``PyTreeCheckpointHandler``,
``StandardCheckpointHandler``) or by ``ArrayCheckpointHandler`` (one array) is read by
:mod:`ckpt.orbax.pytree`; a JSON item (``JsonHandler``,
``JsonCheckpointHandler``) is its one JSON file. An item of any other handler named in the step's metadata
(:func:`handled`) is loaded by :mod:`ckpt.custom`, through that handler registered in this program or the
object that saved itself; without one, and for an item of no handler ckpt recognises, loading raises
UnsupportedLayoutError naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ckpt import leaves as leaves_lib
from ckpt import format as fmt
from ckpt import loading, schema, storage
from ckpt import tree as tree_lib
from ckpt.errors import (CheckpointableNotFoundError, CheckpointCorruptedError, CheckpointNotFoundError,
                         UnsupportedLayoutError)
from ckpt.orbax import files
from ckpt.orbax.pytree import MAX_DEPTH, ArraySource, PyTreeItem, is_bare_array

CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
COMMIT_SUCCESS = "commit_success.txt"
METRICS = "metrics"
_PYTREE_HANDLERS = ("PyTreeHandler", "PyTreeCheckpointHandler", "StandardCheckpointHandler")
_ARRAY_HANDLER = "ArrayCheckpointHandler"  # one array, in a PyTree item of one leaf
_JSON_HANDLERS = ("JsonHandler", "JsonCheckpointHandler", "MetricsHandler")
_STATEFUL_HANDLER = "StatefulCheckpointableHandler"  # the item of an object that saved itself


def is_step(path: Any) -> bool:
    """Whether ``path`` is a local directory Orbax wrote as a committed step: it has the
    ``commit_success.txt`` Orbax writes, or ``_CHECKPOINT_METADATA`` (regular files) that does not say the
    save never committed (see :func:`check_checkpoint`), or (Orbax before 0.5) an item directory with
    Orbax's files (see :func:`_is_item`). A step of a layout ckpt cannot read is still one: loading it
    says so, and the root never looks empty. Anything less (a user's directory, a save Orbax never
    committed, one item of a step, such as ``<step>/state``, which Orbax does not load as a checkpoint
    either, or a JSON item or the metrics, which hold a ``commit_success.txt`` of their own: see
    :func:`_is_named_item`) is not a step: ckpt never lists, overwrites or deletes it. Nor is a save Orbax
    began and did not rename to its step's name (:func:`is_temporary`), whatever it holds: Orbax writes
    ``commit_success.txt`` before that rename, and never lists or loads such a directory."""
    if (not (isinstance(path, Path) and files.is_plain_dir(path)) or is_temporary(path.name)
            or _is_item(path, path) or _is_named_item(path) or _is_legacy_root_metadata(path)):
        return False
    if _head(path / COMMIT_SUCCESS, len(_COMMITTED)) == _COMMITTED:
        return True
    if files.is_plain_file(path / CHECKPOINT_METADATA):
        return not _never_committed(path)
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):  # removed, or replaced by a file, since it was looked at
        return False
    return any(files.is_plain_dir(path / name) and _is_item(path / name, path)
               and not os.path.lexists(path / name / CHECKPOINT_METADATA)  # (a checkpoint of its own: path is a root)
               for name in names)


def is_tree_saved_alone(path: Path) -> bool:
    """Whether the local directory ``path`` holds an Orbax tree itself, without a ``_CHECKPOINT_METADATA``: a
    tree a handler saved alone, or a direct checkpoint of Orbax before 0.6 (``flax.training.checkpoints``'
    ``checkpoint_100`` of then), which ckpt reads as a checkpointable of its directory, not as a step."""
    return files.is_plain_dir(path) and _is_item(path, path)


ALONE = ("a tree Orbax saved without a _CHECKPOINT_METADATA (a direct checkpoint of Orbax before 0.6, as "
         "flax.training.checkpoints saved its checkpoint_<step> then), which ckpt reads as a checkpointable of its "
         "directory, not as a step")


def has_step_files(path: Path) -> bool:
    """Whether ``path`` holds the files Orbax gives a step directory (``_CHECKPOINT_METADATA`` or
    ``commit_success.txt``), committed or not: two stats, where :func:`is_step` may list the directory."""
    return files.is_plain_file(path / CHECKPOINT_METADATA) or files.is_plain_file(path / COMMIT_SUCCESS)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one Orbax gives a save while it writes it (``10.orbax-checkpoint-tmp``; before
    Orbax 0.11 with a time after it): a directory so named in a root is a save a crash interrupted."""
    return ".orbax-checkpoint-tmp" in name


_COMMITTED = b"Checkpoint commit was successful"  # what Orbax writes into commit_success.txt
_MSGPACK_MAP_HEADERS = {**{byte: 1 for byte in range(0x81, 0x90)}, 0xDE: 3, 0xDF: 5}  # first byte -> header length
_MSGPACK_STRINGS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])  # the first byte of a msgpack str


def _head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of the regular file ``path`` (never read through a link, never a FIFO);
    b"" for anything else."""
    try:
        fd, _ = storage.open_regular(path)
    except (OSError, ValueError):
        return b""
    with open(fd, "rb") as f:
        return f.read(size)


ON_OBJECT_STORE = ("a checkpoint Orbax wrote, which ckpt reads in local directories only: copy it, or its run, into one "
                   "to load it or continue the run (`ckpt convert` then makes the run ckpt's)")


def is_step_on_object_store(path: storage.Location) -> bool:
    """Whether ``path``, on an object store, holds the files Orbax gives a step (``_CHECKPOINT_METADATA`` or
    ``commit_success.txt``): a checkpoint Orbax wrote there (:data:`ON_OBJECT_STORE`). Two requests at most."""
    return not isinstance(path, Path) and any(path.holds(name) for name in (CHECKPOINT_METADATA, COMMIT_SUCCESS))


def check_checkpoint(path: storage.Location) -> None:
    """Raises CheckpointNotFoundError naming ``path`` when it holds Orbax's files but is no checkpoint
    Orbax loads: a save Orbax began and never committed (a ``_CHECKPOINT_METADATA`` without a commit
    time: its items may be half-written) or did not rename to its step's name (``3.orbax-checkpoint-tmp``),
    or one item of a step (``<step>/state``), whose step is the checkpoint to load; UnsupportedLayoutError for
    a checkpoint Orbax wrote on an object store (see :func:`is_step_on_object_store`)."""
    if is_step_on_object_store(path):
        raise UnsupportedLayoutError(f"{path} is {ON_OBJECT_STORE}", path=path)
    if not (isinstance(path, Path) and files.is_plain_dir(path)):
        return
    if is_temporary(path.name) and has_step_files(path):
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}: it is a save Orbax began and did not finish (it renames a save to its step's "
            "name once committed; a crash came first), which Orbax does not load either")
    if _never_committed(path):
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}: it is a save Orbax began and never committed (its {CHECKPOINT_METADATA} "
            "has no commit time: the save was interrupted), which Orbax does not load either")
    if _is_legacy_root_metadata(path):
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}: it holds the custom metadata of the Orbax root {path.parent} (as Orbax before "
            "0.10 wrote it), which Checkpointer(root).root_metadata() reads")
    if path.name == METRICS and _is_named_item(path):
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}: it holds the metrics of the Orbax step {path.parent}, which Orbax does not "
            "load alone either; they are the step's metadata (metrics)")
    if (_is_item(path, path) or _is_named_item(path)) and is_step(path.parent):
        why = ("which Orbax does not load alone either" if has_step_files(path.parent) else
               f"as ckpt reads a directory of Orbax's trees without a {CHECKPOINT_METADATA} (a step of Orbax before "
               "0.5, or trees a handler, or a Checkpointer of Orbax before 0.6, saved alone; Orbax's load reads such "
               "a tree alone)")
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}: it is the checkpointable {path.name!r} of the Orbax step {path.parent}, "
            f"{why}; load the step with checkpointable_name={path.name!r}")


def _never_committed(step_dir: Path) -> bool:
    """Whether the step's ``_CHECKPOINT_METADATA`` has a null commit time: Orbax commits a step by writing
    its commit time there and then ``commit_success.txt``. A save killed before that leaves such a directory
    under the step's own name where Orbax writes in place (object stores, or ``CommitFileTemporaryPath``);
    Orbax does not list it, and it may hold no item yet or half-written arrays. Metadata ckpt cannot read
    is not taken for this (the step's other readers report it)."""
    try:
        data = files.read_json(step_dir / CHECKPOINT_METADATA, step_dir)
    except (OSError, CheckpointCorruptedError):
        return False
    return isinstance(data, dict) and "commit_timestamp_nsecs" in data and data["commit_timestamp_nsecs"] is None


def _is_legacy_root_metadata(path: Path) -> bool:
    """Whether ``path`` is the directory where Orbax before 0.10 kept its root's metadata (``metadata/metadata``,
    committed with a ``_CHECKPOINT_METADATA`` of its own, as a step is)."""
    return path.name == LEGACY_ROOT_METADATA.parent.name and files.is_plain_file(path.parent / LEGACY_ROOT_METADATA)


def _is_named_item(path: Path) -> bool:
    """Whether the Orbax step that holds ``path`` names it as one of its items (in the ``item_handlers`` of
    its ``_CHECKPOINT_METADATA``): a JSON item, the metrics or another handler's item, which Orbax commits
    with a ``commit_success.txt`` of their own, as it does a step."""
    if not files.is_plain_file(path.parent / CHECKPOINT_METADATA):
        return False
    try:
        handlers = _step_metadata(path.parent).get("item_handlers")
    except (OSError, CheckpointCorruptedError):
        return False
    return isinstance(handlers, dict) and path.name in handlers


def _is_msgpack_tree(path: Path) -> bool:
    """Whether the regular file ``path`` begins as a msgpack PyTree does: a map that is not empty whose
    first key is a string (a pickle, whose first byte is a msgpack map's too, is not one)."""
    head = _head(path, 6)
    header = _MSGPACK_MAP_HEADERS.get(head[0]) if head else None
    return header is not None and len(head) > header and head[header] in _MSGPACK_STRINGS


def _is_item(item: Path, step_dir: Path) -> bool:
    """Whether an item directory holds Orbax's files: a ``_METADATA`` JSON object with ``tree_metadata``,
    or the msgpack ``checkpoint`` file of the oldest PyTree handler (not TensorFlow's text file of that
    name, nor a directory called so). An OCDBT database alone (``manifest.ocdbt``) is not one: Orbax
    writes one of those files beside it, and tensorstore users write such databases of their own. A
    directory with a ``_CHECKPOINT_METADATA`` is a checkpoint (a direct one), never an item."""
    return not os.path.lexists(item / CHECKPOINT_METADATA) and _holds_tree(item, step_dir)


def _holds_tree(item: Path, step_dir: Path) -> bool:
    """Whether ``item`` holds a PyTree handler's files (see :func:`_is_item`)."""
    if files.is_plain_file(item / "_METADATA"):
        try:
            metadata = files.read_json(item / "_METADATA", step_dir)
        except (OSError, CheckpointCorruptedError):
            metadata = None
        if isinstance(metadata, dict) and "tree_metadata" in metadata:
            return True
    return _is_msgpack_tree(item / "checkpoint")


def _step_metadata(step_dir: Path) -> dict:
    try:
        data = files.read_json(step_dir / CHECKPOINT_METADATA, step_dir)
    except FileNotFoundError:  # Orbax before 0.5
        return {}
    if not isinstance(data, dict):
        raise CheckpointCorruptedError(f"{step_dir / CHECKPOINT_METADATA} is not a JSON object", path=step_dir)
    return data


def info(step_dir: Path) -> dict:
    """The step's metrics, times and custom metadata, under the names of ckpt's manifest.

    Raises:
      CheckpointCorruptedError: its metadata cannot be read, or its metrics or custom metadata nest deeper
        than ckpt's own manifests may (``fmt.MAX_JSON_DEPTH``), which ckpt's readers need not handle.
    """
    data = _step_metadata(step_dir)
    metrics = data.get("metrics") or None
    try:
        metrics = files.read_json(step_dir / METRICS / METRICS, step_dir)
    except FileNotFoundError:
        pass
    for key, value in (("metrics", metrics), ("custom_metadata", data.get("custom_metadata"))):
        if not schema.nested_within(value, fmt.MAX_JSON_DEPTH):
            raise CheckpointCorruptedError(f"{step_dir}: its {key} nest deeper than the {fmt.MAX_JSON_DEPTH} levels "
                                           "ckpt reads", path=step_dir)
    commit = data.get("commit_timestamp_nsecs")
    if not schema.is_timestamp(commit):  # Orbax's own fallback: the directory's time
        commit = os.lstat(step_dir).st_mtime_ns
    init = data.get("init_timestamp_nsecs")
    # NON_FINITE empty: Orbax's JSON holds NaN and Infinity themselves, and its strings are strings
    return {"format": "orbax", "metrics": metrics, fmt.NON_FINITE: {}, "commit_timestamp_nsecs": commit,
            "init_timestamp_nsecs": init if schema.is_timestamp(init) else None,
            "custom_metadata": data.get("custom_metadata")}


def is_whole(step_dir: Path) -> bool:
    """Whether the step's metadata and metrics are whole for all ckpt can tell, where :func:`info` refuses them: JSON
    that Orbax reads nested deeper than ckpt reads, or files this process may not read (another user's); a step ckpt
    cannot read, not a damaged one."""
    metrics = step_dir / METRICS / METRICS
    try:
        _step_metadata(step_dir)
        files.read_json(metrics, step_dir)
    except FileNotFoundError:
        return True
    except (OSError, CheckpointCorruptedError):
        return storage.may_not_read(step_dir / CHECKPOINT_METADATA) or storage.may_not_read(metrics)
    return True


ROOT_METADATA = Path("metadata", "_ROOT_METADATA")  # a root's, relative to it
LEGACY_ROOT_METADATA = Path("metadata", "metadata")  # Orbax before 0.10: the custom metadata itself, as a JSON item
_ROOT_METADATA_FIELDS = ("custom_metadata", "internal_metadata")
_WRAPPED_ROOT_METADATA_FIELDS = {"custom", "format"}  # Orbax 0.10.1 to 0.11.7: {"custom": ...} (0.10.1: "format": null)


def has_root_metadata(root: Path) -> bool:
    """Whether Orbax wrote metadata for the root (see :func:`root_custom_metadata`)."""
    return os.path.lexists(root / ROOT_METADATA) or _legacy_root_metadata(root) is not None


def _legacy_root_metadata(root: Path) -> dict | None:
    """What Orbax before 0.10 wrote to ``metadata/metadata``: a JSON object. None where it is missing, or is
    anything else (not JSON, not an object, not a regular file): a user's file of that name, never Orbax's (nor
    ever rewritten)."""
    try:
        data = files.read_json(root / LEGACY_ROOT_METADATA, root)
    except (FileNotFoundError, CheckpointCorruptedError):
        return None
    return data if isinstance(data, dict) else None


def root_custom_metadata(root: Path) -> Any:
    """The custom metadata Orbax keeps for a root (``metadata/_ROOT_METADATA``, or where that is missing the
    file of Orbax before 0.10, ``metadata/metadata``), or None. Read as Orbax reads either: its
    ``custom_metadata``, with the keys that are none of Orbax's fields (Orbax 0.10.0 wrote the custom metadata
    itself to ``_ROOT_METADATA``, as earlier versions to ``metadata/metadata``). Orbax 0.10.1 to 0.11.7 wrote it as
    ``{"custom": ...}`` (0.10.1 with ``"format": null``), and read back what was given: so does ckpt, where Orbax
    since 0.11.8 gives ``{"custom": ...}`` as the custom metadata. None where ``metadata`` is a regular
    file (a user's, of that name, beside the steps): Orbax makes a directory there; and where ``metadata/metadata``,
    without ``_ROOT_METADATA``, is no JSON object (a user's file; Orbax 0.12.8's ``root_metadata()`` raises
    OSError).

    Raises:
      CheckpointCorruptedError: ``_ROOT_METADATA`` (a name of Orbax's alone) is not a JSON object, or its
        ``custom_metadata`` neither an object nor null: Orbax 0.12.8's ``root_metadata()`` raises there too.
    """
    if files.is_plain_file(root / ROOT_METADATA.parent):
        return None
    try:
        data = files.read_json(root / ROOT_METADATA, root)
    except FileNotFoundError:
        data = _legacy_root_metadata(root)
    else:
        _check_root_metadata(root / ROOT_METADATA, data)
        wrapped = set(data) <= _WRAPPED_ROOT_METADATA_FIELDS
        if wrapped and isinstance(data.get("custom"), dict):
            return data["custom"]
    if not isinstance(data, dict):
        return None
    custom, others = data.get("custom_metadata"), {k: v for k, v in data.items() if k not in _ROOT_METADATA_FIELDS}
    return {**(custom if isinstance(custom, dict) else {}), **others} if others else custom


def _check_root_metadata(path: Path, data: Any) -> None:
    """Raises CheckpointCorruptedError, naming ``path``, where Orbax's ``_ROOT_METADATA`` holds what Orbax never
    writes there: no JSON object (a list, a string, a number, null), or a ``custom_metadata`` that is no object."""
    if not isinstance(data, dict):
        raise CheckpointCorruptedError(f"{path} holds {json.dumps(data)[:60]}, not the JSON object Orbax writes as a "
                                       "root's metadata", path=path)
    custom = data.get("custom_metadata")
    if custom is not None and not isinstance(custom, dict):
        raise CheckpointCorruptedError(f"{path}: its 'custom_metadata' is {json.dumps(custom)[:60]}, not the JSON "
                                       "object Orbax writes", path=path)


def items(step_dir: Path) -> dict[str, tuple[str, Path]]:
    """Each checkpointable of the step (not ``metrics``): the handler that wrote it ('' when unnamed) and its
    directory. A direct checkpoint (v0 ``StandardCheckpointer().save(path, tree)``, whose metadata names one
    handler, not one per item) is one tree, ``state``, in the step directory itself, as Orbax's ``load`` reads it."""
    handlers = _step_metadata(step_dir).get("item_handlers")
    if isinstance(handlers, str):
        return {fmt.DEFAULT_CHECKPOINTABLE: (handlers, step_dir)}
    if not handlers and _holds_tree(step_dir, step_dir):  # a direct checkpoint whose metadata names no handler
        return {fmt.DEFAULT_CHECKPOINTABLE: ("", step_dir)}  # (an older Orbax): its tree, as Orbax reads it
    if isinstance(handlers, dict) and handlers:  # a name without its directory wrote nothing (Orbax's own reader
        # skips it: its generated v1 steps name a 'descriptor' whose directory was removed)
        found = {name: handler if isinstance(handler, str) else "" for name, handler in handlers.items()
                 if not (files.is_plain_name(name) and not os.path.lexists(step_dir / name))}
    else:  # Orbax before 0.6 named no handlers, and 0.10 none of a CheckpointManager's ({}): every item directory
        found = {name: "" for name in sorted(os.listdir(step_dir)) if files.is_plain_dir(step_dir / name)}
    for name in found:
        if not files.is_plain_name(name) or not files.is_plain_dir(step_dir / name):
            raise CheckpointCorruptedError(f"{step_dir}/{CHECKPOINT_METADATA} names item {name!r}, which is not a "
                                           "directory of the step", path=step_dir)
    found.pop(METRICS, None)
    return {name: (handler, step_dir / name) for name, handler in found.items()}


def handled(step_dir: Path) -> dict[str, dict]:
    """The step's items written by a handler ckpt does not read itself (a custom ``CheckpointableHandler``, a
    ``StatefulCheckpointable``), as :mod:`ckpt.custom` records ckpt's own: name -> ``{"handler": its name}``,
    ``{"handler": None}`` for an object that saved itself. Their handler, registered in this program, or the
    object passed to the load, reads them, as in Orbax."""
    out = {}
    for name, (handler, directory) in items(step_dir).items():
        short = handler.rsplit(".", 1)[-1]
        if short and short not in (_ARRAY_HANDLER, *_JSON_HANDLERS) and not _is_tree(name, short, directory, step_dir):
            out[name] = {"handler": None if short == _STATEFUL_HANDLER else handler}
    return out


def _is_tree(name: str, short: str, directory: Path, step_dir: Path) -> bool:
    """Whether the item ``name``, written by the handler ``short``, is read as a PyTree: a PyTree handler's, or
    ``state`` holding one's files whatever handler the step names, as Orbax's load reads it (with the PyTreeHandler
    it registers for that name; its partial save, ``ocp.partial``, names a StatefulCheckpointable's handler)."""
    return short in _PYTREE_HANDLERS or name == fmt.DEFAULT_CHECKPOINTABLE and _holds_tree(directory, step_dir)


class Step:
    """The items of one Orbax step read as ckpt reads a step: ``trees`` (name -> tree and leaf entries).

    An item ckpt does not read (written by another handler: a grain iterator's) raises
    UnsupportedLayoutError naming it; with ``skip_unreadable`` (for listings and checks of every item) it
    is left out of ``trees`` and kept in ``unreadable`` (name -> why).
    """

    def __init__(self, step_dir: Path, names: list[str] | None = None, *, skip_unreadable: bool = False):
        self.step_dir = step_dir
        self.handlers = items(step_dir)
        missing = [n for n in names or () if n not in self.handlers]
        if missing:
            raise CheckpointableNotFoundError(step_dir, missing, list(self.handlers))
        self.pytrees: dict[str, PyTreeItem] = {}
        self.trees: dict[str, dict] = {}
        self.unreadable: dict[str, str] = {}
        for name in self.handlers if names is None else names:
            try:
                self.trees[name] = self._read_item(name)
            except UnsupportedLayoutError as e:
                if not skip_unreadable:
                    raise
                self.unreadable[name] = str(e)
            except PermissionError as e:  # (another user's file or directory in the item: as files.read_json says)
                raise CheckpointCorruptedError(f"{step_dir}: {e}", path=step_dir) from None

    def _read_item(self, name: str) -> dict:
        handler, directory = self.handlers[name]
        short = handler.rsplit(".", 1)[-1]
        one_array = short == _ARRAY_HANDLER or not short and is_bare_array(directory)
        if (_is_tree(name, short, directory, self.step_dir) or one_array
                or (not short and os.path.lexists(directory / "_METADATA"))):
            item = self.pytrees[name] = PyTreeItem(self.step_dir, name, directory, one_array=one_array)
            return item.doc
        if short in _JSON_HANDLERS or not short and _json_file(directory) is not None:
            return _json_doc(self.step_dir, directory)
        what = f"Orbax's {handler}" if handler else f"an Orbax handler that left {sorted(os.listdir(directory))[:5]}"
        raise UnsupportedLayoutError(
            f"{directory} was written by {what}, which ckpt does not read (it reads "
            f"items of {', '.join((*_PYTREE_HANDLERS, _ARRAY_HANDLER, *_JSON_HANDLERS))}); "
            "register its handler (or pass the object that saved itself) to load it, or load the other "
            f"checkpointables by name: {sorted(n for n in self.handlers if n != name)}", path=directory)

    def check_arrays(self) -> Iterator[tuple[str, int, str | None]]:
        """Reads every array of the step's PyTree items, one at a time: (key path, bytes, why it cannot
        be read or None)."""
        for name, item in self.pytrees.items():
            for array, meta in ((a, item.metas[i]) for i, a in item.aggregated.items()):  # (decoded when opened)
                yield f"{name}{meta['path']}", array.nbytes, None
            for i, store in item.stores.items():
                source = ArraySource(item, item.metas[i], store)
                try:
                    nbytes = source.read().nbytes
                except CheckpointCorruptedError as e:
                    yield f"{name}{item.metas[i]['path']}", 0, str(e)
                    continue
                yield f"{name}{item.metas[i]['path']}", nbytes, None

    def load(self, abstract: dict[str, Any] | None, *, partial_load: bool) -> dict[str, Any]:
        """The items as ``loading.load_trees`` builds them from their Orbax files."""
        every: list[ArraySource] = []  # the sources made

        def sources(name: str, metas: list[dict], wanted) -> list[ArraySource | np.ndarray | None]:
            item = self.pytrees.get(name)
            row = item.sources(wanted) if item is not None else [None] * len(metas)
            every.extend(source for source in row if isinstance(source, ArraySource))
            return row

        def reads() -> list[tuple[ArraySource, list]]:
            for source in every:  # every read in flight at once; tensorstore reads them on its threads
                source.start()
            return [(source, []) for source in every]

        return loading.load_trees(self.step_dir, self.trees, abstract, partial_load=partial_load,
                                  sources=sources, reads=reads)


def _json_file(directory: Path) -> str | None:
    """The name of a JSON item's one file (``metadata`` for v0's JsonCheckpointHandler), if it has one
    that starts as JSON does (beside the step's own files, in a direct checkpoint)."""
    names = [n for n in sorted(os.listdir(directory)) if n not in (COMMIT_SUCCESS, CHECKPOINT_METADATA)
             and not n.startswith(".")]
    if len(names) != 1 or not files.is_plain_file(directory / names[0]):
        return None
    with open(directory / names[0], "rb") as f:
        return names[0] if f.read(1) in (b"{", b"[") else None


def _json_doc(step_dir: Path, directory: Path) -> dict:
    """A JSON item as a tree of inline leaves."""
    name = _json_file(directory)
    if name is None:
        raise UnsupportedLayoutError(f"{directory} is a JSON item without one JSON file; ckpt reads one", path=directory)
    value = files.read_json(directory / name, step_dir)
    if not schema.nested_within(value, MAX_DEPTH):  # (JSON Orbax reads: not damage)
        raise UnsupportedLayoutError(f"{directory / name} nests deeper than the {MAX_DEPTH} levels ckpt reads of an "
                                     "Orbax tree", path=directory)
    node, flat = tree_lib.flatten(value)
    metas = [{"path": tree_lib.keystr(path), **leaves_lib.to_host(path, leaf).meta} for path, leaf in flat]
    return {"tree": tree_lib.to_json(node), "leaves": metas, "json": True}
