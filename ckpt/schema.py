"""What a reader checks in a step's manifest.json and tree.json before it trusts a field: once, for all.

A step directory is input: downloaded, shared, mounted from a bucket, perhaps forged with its
checksums recomputed so that they pass. Every reader (a load, ``metadata``, ``verify``, the ``ckpt``
command, a Checkpointer listing its root) reads the two files through :func:`read_manifest` and
:func:`read_tree`. They read only regular files of bounded size (never through a link, never a FIFO
or a device), and refuse anything ckpt's save never writes: a wrong type anywhere, a negative or
non-integer size, a dtype ckpt does not store, an array whose shape, dtype, chunks or checksums do
not fit the leaf, a packed byte range outside the packed array, a tree whose leaves do not match
its entries. What is wrong raises :class:`ckpt.errors.CheckpointCorruptedError` naming the step, the
file and the key path; past these two functions the readers use the fields as they are. What they
still check is the data itself: each file exists, is a regular file of the size the fields imply,
and matches its checksum. docs/format.md lists every check.

Example::

    manifest = read_manifest(step_dir)          # CheckpointCorruptedError if anything is wrong
    doc = read_tree(step_dir, manifest)
    leaves = doc["checkpointables"]["state"]["leaves"]   # a LeafTable: leaves.shape, leaves[0]["path"], ...
"""
from __future__ import annotations

import itertools
import json
import operator
import os
import reprlib
from pathlib import Path
from typing import Any

import numpy as np

from ckpt import format as fmt
from ckpt import leaves as leaves_lib
from ckpt import storage
from ckpt.errors import CheckpointCorruptedError, InvalidLayoutError
from ckpt.leaf_table import COLUMNS, FIELDS, LeafTable

try:  # tree.json's parser with the `fast` extra: 2.4x as fast as json on a 10,000-leaf tree.json
    from orjson import loads as _fast_loads
except ImportError:
    _fast_loads = None
_FAST_LEVELS = 100  # the deepest tree structure (levels of containers) orjson's reading is trusted with

_INLINE = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,), "none": (type(None),)}
_INLINE_KEYS = {"path", "type", "value"}  # an inline leaf's entry, as a save writes it
_NON_FINITE = ("nan", "inf", "-inf")
_ARRAY_TYPES = frozenset({"numpy", "np_scalar", "jax", "jax_key", "torch", "bytes"})
_SHAPED_TYPES = frozenset({"np_scalar", "jax_key", "bytes"})
_PLAIN_ARRAY_TYPES = _ARRAY_TYPES - _SHAPED_TYPES
_FRAMEWORK_TYPES = frozenset({"jax", "jax_key", "torch"})
_DTYPES: dict[str, np.dtype] = {}  # the dtypes met so far, by name
_U32 = 1 << 32
_CONTAINERS = frozenset({"dict", "list", "tuple", "namedtuple", "pytree"})
_KEY_TYPES = {"key": frozenset({str, int}), "idx": frozenset({int}), "attr": frozenset({str})}
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_LEAF = {"t": "leaf"}  # a leaf of the tree structure, as ckpt writes it
_BYTES_CODEC = [{"name": "bytes", "configuration": {"endian": "little"}}]
_CRC32C_CODECS = _BYTES_CODEC + [{"name": "crc32c"}]
_METADATA_KEYS = frozenset({"shape", "data_type", "chunk_grid", "codecs"})
_GRID_KEYS, _GRID_CONFIG_KEYS = {"name", "configuration"}, {"chunk_shape"}  # a regular grid, as a save writes it
_MAX_ARRAY_BYTES = 1 << 62  # numpy cannot address more; the files on disk bound what is read
_MAX_TIMESTAMP = 1 << 63    # nanoseconds: the year 2262
_COLUMNS = frozenset(COLUMNS)
_LIST, _INT, _PAIR = {list}, {int}, {2}
_REPR = reprlib.Repr()      # a field in a message: escaped, short, and safe at any depth of nesting
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 4


class _Invalid(Exception):
    """What is wrong in a JSON file, and the key paths of the leaves it concerns (none: the file)."""

    def __init__(self, why: str, *where: str):
        super().__init__(why)
        self.why, self.where = why, where


def read_manifest(step_dir: storage.Location) -> dict:
    """The step's manifest.json, read and validated (see the module docstring).

    Raises:
      CheckpointCorruptedError: it is missing, not a regular file, too large, not JSON, not sealed by
        its own CRC32, of another format version, or a field has the wrong type or range.
    """
    return parse_manifest(step_dir, manifest_bytes(step_dir))


