"""One Orbax PyTree item (``PyTreeHandler``, ``PyTreeCheckpointHandler``, ``StandardCheckpointHandler``)
as ckpt's loader sees a checkpointable: a tree structure, one leaf entry per leaf and a source per array.

The item's ``_METADATA`` lists every leaf by its key path (``key_type`` 1: a sequence index, 2: a dict
key or field) with its ``value_type``: ``jax.Array`` and ``np.ndarray`` (a zarr array named by the
keys joined with dots: ``params.w``), ``scalar`` (a 0-d array, restored as a Python number),
``string`` (in ``_strings.json``), and ``None``, ``Dict``, ``List``, ``Tuple`` for None and empty
containers. A jax array's ``NamedSharding`` is in ``_sharding`` (by the base64 of its name), restored
as ckpt restores its own (``ckpt.shardings``). Arrays live in one OCDBT database (``manifest.ocdbt``, ``d/``, ``ocdbt.process_<i>/``) or,
with ``use_ocdbt=False``, one directory each; zarr3 or zarr v2 by ``use_zarr3``. A typed PRNG key is
stored as its key data, its implementation in ``array_metadatas/process_<i>``, and its sharding (the key
data's) as the keys'. A leaf Orbax before 0.5.21 saved with ``SaveArgs(aggregate=True)`` (``skip_deserialize`` in
``_METADATA``) is in the item's msgpack file ``checkpoint`` instead (:mod:`ckpt.orbax.msgpack`).
"""
from __future__ import annotations

import ast
import base64
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorstore as ts

from ckpt import leaves as leaves_lib
from ckpt import host_memory, schema, storage
from ckpt import tree as tree_lib
from ckpt.errors import CheckpointCorruptedError, UnsupportedLayoutError
from ckpt.orbax import files, msgpack

# The tensorstore context of one item's arrays: OCDBT's nodes cached while its leaves are opened and read. One per
# item, never shared by the process: a database cached from a step that was deleted and saved anew since (Orbax's
# overwrite=True, a run started again in its directory) made the next read of that step fail ("mismatch on uuid").
_CONTEXT_SPEC = {"cache_pool": {"total_bytes_limit": 0}, "cache_pool#ocdbt": {"total_bytes_limit": 64 << 20}}
_SEQUENCE, _MAPPING = 1, 2
_EMPTY = {"Dict": "dict", "List": "list", "Tuple": "tuple", "NamedTuple": "namedtuple"}  # (NamedTuple: an EmptyState,
# with PyTreeMetadataOptions(support_rich_types=True); without, Orbax stores it as None. Loaded without an abstract
# tree, it is None, as in Orbax and as ckpt's own EmptyState)
# An item of Orbax's ArrayCheckpointHandler before 0.12: its one array alone, a zarr array named checkpoint, without
# the _METADATA that 0.12 writes (this one, which ckpt reads it by)
_BARE_ARRAY_METADATA = {"tree_metadata": {"('checkpoint',)": {"key_metadata": [{"key": "checkpoint", "key_type": 2}],
                                                              "value_metadata": {"value_type": "np.ndarray"}}},
                        "use_ocdbt": False, "use_zarr3": False}
MAX_DEPTH = 200  # a hostile _METADATA (or JSON item) cannot make a tree deeper than Python's recursion allows
_MAX_KEY_PATH_CHARS = 1 << 16  # an entry's name read as its key path (Orbax before 0.5): 200 keys of 300 characters


class ArraySource:
    """Reads one Orbax array through tensorstore: the read starts with :meth:`start`, every load of
    the leaf (whole or a slice) waits for it; damage raises CheckpointCorruptedError naming the leaf."""

    def __init__(self, item: "PyTreeItem", meta: dict, store: ts.TensorStore):
        self.item, self.meta, self.store = item, meta, store
        self._read: ts.Future | None = None

    def start(self) -> None:
        if self._read is None:
            self._read = self.store.read()

    def check(self, results: list) -> None:
        """Waits for the read; raises if it failed (``results`` is empty: tensorstore does the reading)."""
        self.read(None)

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        self.start()
        try:
            array = self._read.result()
        except ValueError as e:
            raise CheckpointCorruptedError(f"{self.item.directory}: leaf {self.item.name}{self.meta['path']} "
                                           f"cannot be read: {e}", path=self.item.step_dir,
                                           key_paths=(f"{self.item.name}{self.meta['path']}",)) from None
        return array if index is None else array[index]