def manifest_bytes(step_dir: storage.Location) -> bytes:
    """The bytes of the step's manifest.json, unchecked: :func:`read_manifest` is this, then
    :func:`parse_manifest`. (A root's listing reads all its steps' manifests, then parses them all: opening
    2,000 steps took ~15% less CPU time so than reading and parsing each in turn.)

    Raises:
      CheckpointCorruptedError: it is missing, not a regular file, or too large.
      InvalidLayoutError: the directory holds none of the files ckpt writes.
    """
    try:
        return _read(step_dir, _manifest_path(step_dir), fmt.MANIFEST_MAX_BYTES,
                     f": {step_dir} is not a committed ckpt checkpoint")
    except CheckpointCorruptedError:
        if not any(storage.exists(step_dir / name) for name in (fmt.MANIFEST, fmt.TREE, fmt.PACKED, fmt.ARRAYS)):
            raise InvalidLayoutError(f"{step_dir} is not a checkpoint: it has none of the files ckpt writes "
                                     f"({fmt.MANIFEST}, {fmt.TREE}, {fmt.PACKED}/, {fmt.ARRAYS}/)") from None
        raise


def parse_manifest(step_dir: storage.Location, data: bytes) -> dict:
    """The manifest ``data`` (the bytes of the step's manifest.json), parsed and validated.

    Raises:
      CheckpointCorruptedError: it is not JSON, not sealed by its own CRC32, of another format version,
        or a field has the wrong type or range.
    """
    path = _manifest_path(step_dir)
    manifest = _parse(step_dir, path, data)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        raise CheckpointCorruptedError(f"{path} is not a ckpt manifest", path=step_dir)
    if not fmt.manifest_seal_ok(data):
        raise CheckpointCorruptedError(f"{path} does not match its own checksum (manifest_crc32): the file is damaged",
                                       path=step_dir)
    version = manifest.get("version")
    if type(version) is not int or version not in fmt.READ_VERSIONS:
        newer = _is_newer(version)
        raise CheckpointCorruptedError(
            f"{path} has format version {_short(version)}; this ckpt reads versions "
            f"{', '.join(map(str, fmt.READ_VERSIONS))}" + (": a newer ckpt wrote it, upgrade ckpt to read it"
                                                           if newer else ""), path=step_dir)
    try:
        _check_manifest(manifest)
    except _Invalid as e:
        raise CheckpointCorruptedError(f"{path}: {e.why}", path=step_dir) from None
    return manifest


def written_by_newer(step_dir: storage.Location) -> bool:
    """Whether the step's manifest is JSON of ckpt's format with a version above those this ckpt reads: a step a
    newer ckpt wrote, which this one cannot read, not a damaged one."""
    try:
        manifest = json.loads(manifest_bytes(step_dir).decode("utf-8"))
    except (CheckpointCorruptedError, InvalidLayoutError, OSError, ValueError, RecursionError):
        return False
    return (isinstance(manifest, dict) and manifest.get("format") == fmt.FORMAT_NAME
            and _is_newer(manifest.get("version")))


def _is_newer(version: Any) -> bool:
    return type(version) is int and version > max(fmt.READ_VERSIONS)


def _manifest_path(step_dir: storage.Location) -> storage.Location | str:
    """A str for a local step: a root's listing reads thousands of manifests, and pathlib's join costs 3 us."""
    return os.path.join(step_dir, fmt.MANIFEST) if isinstance(step_dir, Path) else step_dir / fmt.MANIFEST


def read_tree(step_dir: storage.Location, manifest: dict) -> dict:
    """The step's tree.json (``manifest`` from :func:`read_manifest`), checked against its CRC32 in
    the manifest and validated: every leaf entry fits its array, its packed range and the tree. Each
    checkpointable's ``leaves`` is given as a :class:`ckpt.leaf_table.LeafTable` (of either format version).

    Raises:
      CheckpointCorruptedError: naming the step, tree.json, and the leaf when one is at fault.
    """
    path = step_dir / fmt.TREE
    data = _read(step_dir, path, fmt.TREE_MAX_BYTES, "")
    if fmt.crc32(data) != manifest["tree_crc32"]:
        raise CheckpointCorruptedError(f"{path} does not match its checksum in {fmt.MANIFEST}: the file is damaged",
                                       path=step_dir)
    if _fast_loads is not None:
        # orjson refuses NaN and lone surrogates, reads integers past 64 bits as floats and nests 1,024
        # levels where json's parser (and the loader, which recurses per level) stops near Python's
        # recursion limit: a tree.json it refuses, whose check fails or whose tree nests deeper than
        # _FAST_LEVELS is read again by json, whose reading is the format's
        try:
            doc = _fast_loads(data)
            if _check_tree(doc, manifest["checkpointables"], manifest["version"]) <= _FAST_LEVELS:
                return doc
        except (ValueError, _Invalid):  # (orjson's JSONDecodeError is a ValueError)
            pass
    doc = _parse(step_dir, path, data)
    try:
        _check_tree(doc, manifest["checkpointables"], manifest["version"])
    except _Invalid as e:
        leaves = (f"leaf {e.where[0]}: " if len(e.where) == 1 else
                  f"leaves {', '.join(e.where[:5])}{' ...' if len(e.where) > 5 else ''}: " if e.where else "")
        raise CheckpointCorruptedError(f"{path}: {leaves}{e.why}", path=step_dir, key_paths=e.where) from None
    return doc


def _read(step_dir: storage.Location, path: storage.Location | str, limit: int, missing: str) -> bytes:
    try:
        return storage.read_json_bytes(path, limit)
    except FileNotFoundError:
        raise CheckpointCorruptedError(f"{path} is missing{missing}", path=step_dir) from None
    except (ValueError, OSError) as e:  # a link, a FIFO, a device, too large, unreadable
        raise CheckpointCorruptedError(f"{step_dir}: {e}", path=step_dir) from None


def _parse(step_dir: storage.Location, path: storage.Location | str, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointCorruptedError(f"{path} is not valid JSON ({type(e).__name__}: {e})", path=step_dir) from None


# ------------------------------------------------------------------------------------------ manifest
def _check_manifest(manifest: dict) -> None:
    step = manifest.get("step")
    if step is not None and not _is_count(step):
        raise _Invalid(f"'step' {step!r} is not a non-negative int")
    for key in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
        value = manifest.get(key)
        if value is not None and not is_timestamp(value):
            raise _Invalid(f"{key!r} {_short(value)} is not a time in nanoseconds since the epoch")
    names = manifest.get("checkpointables")
    if type(names) is not list or not all(type(n) is str for n in names) or len(set(names)) != len(names):
        raise _Invalid(f"'checkpointables' {_short(names)} is not a list of distinct names")
    for name in names:
        try:
            fmt.validate_checkpointable_name(name)
        except ValueError as e:
            raise _Invalid(str(e)) from None
    for key in ("metrics", "custom_metadata"):
        if not nested_within(manifest.get(key), fmt.MAX_JSON_DEPTH):
            raise _Invalid(f"{key!r} is nested deeper than the {fmt.MAX_JSON_DEPTH} levels a save accepts")
    if not _is_count(manifest.get("nbytes")):
        raise _Invalid(f"'nbytes' {_short(manifest.get('nbytes'))} is not a non-negative int")
    if not _is_u32(manifest.get("tree_crc32")):
        raise _Invalid(f"'tree_crc32' {_short(manifest.get('tree_crc32'))} is not a CRC32")


# ---------------------------------------------------------------------------------------------- tree
def _check_tree(doc: Any, names: list[str], version: int) -> int:
    """Checks tree.json's document (``doc``); returns the levels of containers its deepest tree nests."""
    trees = doc.get("checkpointables") if type(doc) is dict else None
    if type(trees) is not dict or sorted(trees) != sorted(names):
        raise _Invalid(f"its checkpointables are not the manifest's {names!r}")
    _check_handled(doc.get("handled", {}), trees)
    packed_end, packed_bytes = -1, 0  # the end of the last packed leaf's bytes (-1: none), and the bytes
    # the packed leaves take one after another (each padded to the alignment, as a save packs them)
    deepest = 0
    for name, tree in trees.items():
        if type(tree) is not dict:
            raise _Invalid(f"checkpointable {name!r} is not an object of 'tree' and 'leaves'")
        count, levels = _count_leaves(tree.get("tree"), name)
        deepest = max(deepest, levels)
        table = tree["leaves"] = _table(name, tree.get("leaves"), count, version)
        packed_end, packed_bytes = _check_leaves(name, table, packed_end, packed_bytes)
    packed = doc.get("packed")
    if packed is not None or packed_end >= 0:
        try:
            _check_packed(packed, max(packed_end, 0), packed_bytes)
        except _Invalid as e:
            raise _Invalid(e.why, *[name + meta["path"] for name, tree in trees.items() for meta in tree["leaves"]
                                    if "packed" in meta]) from None
    return deepest


def _count_leaves(node: Any, name: str) -> tuple[int, int]:
    """The leaves of a tree structure (see ``ckpt.tree.to_json``), each node checked, and the levels
    of containers it nests; iterative, so that no depth of nesting exhausts the stack."""
    count, levels, stack = 0, 0, [(node, 1)]
    while stack:
        node, level = stack.pop()
        kind = node.get("t") if type(node) is dict else None
        kind = kind if type(kind) is str else None
        if kind == "leaf":
            count += 1
            continue
        if kind not in _CONTAINERS or type(node["c"] if "c" in node else None) is not list or type(node.get("n", "")) is not str:
            raise _Invalid(f"checkpointable {name!r}: a tree node {_short(node)} is not one ckpt writes")
        children, keys = node["c"], node.get("k")
        if keys is None and kind in ("dict", "namedtuple"):
            raise _Invalid(f"checkpointable {name!r}: a {kind} node has no keys ('k')")
        if keys is not None and not (type(keys) is list and len(keys) == len(children) and _are_keys(keys)):
            raise _Invalid(f"checkpointable {name!r}: the keys {_short(keys)} of a {kind} node are not one "
                           "[kind, key] pair per child")
        if keys is not None and len(set(map(tuple, keys))) != len(keys):  # (one child would take another's place)
            raise _Invalid(f"checkpointable {name!r}: the keys {_short(keys)} of a {kind} node repeat a key")
        leaves = children.count(_LEAF)  # the usual leaves, counted without a step each
        count, levels = count + leaves, max(levels, level)
        below = (children if not leaves else () if leaves == len(children)
                 else [child for child in children if child != _LEAF])
        stack.extend(zip(below, itertools.repeat(level + 1)))
    return count, levels


def _are_keys(keys: list) -> bool:
    """Whether each entry of ``keys`` is a [kind, key] pair of a kind ckpt writes; those of one kind
    (the usual node) checked in a few passes in C."""
    try:
        if set(map(type, keys)) <= _LIST and set(map(len, keys)) <= _PAIR:
            kinds = set(map(_FIRST, keys))
            if len(kinds) == 1:
                allowed = _KEY_TYPES.get(next(iter(kinds)))
                return allowed is not None and set(map(type, map(_SECOND, keys))) <= allowed
    except TypeError:  # an unhashable kind
        pass
    return all(map(_is_key, keys))


def _is_key(entry: Any) -> bool:
    return (type(entry) is list and len(entry) == 2 and type(entry[0]) is str
            and type(entry[1]) in _KEY_TYPES.get(entry[0], ()))


def _check_handled(handled: Any, trees: dict) -> None:
    """'handled' (checkpointables saved by handlers, ckpt.custom): valid names, none a tree's, each
    ``{"handler": name or null}``."""
    if type(handled) is not dict or any(type(r) is not dict or type(r.get("handler")) not in (str, type(None))
                                        for r in handled.values()):
        raise _Invalid("'handled' is not a map of checkpointable names to {'handler': name or null}")
    for name in handled:
        try:
            fmt.validate_checkpointable_name(name)
        except ValueError as e:
            raise _Invalid(f"'handled': {e}") from None
        if name in trees:
            raise _Invalid(f"'handled': {name!r} is also a tree")


def _table(name: str, leaves: Any, count: int, version: int) -> LeafTable:
    """Checkpointable ``name``'s leaf entries (``leaves`` as tree.json of format ``version`` holds them:
    a list of objects in version 1, a table of columns in version 2) as a table of ``count`` rows, each
    entry a dict holding a 'path' string; the fields themselves are checked by :func:`_check_leaves`."""
    if version == 1:
        if type(leaves) is not list:
            raise _Invalid(f"checkpointable {name!r} has no list of 'leaves'")
        if count != len(leaves):
            raise _Invalid(f"checkpointable {name!r}: its tree has {count} leaves, 'leaves' lists {len(leaves)}")
        for meta in leaves:
            if type(meta) is not dict or type(meta.get("path")) is not str:
                _check_leaf(name, meta)  # raises
        return LeafTable.of_entries(leaves)
    if type(leaves) is not dict or leaves.keys() != _COLUMNS or any(type(c) is not list for c in leaves.values()):
        raise _Invalid(f"checkpointable {name!r}: 'leaves' is not a table of the columns {', '.join(COLUMNS)}")
    lengths = sorted(set(map(len, leaves.values())))
    if lengths != [count]:
        raise _Invalid(f"checkpointable {name!r}: its tree has {count} leaves, the columns of 'leaves' have "
                       f"{' or '.join(map(str, lengths))}")
    paths, more = leaves["path"], leaves["more"]
    if set(map(type, paths)) - {str}:
        i = next(i for i, path in enumerate(paths) if type(path) is not str)
        raise _Invalid(f"checkpointable {name!r}: leaf {i}'s 'path' {_short(paths[i])} is not a string")
    if more.count(None) != count:
        for path, fields in zip(paths, more):
            if fields is not None and (type(fields) is not dict or not fields or not fields.keys().isdisjoint(FIELDS)):
                raise _Invalid(f"'more' {_short(fields)} is not an object of fields other than {', '.join(FIELDS)}",
                               name + path)
    return LeafTable(leaves)


def _check_leaves(name: str, table: LeafTable, packed_end: int, packed_bytes: int) -> tuple[int, int]:
    """Checks the leaf entries of checkpointable ``name``; returns ``packed_end`` and ``packed_bytes``
    (see :func:`_check_tree`) carried on over its packed leaves. Every load runs this for every leaf:
    the usual entries, packed arrays of plain types, are checked column by column in a few passes in C
    (:func:`_screen`); the others, and all of them when the screen does not pass, one by one by
    :func:`_check_leaf`, which says what is wrong."""
    plain = _plain_rows(table)
    screened = _screen(name, table, plain) if plain else (-1, 0)
    rest = range(len(table)) if screened is None else () if len(plain) == len(table) else \
        sorted(set(range(len(table))) - set(plain))
    if screened is not None:
        packed_end, packed_bytes = max(packed_end, screened[0]), packed_bytes + screened[1]
    for i in rest:
        meta = table[i]
        end = _check_leaf(name, meta)
        if end >= 0:
            packed_end = end if end > packed_end else packed_end
            packed_bytes += -(-meta["packed"][1] // fmt.ALIGN) * fmt.ALIGN
    return packed_end, packed_bytes


def _plain_rows(table: LeafTable) -> list[int]:
    """The rows of the usual entries: packed arrays of a plain type (numpy, jax, torch), no other field."""
    count = len(table)
    if table.more.count(None) == count and table.packed.count(None) == 0:
        try:
            if set(table.type) <= _PLAIN_ARRAY_TYPES:
                return list(range(count))
        except TypeError:  # an unhashable type
            pass
    return [i for i, (kind, span, more) in enumerate(zip(table.type, table.packed, table.more))
            if more is None and span is not None and type(kind) is str and kind in _PLAIN_ARRAY_TYPES]


def _screen(name: str, table: LeafTable, rows: list[int]) -> tuple[int, int] | None:
    """The end of the packed bytes of the entries ``rows`` (see :func:`_plain_rows`) and the bytes they
    take aligned, when every field of each is what :func:`_check_leaf` accepts; None when one may not be.
    The fields are checked for their types in a few passes in C, then as numpy arrays; when ``rows``
    are all of the table, its :attr:`LeafTable.spans` are set from them."""
    columns = (table.dtype, table.shape, table.packed, table.crc32)
    if len(rows) != len(table):
        pick = operator.itemgetter(*rows)
        columns = tuple(list(pick(column)) if len(rows) > 1 else [pick(column)] for column in columns)
    dtypes, shapes, spans, crcs = columns
    try:
        names = set(dtypes)
    except TypeError:
        return None
    for dtype_name in names - _DTYPES.keys():
        _dtype(dtype_name, name + table.path[rows[dtypes.index(dtype_name)]])  # raises unless ckpt writes it
    if any(not_held("torch", _DTYPES[name]) for name in names):  # rare: a dtype some framework lacks (int4, text)
        kinds = table.type if len(rows) == len(table) else [table.type[i] for i in rows]
        if any(kind in _FRAMEWORK_TYPES and not_held(kind, _DTYPES[dtype_name]) for dtype_name, kind in zip(dtypes, kinds)):
            return None  # each leaf is checked by _check_leaf, which names the one
    if set(map(type, shapes)) != _LIST:
        return None
    ndims = list(map(len, shapes))
    try:  # (a span that is not a list has no len(), or holds something other than ints)
        if set(map(len, spans)) != _PAIR:
            return None
    except TypeError:
        return None
    dims, flat = list(itertools.chain.from_iterable(shapes)), list(itertools.chain.from_iterable(spans))
    if max(ndims) > fmt.MAX_NDIM or set(map(type, itertools.chain(dims, flat, crcs))) != _INT:
        return None
    try:
        pairs, crc, dim = np.array(flat, np.int64).reshape(-1, 2), np.array(crcs, np.int64), np.array(dims, np.int64)
    except OverflowError:
        return None
    offsets, sizes = pairs[:, 0], pairs[:, 1]
    if ((dim.size and dim.min() < 0) or offsets.min() < 0 or offsets.max() > _MAX_ARRAY_BYTES or crc.min() < 0
            or crc.max() >= _U32):
        return None
    itemsizes = {dtype_name: _DTYPES[dtype_name].itemsize for dtype_name in names}
    itemsize = (next(iter(itemsizes.values())) if len(set(itemsizes.values())) == 1
                else np.array(list(map(itemsizes.__getitem__, dtypes)), np.int64))
    # Each shape's bytes, bounded as _nbytes bounds them (a zero dimension counted as 1) in floats, so
    # that no product overflows; a bound near the limit is left to _check_leaf, which counts exactly.
    bound, count = np.full(len(ndims), itemsize, np.float64), np.ones(len(ndims), np.int64)
    ndim = np.array(ndims, np.int64)
    first = np.cumsum(ndim) - ndim
    for axis in range(max(ndims)):
        has = ndim > axis
        length = dim[first[has] + axis]  # each shape's dimension ``axis``, of those that have one
        bound[has] *= np.maximum(length, 1)
        if bound.max() > _MAX_ARRAY_BYTES / 4:
            return None
        count[has] *= length
    if (sizes != count * itemsize).any() or (offsets % fmt.ALIGN).any():
        return None
    if len(rows) == len(table):
        table.spans = pairs
    return int((offsets + sizes).max()), int((-(-sizes // fmt.ALIGN) * fmt.ALIGN).sum())


def _check_leaf(name: str, meta: Any) -> int:
    """Checks one leaf entry; returns the end of its packed bytes, or -1 when it is not packed."""
    if type(meta) is not dict or type(meta.get("path")) is not str:
        raise _Invalid(f"checkpointable {name!r}: a leaf entry {_short(meta)} has no 'path' string")
    kind = meta.get("type")
    inline = _INLINE.get(kind) if type(kind) is str else None
    if inline is not None:
        if meta.keys() != _INLINE_KEYS:
            raise _Invalid(f"it is a {kind} leaf with the fields {sorted(meta)}, not just 'path', 'type' and 'value'",
                           name + meta["path"])
        value = meta["value"]
        if type(value) not in inline and not (kind == "float" and value in _NON_FINITE):
            raise _Invalid(f"its value {_short(value)} is not a {kind}", name + meta["path"])
        return -1
    if type(kind) is not str or kind not in _ARRAY_TYPES:
        raise _Invalid(f"'type' {_short(kind)} is not a leaf type ckpt writes", name + meta["path"])
    dtype_name = meta.get("dtype")
    dtype = _DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:  # (not ``or``: a dtype is falsy, its len() being its number of fields)
        dtype = _dtype(dtype_name, name + meta["path"])
    if kind in _FRAMEWORK_TYPES and not_held(kind, dtype):
        raise _Invalid(f"a {kind} leaf of dtype {dtype}, which no {kind} array holds", name + meta["path"])
    shape = meta.get("shape")
    nbytes = _nbytes(shape, dtype.itemsize)
    if nbytes < 0:
        _checked_nbytes(shape, dtype.itemsize, "shape", name + meta["path"])
    if kind in _SHAPED_TYPES:
        _check_shaped(meta, kind, dtype, shape, name + meta["path"])
    span = meta.get("packed")
    if span is None:
        if "array" not in meta or "crc32" in meta:
            raise _Invalid("it has neither 'packed' nor 'array' (with no 'crc32'): its bytes are nowhere",
                           name + meta["path"])
        _check_array(meta, dtype, shape, nbytes, name + meta["path"])
        return -1
    crc = meta.get("crc32")
    if (type(span) is list and len(span) == 2 and type(span[0]) is int and span[0] >= 0 and not span[0] % fmt.ALIGN
            and type(span[1]) is int and span[1] == nbytes and type(crc) is int and 0 <= crc < _U32
            and "array" not in meta):
        return span[0] + nbytes
    raise _Invalid(f"'packed' {_short(span)} is not the [offset, nbytes] of the {nbytes} bytes of a {dtype} "
                   f"{shape} leaf at an offset aligned to {fmt.ALIGN}, with a 'crc32' and no 'array'", name + meta["path"])


def _check_shaped(meta: dict, kind: str, dtype: np.dtype, shape: list[int], where: str) -> None:
    """The leaf types whose shape is constrained: a 0-d np_scalar, 1-d uint8 bytes, and a jax_key whose
    ``key_shape`` leads the shape of its key data."""
    if kind == "jax_key":
        key_shape, impl = meta.get("key_shape"), meta.get("impl")
        _checked_nbytes(key_shape, 1, "key_shape", where)
        if key_shape != shape[: len(key_shape)] or type(impl) is not str or dtype != np.uint32:
            raise _Invalid(f"'key_shape' {_short(key_shape)} does not lead its 'shape' {shape}, 'impl' is not a str, "
                           f"or its key data is {dtype}, not uint32 (every jax PRNG key's)", where)
    elif (kind == "np_scalar" and shape) or (kind == "bytes" and (dtype != np.uint8 or len(shape) != 1)):
        raise _Invalid(f"a {kind} leaf of dtype {dtype} and shape {shape} is not one ckpt writes", where)


def _check_array(meta: dict, dtype: np.dtype, shape: list[int], nbytes: int, where: str) -> None:
    """A large leaf's zarr3 array: inside the step, plain bytes (with crc32c for one written by several
    processes), the leaf's shape and dtype (raw bytes when ``stored_as``), and one checksum per chunk."""
    spec = meta["array"]
    try:
        storage.relative_path(spec)
    except ValueError as e:
        raise _Invalid(str(e), where) from None
    metadata = spec.get("metadata")
    if type(metadata) is not dict or not set(metadata) <= _METADATA_KEYS:
        raise _Invalid(f"its array's 'metadata' {_short(metadata)} is not one ckpt writes", where)
    array_shape = metadata.get("shape")
    _checked_nbytes(array_shape, 1, "array shape", where)
    stored_as, want = meta.get("stored_as"), None
    if stored_as == "bytes":
        want = ("uint8", [nbytes])
    elif stored_as is None and storage.zarr_stores(dtype):
        want = (meta["dtype"], shape)
    if want != (metadata.get("data_type"), array_shape):
        raise _Invalid(f"its array ({_short(metadata.get('data_type'))}, shape {array_shape}) does not hold the leaf "
                       f"({meta['dtype']}, shape {shape}{', stored as ' + repr(stored_as) if stored_as else ''})", where)
    chunk_shape = _chunk_shape(metadata, len(array_shape), where)
    codecs = metadata.get("codecs")
    crcs, sums = meta.get("chunk_crc32"), meta.get("chunk_sum64")
    if crcs is None:  # written by several processes: tensorstore checks each chunk's crc32c
        if codecs != _CRC32C_CODECS or sums is not None:
            raise _Invalid("an array without 'chunk_crc32' must use the crc32c codec (and has no 'chunk_sum64')", where)
    else:
        if codecs != _BYTES_CODEC or chunk_shape[1:] != array_shape[1:]:
            raise _Invalid(f"{fmt.TREE} gives chunk checksums for an array whose chunks are not plain slabs along "
                           "its first axis", where)
        count = -(-array_shape[0] // chunk_shape[0]) if array_shape else 1
        _check_sums(crcs, count, 32, "chunk_crc32", where)
        if sums is not None:
            _check_sums(sums, count, 64, "chunk_sum64", where)
    if not _is_u32(meta.get("zarr_json_crc32")):
        raise _Invalid(f"'zarr_json_crc32' {_short(meta.get('zarr_json_crc32'))} is not a CRC32", where)


def _check_packed(packed: Any, end: int, nbytes_packed: int) -> None:
    """The packed array of the small leaves: inside the step, plain uint8 bytes, as long as the
    packed leaves' bytes one after another (``nbytes_packed``) and holding them all (``end``), with one
    word sum per chunk. So its size follows from the leaves' shapes, never from a number alone."""
    spec = packed.get("spec") if type(packed) is dict else None
    if spec is None:
        raise _Invalid("small leaves are packed, but 'packed' does not describe the packed array")
    try:
        storage.relative_path(spec)
    except ValueError as e:
        raise _Invalid(f"'packed': {e}") from None
    metadata, nbytes = spec.get("metadata"), packed.get("nbytes")
    if (type(metadata) is not dict or not set(metadata) <= _METADATA_KEYS or metadata.get("data_type") != "uint8"
            or metadata.get("codecs") != _BYTES_CODEC or metadata.get("shape") != [nbytes] or not _is_count(nbytes)
            or nbytes > _MAX_ARRAY_BYTES):
        raise _Invalid(f"'packed' {_short(packed)} is not plain slabs of 'nbytes' uint8 bytes (the bytes codec alone, "
                       f"at most {_MAX_ARRAY_BYTES})")
    if nbytes != nbytes_packed or end > nbytes:
        raise _Invalid(f"'packed' has {nbytes} bytes; its leaves take {nbytes_packed} (aligned to {fmt.ALIGN}) and "
                       f"end at byte {end}")
    chunk_shape = _chunk_shape(metadata, 1)
    if packed.get("chunk_sum64") is not None:
        # an empty packed array has no chunk, but its save lists the sum of one empty chunk
        _check_sums(packed["chunk_sum64"], max(1, -(-nbytes // chunk_shape[0])), 64, "'packed' chunk_sum64")
    if not _is_u32(packed.get("zarr_json_crc32")):
        raise _Invalid(f"'packed' 'zarr_json_crc32' {_short(packed.get('zarr_json_crc32'))} is not a CRC32")


def _chunk_shape(metadata: dict, ndim: int, *where: str) -> list[int]:
    grid = metadata.get("chunk_grid")
    regular = type(grid) is dict and grid.keys() == _GRID_KEYS and grid["name"] == "regular"
    config = grid["configuration"] if regular else None
    chunk_shape = config.get("chunk_shape") if type(config) is dict and config.keys() == _GRID_CONFIG_KEYS else None
    if (type(chunk_shape) is not list or len(chunk_shape) != ndim
            or not all(type(d) is int and 0 < d <= _MAX_ARRAY_BYTES for d in chunk_shape)):
        raise _Invalid(f"the chunk grid {_short(grid)} is not a regular grid of positive ints, one per dimension", *where)
    return chunk_shape


def _check_sums(values: Any, count: int, bits: int, what: str, *where: str) -> None:
    if type(values) is not list or len(values) != count:
        listed = len(values) if type(values) is list else _short(values)
        raise _Invalid(f"{fmt.TREE} lists {listed} chunk checksums for {count} chunks ({what})", *where)
    limit = 1 << bits
    if not all(type(v) is int and 0 <= v < limit for v in values):
        raise _Invalid(f"{what} holds a value that is not a {bits}-bit checksum", *where)


# --------------------------------------------------------------------------------------------- fields
_EXTENDED = {np.dtype(np.longdouble), np.dtype(np.clongdouble)} - {np.dtype(np.float64), np.dtype(np.complex128)}


def not_held(kind: str, dtype: np.dtype) -> bool:
    """Whether a leaf of ``kind`` (one of _FRAMEWORK_TYPES) can never be of ``dtype``: text, raw bytes or times,
    what numpy stores and jax and torch arrays never hold (ml_dtypes' types, of kind V too, are numbers); numpy's
    extended precision (float128, complex256), which neither has; for torch, an ml_dtypes type it lacks (int4)."""
    if dtype.kind in "USMm" or dtype.type is np.void or dtype in _EXTENDED:
        return True
    return kind == "torch" and not leaves_lib.torch_holds(dtype)


def _dtype(name: Any, where: str) -> np.dtype:
    """The dtype ``name`` stands for, if it is one ckpt writes under that very name; remembered in
    ``_DTYPES``, where a load finds it for its other leaves."""
    try:
        dtype = leaves_lib.parse_dtype(name) if type(name) is str and len(name) < 64 else None
    except (ValueError, TypeError, SyntaxError):  # numpy's parser of dtype strings raises all three
        dtype = None
    if (dtype is None or dtype.itemsize == 0 or dtype.fields is not None or dtype.subdtype is not None
            or leaves_lib.dtype_name(dtype) != name):
        raise _Invalid(f"'dtype' {_short(name)} is not a dtype ckpt stores (numeric, bool, ml_dtypes, or "
                       "fixed-size strings, bytes and times under their numpy name)", where)
    _DTYPES[name] = dtype
    return dtype


def _nbytes(shape: Any, itemsize: int) -> int:
    """The bytes of an array of ``shape`` and ``itemsize``; -1 unless ``shape`` is a list of at most 32
    non-negative ints whose bytes (zero dimensions counted as 1) stay below 2**62."""
    if type(shape) is list and len(shape) <= fmt.MAX_NDIM:
        total = bound = itemsize
        for dim in shape:
            if type(dim) is not int or dim < 0:
                return -1
            total *= dim
            bound *= dim or 1
        if bound <= _MAX_ARRAY_BYTES:
            return total
    return -1


def _checked_nbytes(shape: Any, itemsize: int, what: str, where: str) -> int:
    nbytes = _nbytes(shape, itemsize)
    if nbytes < 0:
        raise _Invalid(f"{what!r} {_short(shape)} is not a list of at most {fmt.MAX_NDIM} non-negative ints whose "
                       f"{itemsize}-byte elements fit in {_MAX_ARRAY_BYTES} bytes", where)
    return nbytes


def nested_within(value: Any, depth: int) -> bool:
    """Whether JSON ``value`` nests at most ``depth`` containers deep (checked without recursion)."""
    level = [value] if type(value) in (dict, list) else []
    for _ in range(depth + 1):  # the containers at depth 0, 1, ... ``depth``
        if not level:
            return True
        level = [v for c in level for v in (c.values() if type(c) is dict else c) if type(v) in (dict, list)]
    return not level


def is_timestamp(value: Any) -> bool:
    """Whether ``value`` is a time ckpt records: an int of nanoseconds since the epoch, before 2262."""
    return _is_count(value) and value < _MAX_TIMESTAMP


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_u32(value: Any) -> bool:
    return type(value) is int and 0 <= value < _U32


def _short(value: Any) -> str:
    """``value`` for an error message: its repr (control characters escaped), cut short."""
    return _REPR.repr(value)