OPENS_AT_FIRST = 256  # arrays opened before the first is waited for (see _opened)


def _opened(specs: dict[int, dict], context: ts.Context) -> Iterator[tuple[int, ts.Future]]:
    """``(i, future)`` of the opening of each array ``specs[i]``, in their order: ``OPENS_AT_FIRST`` are started,
    then, each time half of those started have been taken, as many again, so that a caller that stops at the first
    that fails has started at most four times as many as it took (a _METADATA listing 20,000 arrays none of which is
    there was refused after all were opened, in 4-5 s), and a load opens all but the first few at once."""
    order, started, ahead = list(specs), {}, 0
    for n, i in enumerate(order):
        if n >= ahead // 2 and ahead < len(order):
            for following in order[ahead:max(2 * ahead, OPENS_AT_FIRST)]:
                started[following] = ts.open(specs[following], open=True, context=context)
            ahead = len(started) + n
        yield i, started.pop(i)


def is_bare_array(directory: Path) -> bool:
    """Whether ``directory`` is an item of Orbax's ArrayCheckpointHandler before 0.12: no ``_METADATA``, and its
    array in ``checkpoint/`` (zarr)."""
    return not os.path.lexists(directory / "_METADATA") and files.is_plain_file(directory / "checkpoint" / ".zarray")


class PyTreeItem:
    """A PyTree item directory: ``doc`` is its tree and leaf entries as in ckpt's tree.json, ``stores``
    the opened array of each leaf stored as one (by leaf index). ``one_array``: the item of Orbax's
    ``ArrayCheckpointHandler``, one array in a tree of one key (``checkpoint``), which Orbax restores as
    the array itself: so does ckpt."""

    def __init__(self, step_dir: Path, name: str, directory: Path, *, one_array: bool = False):
        self.step_dir, self.name, self.directory = step_dir, name, directory
        budget = host_memory.allocatable()
        files.check_plain_tree(directory, step_dir, budget)
        metadata = (_BARE_ARRAY_METADATA if one_array and is_bare_array(directory)
                    else files.read_required_json(directory / "_METADATA", step_dir))
        entries = metadata.get("tree_metadata") if isinstance(metadata, dict) else None
        if not isinstance(entries, dict):
            raise UnsupportedLayoutError(f"{directory}/_METADATA has no tree_metadata: this Orbax layout (written "
                                         "before Orbax 0.5?) is not one ckpt reads", path=directory)
        # Orbax 0.10 and earlier did not record use_ocdbt: as Orbax reads such an item, its database's manifest says
        self._ocdbt = (bool(metadata["use_ocdbt"]) if metadata.get("use_ocdbt") is not None
                       else files.is_plain_file(directory / "manifest.ocdbt"))
        self._zarr3 = bool(metadata.get("use_zarr3", False))
        self._fill_missing = not metadata.get("store_array_data_equal_to_fill_value", False)
        root, found = _Container("dict"), []
        for where, entry in entries.items():
            keys = _keys(entry, where, directory)
            value = (entry.get("value_metadata") if isinstance(entry, dict) else None) or {}
            if not isinstance(value, dict) or not isinstance(value.get("value_type", ""), str):
                raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where[:80]!r} has a value_metadata that "
                                               "is not an object with a string value_type", path=directory)
            if not keys and len(entries) > 1:
                raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where[:80]!r} is the whole tree, beside "
                                               f"{len(entries) - 1} other entries", path=directory)
            if keys:
                _insert(root, keys, value, where, directory, found)
            else:  # the tree is one leaf (ocp.save(path, np.arange(3))), stored under the name ''
                found.append((keys, value))
        if isinstance(metadata.get("value_metadata_tree"), str):
            _apply_rich_types(root, _rich_tree(metadata["value_metadata_tree"]))
        node = _node(root, directory) if root.children or not found else tree_lib.LEAF
        leaf_paths = tree_lib.leaf_paths(node)
        by_path = {tuple(k for _, k in keys): value for keys, value in found}
        self.metas: list[dict] = []
        self.stores: dict[int, ts.TensorStore] = {}
        self.aggregated: dict[int, np.ndarray] = {}  # the arrays of the msgpack file (see ckpt.orbax.msgpack)
        self._describe(leaf_paths, by_path, budget)
        if one_array:
            node = self._unwrapped(node)
        self.doc = {"tree": tree_lib.to_json(node), "leaves": self.metas}

    def _unwrapped(self, node: tree_lib.Node) -> tree_lib.Node:
        """The one leaf of ``node``, a dict holding only it (its array keeps its name on disk)."""
        if node.kind != "dict" or node.children != [tree_lib.LEAF]:
            raise CheckpointCorruptedError(f"{self.directory}/_METADATA: an item of Orbax's ArrayCheckpointHandler "
                                           f"holds one array, this one lists {len(self.metas)} leaves", path=self.step_dir)
        self.metas[0]["path"] = tree_lib.keystr(())
        return tree_lib.LEAF

    def _describe(self, leaf_paths: list[tree_lib.KeyPath], by_path: dict[tuple, dict], budget: int) -> None:
        """Fills ``metas`` (opening every array, most at once (see :func:`_opened`), each refused past ``budget`` bytes)
        and ``stores``."""
        strings, impls, opening, aggregate = None, self._key_impls(), {}, None
        placed, context = self._shardings(), ts.Context(_CONTEXT_SPEC)
        item = str(self.directory.relative_to(self.step_dir))  # (the item may be the step itself: '.')
        for i, path in enumerate(leaf_paths):
            value = by_path[tuple(k for _, k in path)]
            kind, name = value.get("value_type"), ".".join(str(k) for _, k in path)
            meta: dict[str, Any] = {"path": tree_lib.keystr(path)}
            if kind == "None":
                meta.update(type="none", value=None)
            elif value.get("skip_deserialize") is True and kind in ("jax.Array", "np.ndarray", "scalar", "string"):
                aggregate = self._aggregate(budget) if aggregate is None else aggregate
                self._describe_aggregated(i, path, kind, meta, aggregate)
            elif kind == "string":
                strings = self._strings() if strings is None else strings
                if not isinstance(strings.get(name), str):
                    raise CheckpointCorruptedError(f"{self.directory}/_strings.json has no string {name!r}",
                                                   path=self.step_dir)
                meta.update(type="str", value=strings[name])
            elif kind in ("jax.Array", "np.ndarray", "scalar"):
                meta["type"] = {"jax.Array": "jax", "np.ndarray": "numpy", "scalar": "scalar"}[kind]
                if name in impls:
                    meta.update(type="jax_key", impl=impls[name])
                if kind == "jax.Array" and name in placed:
                    meta["sharding"] = placed[name]
                stored = os.path.normpath(os.path.join(item, name))  # (pathlib's relative_to: 50 us a leaf)
                meta["stored"] = f"{stored}" + (" (OCDBT)" if self._ocdbt else "/")
                opening[i] = self._spec(name)
            else:
                raise UnsupportedLayoutError(
                    f"{self.directory}: leaf {self.name}{meta['path']} has value type {kind!r}, written by a type handler "
                    "ckpt does not read (it reads jax.Array, np.ndarray, scalar, string, None and empty containers)",
                    path=self.directory)
            self.metas.append(meta)
        for i, future in _opened(opening, context):
            meta = self.metas[i]
            try:
                store = future.result()
            except ValueError as e:
                raise CheckpointCorruptedError(f"{self.directory}: the array of leaf {self.name}{meta['path']} cannot "
                                               f"be opened: {e}", path=self.step_dir,
                                               key_paths=(f"{self.name}{meta['path']}",)) from None
            why = _unreadable(store, budget)
            if why:
                raise CheckpointCorruptedError(f"{self.directory}: the array of leaf {self.name}{meta['path']} {why}",
                                               path=self.step_dir, key_paths=(f"{self.name}{meta['path']}",))
            dtype = np.dtype(store.dtype.numpy_dtype)
            self._check_held(meta["type"] == "jax", dtype, f"{self.name}{meta['path']}", self.directory)
            meta.update(dtype=leaves_lib.dtype_name(dtype), shape=list(store.shape))
            if meta["type"] == "jax_key":
                meta["key_shape"] = meta["shape"][:-1]
                _as_keys_sharding(meta)
            self.stores[i] = store
        scalars = {i: self.stores.pop(i).read() for i, m in enumerate(self.metas) if m["type"] == "scalar"}
        for i, read in scalars.items():  # Orbax restores a scalar as a Python number: ckpt stores those inline
            meta = self.metas[i]
            try:
                value = read.result().reshape(-1)[0].item()
            except (ValueError, IndexError) as e:
                raise CheckpointCorruptedError(f"{self.directory}: scalar {self.name}{meta['path']} cannot be read: {e}",
                                               path=self.step_dir, key_paths=(f"{self.name}{meta['path']}",)) from None
            if type(value) not in (int, float, bool):
                raise UnsupportedLayoutError(f"{self.directory}: scalar {self.name}{meta['path']} is a {meta['dtype']}, "
                                             "which ckpt does not read as a scalar", path=self.directory)
            meta.update(type=leaves_lib.INLINE_TYPES[type(value)], value=value)
            del meta["dtype"], meta["shape"], meta["stored"]

    def _aggregate(self, budget: int) -> Any:
        """The decoded msgpack ``checkpoint`` file, which holds the leaves Orbax saved with ``aggregate=True``."""
        path = self.directory / "checkpoint"
        try:
            data = storage.read_json_bytes(path, budget, parsed=False)
            return msgpack.decode(data, MAX_DEPTH, budget - len(data))
        except FileNotFoundError:
            raise CheckpointCorruptedError(f"{path} is missing: the leaves Orbax saved aggregated are in it",
                                           path=self.step_dir) from None
        except msgpack.MsgpackError as e:
            raise CheckpointCorruptedError(f"{path} is not Orbax's msgpack tree: {e}", path=self.step_dir) from None
        except ValueError as e:  # a link, a special file, or larger than this process may allocate
            raise CheckpointCorruptedError(f"{e}; not a file of an Orbax checkpoint", path=self.step_dir) from None

    def _describe_aggregated(self, i: int, path: tree_lib.KeyPath, kind: str, meta: dict, aggregate: Any) -> None:
        """Fills the entry of leaf ``i``, which Orbax saved into the msgpack file, as ckpt's readers take it:
        a scalar or string inline, an array in ``aggregated``."""
        value, where = aggregate, f"{self.name}{meta['path']}"
        for kind_of_key, key in path:  # (Orbax's msgpack tree: dicts keyed by strs, sequences as arrays)
            if isinstance(value, list) and kind_of_key == "idx" and key < len(value):
                value = value[key]
            elif isinstance(value, dict) and str(key) in value:
                value = value[str(key)]
            else:
                raise CheckpointCorruptedError(f"{self.directory}/checkpoint has no value for leaf {where}, which "
                                               "_METADATA says Orbax saved there", path=self.step_dir, key_paths=(where,))
        try:
            value = msgpack.unchunked(value)
        except msgpack.MsgpackError as e:
            raise CheckpointCorruptedError(f"{self.directory}/checkpoint: leaf {where}: {e}", path=self.step_dir,
                                           key_paths=(where,)) from None
        if kind == "scalar" and isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        want = {"string": (str,), "scalar": (int, float, bool)}.get(kind, (np.ndarray,))
        if type(value) not in want:
            raise CheckpointCorruptedError(f"{self.directory}/checkpoint holds a {type(value).__name__} for leaf "
                                           f"{where}, whose _METADATA type is {kind}", path=self.step_dir,
                                           key_paths=(where,))
        if kind in ("string", "scalar"):
            meta.update(type=leaves_lib.INLINE_TYPES[type(value)], value=value)
            return
        self._check_held(kind == "jax.Array", value.dtype, where, self.directory / "checkpoint")
        meta.update(type="jax" if kind == "jax.Array" else "numpy", dtype=leaves_lib.dtype_name(value.dtype),
                    shape=list(value.shape), stored=f"{(self.directory / 'checkpoint').relative_to(self.step_dir)} "
                                                    "(msgpack)")
        self.aggregated[i] = value

    def _check_held(self, jax_array: bool, dtype: np.dtype, where: str, file: Path) -> None:
        """Raises where a leaf Orbax's metadata calls a jax array has a dtype no jax array holds (text, times)."""
        if jax_array and schema.not_held("jax", dtype):
            raise CheckpointCorruptedError(f"{file}: leaf {where} is a jax array of dtype {dtype}, which no jax array "
                                           "holds", path=self.step_dir, key_paths=(where,))

    def _spec(self, name: str) -> dict:
        # A key may hold '/' (Haiku's 'mlp/~/linear_0'): nested directories. '': a tree that is one leaf, whose
        # array is the item directory's own.
        if name and not storage.is_plain_relative(name):
            raise CheckpointCorruptedError(f"{self.directory}: array name {name!r} is not a relative path inside the "
                                           "item", path=self.step_dir)
        base = {"driver": "file", "path": str(self.directory) + "/"}
        kvstore = ({"driver": "ocdbt", "base": base, "path": name and name + "/", "cache_pool": "cache_pool#ocdbt"}
                   if self._ocdbt else {"driver": "file", "path": os.path.join(self.directory, name, "")})
        return {"driver": "zarr3" if self._zarr3 else "zarr", "kvstore": kvstore,
                "fill_missing_data_reads": self._fill_missing}

    def _strings(self) -> dict:
        strings = files.read_required_json(self.directory / "_strings.json", self.step_dir)
        return strings if isinstance(strings, dict) else {}

    def _key_impls(self) -> dict[str, str]:
        """The PRNG implementation of each typed key's array, from ``array_metadatas/process_<i>``."""
        impls: dict[str, str] = {}
        folder = self.directory / "array_metadatas"
        for name in sorted(os.listdir(folder)) if files.is_plain_dir(folder) else []:
            doc = files.read_json(folder / name, self.step_dir)
            records = doc.get("array_metadatas") if isinstance(doc, dict) else None
            for record in records if isinstance(records, list) else []:
                array = record.get("array_metadata") if isinstance(record, dict) else None
                ext = array.get("ext_metadata") if isinstance(array, dict) else None
                if isinstance(ext, dict) and isinstance(ext.get("random_key_impl"), str):
                    impls[str(array.get("param_name"))] = ext["random_key_impl"]
        return impls

    def _shardings(self) -> dict[str, Any]:
        """The saved ``NamedSharding`` of each jax array (by its name) as ``ckpt.shardings`` JSON, from
        ``_sharding``; an entry ckpt cannot read is passed on as it is, for ``shardings.restore`` to warn of."""
        path = self.directory / "_sharding"
        doc = files.read_json(path, self.step_dir) if files.is_plain_file(path) else {}
        placed: dict[str, Any] = {}
        for key, text in doc.items() if isinstance(doc, dict) else ():
            try:
                name = base64.urlsafe_b64decode(key).decode()
                entry = json.loads(text)
            except (ValueError, TypeError, RecursionError):
                continue  # not the sharding of any leaf
            sharding = _named_sharding(entry)
            if sharding is not None:
                placed[name] = sharding
        return placed

    def sources(self, wanted) -> list[ArraySource | np.ndarray | None]:
        """A source for each wanted leaf stored as an array (None for the others)."""
        row: list[ArraySource | np.ndarray | None] = [None] * len(self.metas)
        for i in wanted:
            if i in self.stores and row[i] is None:
                row[i] = ArraySource(self, self.metas[i], self.stores[i])
            elif i in self.aggregated:  # (read already: the array itself, which ckpt.loading takes for its source)
                row[i] = self.aggregated[i]
        return row


def _named_sharding(entry: Any) -> Any:
    """Orbax's JSON of a ``NamedSharding`` (``shape``, ``axis_names``, ``axis_types``, ``partition_spec``,
    ``device_mesh``: nested lists of ``{"id": n}``) as ``ckpt.shardings``'; None for another sharding (a single
    device's: the default device); the entry itself when it cannot be read."""
    if not isinstance(entry, dict) or entry.get("sharding_type") != "NamedSharding":
        return None
    try:
        devices, shape = entry["device_mesh"]["mesh"], entry["shape"]
        if not isinstance(shape, list) or len(shape) > 64:  # (a mesh has numpy's 64 axes at most)
            raise TypeError
        for _ in shape[1:]:  # (each row a list: strings would be flattened into characters at every axis)
            if not (isinstance(devices, list) and all(isinstance(row, list) for row in devices)):
                raise TypeError
            devices = [d for row in devices for d in row]
        sharding = {"mesh_shape": list(entry["shape"]), "axis_names": list(entry["axis_names"]),
                    "device_ids": [d["id"] for d in devices], "spec": list(entry["partition_spec"])}
        if "axis_types" in entry:  # ["AxisType.Explicit", ...], as Orbax writes them
            sharding["axis_types"] = [str(t).removeprefix("AxisType.") for t in entry["axis_types"]]
        return sharding
    except (TypeError, KeyError, IndexError):
        return entry


def _as_keys_sharding(meta: dict) -> None:
    """Makes the saved sharding of a typed key's array (Orbax's is its key data's, whose last axis is whole:
    ``["x", null]`` for keys of shape (8,)) the keys' own, as ckpt stores it (``["x"]``)."""
    sharding = meta.get("sharding")
    spec = sharding.get("spec") if isinstance(sharding, dict) else None
    if isinstance(spec, list) and len(spec) > len(meta["key_shape"]):
        sharding["spec"] = spec[:len(meta["key_shape"])]


def _unreadable(store: ts.TensorStore, budget: int) -> str | None:
    """Why tensorstore cannot be trusted to read an Orbax array, whose zarr metadata no checksum seals:
    chunks (or shards) larger than the array, or an array of more than ``budget`` bytes (what this
    process may allocate). Past either, tensorstore's allocation would fail, and it aborts the process then."""
    layout, shape = store.chunk_layout, list(store.shape)
    chunk_shapes = [list(layout.read_chunk.shape or ()), list(layout.write_chunk.shape or ())]
    if any(c > max(d, 1) for chunk_shape in chunk_shapes for c, d in zip(chunk_shape, shape)):
        return f"has chunks {chunk_shapes[0]} (shards {chunk_shapes[1]}) larger than its shape {shape}"
    nbytes = np.dtype(store.dtype.numpy_dtype).itemsize * int(np.prod(shape, dtype=object))
    if nbytes > budget:
        return f"declares {nbytes} bytes (shape {shape}), more than this process may allocate"
    return None


class _Container:
    """A container being rebuilt from ``_METADATA``'s key paths."""

    def __init__(self, kind: str):
        self.kind = kind
        self.children: dict[Any, Any] = {}  # key -> _Container or a leaf's value metadata
        self.name: str | None = None  # a namedtuple's class name, its fields in ``children``'s order


def _keys(entry: Any, where: str, directory: Path) -> list[tuple[str, Any]]:
    """A ``_METADATA`` entry's key path as ckpt key entries (``("idx", 0)``, ``("key", "w")``)."""
    keys = entry.get("key_metadata") if isinstance(entry, dict) else None
    if not isinstance(keys, list) or not keys:
        # Orbax before 0.5 wrote only the key path tuple: "('params', 'w')". Python's parser takes ~250 bytes a
        # character of a long one (3 GB for 12 MB of "'k',"), and raises RecursionError or MemoryError for one nested
        # past its stack: one longer than a key path ckpt reads, or with more commas than its keys, is not parsed
        if len(where) > _MAX_KEY_PATH_CHARS or where.count(",") > MAX_DEPTH:
            raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where[:80]!r} ({len(where)} characters) is "
                                           f"no key path of at most {MAX_DEPTH} keys, as ckpt reads", path=directory)
        try:
            keys = [{"key": k, "key_type": _MAPPING} for k in ast.literal_eval(where)]
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where[:80]!r} has no key path",
                                           path=directory) from None
    if len(keys) > MAX_DEPTH:
        raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where[:80]!r} is {len(keys)} levels deep; "
                                       f"ckpt reads trees up to {MAX_DEPTH}", path=directory)
    out = []
    for key in keys:
        value, kind = (key.get("key"), key.get("key_type")) if isinstance(key, dict) else (None, None)
        index = str(value)  # ('²' is a digit to isdigit; int() refuses more than 4300 digits, no position has 19)
        if kind == _SEQUENCE and index.isascii() and index.isdigit() and len(index) < 19:
            out.append(("idx", int(index)))
        elif type(value) in (str, int) and kind in (_MAPPING, None):  # (not JSON's true: True == 1)
            out.append(("key", value))
        else:
            raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where!r} has a key {key!r} ckpt does not "
                                           "read", path=directory)
    return out


def _insert(root: _Container, keys: list[tuple[str, Any]], value: dict, where: str, directory: Path,
            found: list) -> None:
    node = root
    for depth, (kind, key) in enumerate(keys):
        want = "list" if kind == "idx" else "dict"
        if not isinstance(node, _Container) or node.children and node.kind != want:
            raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where!r} conflicts with another entry",
                                           path=directory)
        node.kind = want
        if depth == len(keys) - 1:
            if key in node.children:
                raise CheckpointCorruptedError(f"{directory}/_METADATA: entry {where!r} is listed twice", path=directory)
            empty = _EMPTY.get(value.get("value_type"))
            node.children[key] = _Container(empty) if empty else value
            if not empty:
                found.append((keys, value))
        else:
            node = node.children.setdefault(key, _Container(want))


def _node(container: _Container, directory: Path) -> tree_lib.Node:
    """The structure as ckpt's tree nodes: dict keys sorted (jax's order), sequence positions and a namedtuple's
    fields in order."""
    keys = sorted(container.children, key=lambda k: (isinstance(k, str), k))
    if container.kind in ("list", "tuple"):
        if keys != list(range(len(keys))):
            raise CheckpointCorruptedError(f"{directory}/_METADATA: a sequence has positions {keys[:10]}, not 0..n-1",
                                           path=directory)
        entries = [("idx", k) for k in keys]
    elif container.kind == "namedtuple":
        keys = list(container.children)
        entries = [("attr", k) for k in keys]
    else:
        entries = [("key", k) for k in keys]
    children = [_node(c, directory) if isinstance(c, _Container) else tree_lib.LEAF
                for c in (container.children[k] for k in keys)]
    return tree_lib.Node(container.kind, entries, children, name=container.name)


def _rich_tree(text: str) -> Any:
    """Orbax's ``value_metadata_tree`` (written with ``PyTreeMetadataOptions(support_rich_types=True)``), the tree
    with the type of each container, tuples and NamedTuples included, decoded; None where it is not JSON or may take
    more memory decoded than this process may still allocate (it only names the containers' types, which the item
    loads without)."""
    if storage.json_room_short(text) is not None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _apply_rich_types(container: _Container, rich: Any) -> None:
    """Gives ``container`` and the containers in it the types ``rich`` (:func:`_rich_tree`) records for them where
    it agrees with ``_METADATA``'s key paths, as Orbax rebuilds them: a sequence saved as a tuple is a tuple, a dict
    saved as a NamedTuple a namedtuple (with its fields in their order; loaded without an abstract tree it is a dict,
    as ckpt's own). Where the two disagree, a container stays what the key paths make it (a list or a dict)."""
    record = rich if isinstance(rich, dict) else {}
    entries = record.get("entries") if isinstance(record.get("entries"), list) else None
    fields = [e.get("key") if isinstance(e, dict) else None for e in entries or ()]
    if (entries is not None and record.get("category") == "custom" and record.get("clazz") == "tuple"
            and container.kind == "list" and set(container.children) == set(range(len(entries)))):
        container.kind = "tuple"
        pairs = list(enumerate(entries))
    elif (entries is not None and record.get("category") == "namedtuple" and isinstance(record.get("clazz"), str)
          and container.kind == "dict" and all(isinstance(field, str) for field in fields)
          and len(set(fields)) == len(fields) == len(container.children) and set(fields) == set(container.children)):
        container.kind, container.name = "namedtuple", record["clazz"]
        container.children = {field: container.children[field] for field in fields}
        pairs = [(field, e.get("value")) for field, e in zip(fields, entries)]
    elif isinstance(rich, list) and container.kind == "list":
        pairs = list(enumerate(rich))
    elif isinstance(rich, dict) and container.kind == "dict":  # (a dict of the tree's own, a key "category" too)
        pairs = list(rich.items())
    else:
        return
    for key, below in pairs:
        child = container.children.get(key)
        if isinstance(child, _Container):
            _apply_rich_types(child, below)
