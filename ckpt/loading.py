"""One step: read the manifest, match the abstract tree, read the arrays.

Every mismatch between the abstract tree and the saved one is collected first and reported in one
ValueError; nothing is read until the trees match. A local step's arrays are read from their chunk
files, following tree.json (their zarr.json, which other readers need, is checked by ``ckpt verify``,
not by a load); every chunk read is prepared first, then they all run on the reading threads
(:func:`ckpt.chunks.run_all`) before the result is built. Damaged data (a checksum, a missing file, a
malformed manifest) raises :class:`ckpt.errors.CheckpointCorruptedError` naming the step and key path.
"""
from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from ckpt import casts, chunks, collector, custom
from ckpt import format as fmt
from ckpt import leaves as leaves_lib
from ckpt import objectstore, progress, shardings, storage, transfers
from ckpt import tree as tree_lib
from ckpt.errors import (CheckpointableNotFoundError, CheckpointCorruptedError, InvalidLayoutError, TreeMismatchError,
                         UnregisteredTypeError, UnsupportedLayoutError)
from ckpt.leaf_table import LeafTable, as_table
from ckpt.metadata import CheckpointMetadata, LeafMetadata
from ckpt.schema import read_manifest, read_tree
from ckpt.tree import KeyPath, keystr


class _PackedReader:
    """The small leaves being loaded (:meth:`add`), as views of one buffer that the reads of
    :meth:`reads` fill with the chunks of the packed array that hold them, each chunk checked against
    its word sum (``checked``; a step saved without chunk sums is checked leaf by leaf, against each
    leaf's CRC32). A leaf's row holds this reader until :meth:`reads`, then the leaf's array."""

    def __init__(self, step_dir: Path, doc: dict | None, files: storage.LocalFiles | None):
        self.step_dir, self.doc, self.files = step_dir, doc, files
        self.checked = doc is not None and "chunk_sum64" in doc
        self._data = np.empty(0, np.uint8)
        self._lo = 0
        self._rows: list[tuple[str, list, LeafTable, list[int]]] = []  # (name, row, its leaf table, leaves read)
        self._chunks: list[chunks.Chunk] = []

    def add(self, name: str, row: list, table: LeafTable, indices: list[int]) -> None:
        """Reads the packed leaves ``indices`` of checkpointable ``name`` (leaf table ``table``) into ``row``."""
        if indices:
            self._rows.append((name, row, table, indices))

    def _leaves(self) -> Iterator[tuple[str, list[int], int]]:
        """(key path, [offset, nbytes], crc32) of each packed leaf being loaded."""
        return ((name + table.path[i], table.packed[i], table.crc32[i])
                for name, _, table, indices in self._rows for i in indices)

    def reads(self) -> list[chunks.Read]:
        """The reads of the chunks that hold the bytes of the packed leaves; each leaf's row gets its
        array, a view of the buffer they fill (read once the reads have run and :meth:`check` passed)."""
        if not self._rows:
            return []
        groups = [(row, table, indices, _spans(table, indices)) for _, row, table, indices in self._rows]
        lo = min(int(spans[:, 0].min()) for *_, spans in groups)
        hi = max(int((spans[:, 0] + spans[:, 1]).max()) for *_, spans in groups)
        spec = self.doc["spec"]
        try:
            self._lo, self._data, reads = chunks.range_reads(
                _chunk_source(spec, self.step_dir, self.files), spec, self.doc.get("chunk_sum64"), lo, hi)
        except ValueError as e:
            raise self._damaged([where for where, _, _ in self._leaves()], str(e)) from None
        self._chunks = [chunk for chunk, _ in reads]
        typed: dict[str, np.ndarray] = {}  # dtype name -> the buffer viewed as that dtype
        for row, table, indices, spans in groups:
            every = len(indices) == len(table)  # (then in row order, whatever order they were asked in)
            dtypes, shapes = (table.dtype, table.shape) if every else ([table.dtype[i] for i in indices],
                                                                       [table.shape[i] for i in indices])
            ndims = list(map(len, shapes))
            arrays = self._views(dtypes, ndims, spans, typed)
            for j in itertools.compress(range(len(shapes)), map((1).__lt__, ndims)):
                arrays[j] = arrays[j].reshape(shapes[j])
            if every:
                row[:] = arrays
            else:
                for i, array in zip(indices, arrays):
                    row[i] = array
        return [read for _, read in reads]

    def _views(self, dtypes: list[str], ndims: list[int], spans: np.ndarray,
               typed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The arrays of dtypes ``dtypes`` whose bytes are at ``spans`` ([offset, nbytes] rows) of the packed
        array, 0-d where ``ndims`` says 0, else flat: views of the read buffer (``typed``: that buffer as each
        dtype, made once)."""
        data, names = self._data, set(dtypes)
        for name in names - typed.keys():
            dtype = leaves_lib.parse_dtype(name)
            typed[name] = data[: data.size - data.size % dtype.itemsize].view(dtype)
        sizes = {name: typed[name].itemsize for name in names}
        itemsize = (sizes.popitem()[1] if len(set(sizes.values())) == 1
                    else np.array(list(map(sizes.__getitem__, dtypes)), np.int64))
        offsets, nbytes = spans[:, 0] - self._lo, spans[:, 1]
        starts, stops = (offsets // itemsize).tolist(), ((offsets + nbytes) // itemsize).tolist()
        arrays = [typed[name][start:stop] if ndim else typed[name][start, ...]  # (a 0-d view in one step)
                  for name, start, stop, ndim in zip(dtypes, starts, stops, ndims)]
        for j in np.flatnonzero(offsets % itemsize).tolist():  # a dtype whose size does not divide the alignment
            start = int(offsets[j])
            flat = data[start: start + int(nbytes[j])].view(typed[dtypes[j]].dtype)
            arrays[j] = flat if ndims[j] else flat[0, ...]
        return arrays

    def check(self, results: list[str | None]) -> None:
        """Raises for a damaged chunk (``results``: what :meth:`reads` returned) that holds a leaf being
        loaded, naming those leaves (a damaged chunk that holds none of them is no concern of this load),
        or, in a step without chunk sums, for the first leaf whose bytes do not match its CRC32."""
        damage = [(chunk, why) for chunk, why in zip(self._chunks, results) if why]
        if damage:
            hit = [where for where, (offset, nbytes), _ in self._leaves()
                   if any(c.start < offset + nbytes and offset < c.stop for c, _ in damage)]
            if hit:
                raise self._damaged(hit, _reasons(why for _, why in damage))
        if not self.checked:
            for where, (offset, nbytes), crc in self._leaves():
                start = offset - self._lo
                if fmt.crc32(self._data[start: start + nbytes]) != crc:
                    raise _leaf_damaged(self.step_dir, where, "its bytes do not match the CRC32 in the manifest")

    def _damaged(self, where: list[str], why: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(
            f"{self.step_dir}: leaves {', '.join(where[:5])}{' ...' if len(where) > 5 else ''} are damaged: "
            f"the packed array of the small leaves ({fmt.PACKED}/) cannot be read: {why}",
            path=self.step_dir, key_paths=tuple(where))


def _spans(table: LeafTable, indices: list[int]) -> np.ndarray:
    """The [offset, nbytes] in the packed array of rows ``indices`` of ``table`` (packed leaves), as an
    (n, 2) array; all of them in row order when ``indices`` are all the rows."""
    if table.spans is not None:
        return table.spans if len(indices) == len(table) else table.spans[indices]
    packed = table.packed
    return np.array([packed[i] for i in (range(len(table)) if len(indices) == len(table) else indices)],
                    np.int64).reshape(-1, 2)


def _leaf_damaged(step_dir: Path, where: str, why: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{step_dir}: leaf {where} is damaged: {why}", path=step_dir, key_paths=(where,))


class _LeafSource:
    """Reads one saved leaf that has its own array, whole or a slice, checking its checksums; errors
    name the key path."""

    __slots__ = ("step_dir", "name", "meta", "files", "_array", "_out", "_store")

    def __init__(self, step_dir: Path, name: str, meta: dict, files: storage.LocalFiles | None):
        self.step_dir, self.name, self.meta, self.files = step_dir, name, meta, files
        self._array: np.ndarray | None = None  # the whole leaf as stored, once read and checked
        self._out: np.ndarray | None = None    # the same, while it is read
        self._store = None

    @property
    def where(self) -> str:
        return f"{self.name}{self.meta['path']}"

    def _fail(self, why: str) -> CheckpointCorruptedError:
        return _leaf_damaged(self.step_dir, self.where, why)

    def reads(self) -> list[chunks.Read]:
        """The reads of a large leaf saved by one process (it has chunk checksums), chunk by chunk into
        the result (see :mod:`ckpt.chunks`). A leaf spread over processes is read by :meth:`read`,
        whole or a slice."""
        meta = self.meta
        if "chunk_crc32" not in meta or self._array is not None or self._out is not None:
            return []
        metadata = meta["array"]["metadata"]
        try:
            flat, reads = chunks.leaf_reads(_chunk_source(meta["array"], self.step_dir, self.files), meta)
        except ValueError as e:
            raise self._fail(str(e)) from None
        self._out = flat.view(leaves_lib.parse_dtype(metadata["data_type"])).reshape(metadata["shape"])
        return reads

    def check(self, results: list[str | None]) -> None:
        """Raises if a chunk is damaged (``results``: what :meth:`reads` returned); else the leaf is read."""
        damage = [why for why in results if why]
        if damage:
            raise self._fail(_reasons(damage))
        if self._out is not None:
            self._array, self._out = self._out, None

    def _open(self):
        """The leaf's array, opened with tensorstore; in a local step, its zarr.json and every chunk
        file are looked at first (ValueError), since tensorstore would follow a link or wait on a FIFO."""
        if self._store is None:
            spec = self.meta["array"]
            if self.files is not None:
                why = chunks.check_array_files(_chunk_source(spec, self.step_dir, self.files), self.meta)
                if why:
                    raise ValueError(why)
            self._store = storage.open_for_read(storage.resolve_kvstore(spec, self.step_dir))
        return self._store

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        meta = self.meta
        bytes_stored = meta.get("stored_as") == "bytes"
        if self._array is None:  # spread over processes: read now, the slice asked for or the whole leaf
            try:
                with objectstore.access_errors(f"reading {self.where} from {self.step_dir}"):  # (no damage)
                    if index is not None and not bytes_stored:
                        return self._open()[index].read().result()
                    self._array = self._open().read().result()
            except ValueError as e:
                raise self._fail(str(e)) from None
        array = (self._array.view(leaves_lib.parse_dtype(meta["dtype"])).reshape(meta["shape"]) if bytes_stored
                 else self._array)
        return array if index is None else array[index]


def _reasons(whys: Iterable[str]) -> str:
    """Why chunks are damaged, each reason once (an array that cannot be opened fails every chunk)."""
    return "; ".join(dict.fromkeys(whys))


def _chunk_source(spec: dict, step_dir: Path | Any, files: storage.LocalFiles | None) -> chunks.LocalArray | Any:
    """Where the chunks of an array in tree.json are read from: its directory in a local step (whose
    ``files`` are looked at before they are read), or through tensorstore, the array being opened."""
    if files is not None:
        return chunks.LocalArray(storage.local_array_dir(spec, step_dir), files)
    return storage.start_open_for_read(storage.resolve_kvstore(spec, step_dir))


def _leaf_metadata(meta: dict) -> LeafMetadata:
    if "dtype" not in meta:
        return LeafMetadata(meta["type"], None, None)
    dtype = leaves_lib.parse_dtype(meta["dtype"])
    shape = tuple(meta.get("key_shape", meta["shape"]))
    sharding = None
    if meta["type"] in ("jax", "jax_key") and "sharding" in meta and "jax" in sys.modules:  # (a read imports no jax)
        sharding = shardings.restore(meta["sharding"], shape, warn=False)
    return LeafMetadata(meta["type"], shape, dtype, math.prod(meta["shape"]) * dtype.itemsize, sharding)


def tree_metadata(doc: dict) -> Any:
    """The saved tree with :class:`LeafMetadata` leaves (plain dicts/lists for typed containers)."""
    node = tree_lib.from_json(doc["tree"])
    return tree_lib.unflatten(node, iter(_leaf_metadata(m) for m in doc["leaves"]))


class Plan(NamedTuple):
    """How the abstract tree receives the saved leaves: its structure (that of the saved tree when the
    two are alike in plain containers) and its leaves in flatten order, and either ``order`` (leaf j
    receives saved leaf ``order[j]``; None: saved leaf j), or ``pairs``: the saved leaves each leaf
    receives (a placeholder none, a None leaf a saved subtree)."""

    node: tree_lib.Node
    leaves: list[Any]
    pairs: list[tuple[KeyPath, Any, list[int]]] | None
    order: list[int] | None = None


def _match(table: LeafTable, saved_node: tree_lib.Node, abstract: Any, name: str,
           partial: bool) -> tuple[Plan, list[str]]:
    """Pairs each abstract leaf with the saved leaves it receives (``table``: theirs); lists every difference."""
    plain = tree_lib.plain_leaves(saved_node, abstract)
    if plain is not None and leaves_lib.shapes_match(plain, table):  # the usual case, found without key paths
        return Plan(saved_node, plain, None), []
    abstract_node, abstract_leaves = tree_lib.flatten(abstract)
    leaves = list(map(_SECOND, abstract_leaves))
    if tree_lib.same_keys(abstract_node, saved_node):  # leaf i receives saved leaf i
        diffs = [f"{name}{why}" for why in leaves_lib.check_leaves(abstract_leaves, table)]
        return Plan(abstract_node, leaves, None), diffs
    order = tree_lib.leaf_order(abstract_node, saved_node)
    if order is not None:  # the same keys in another order: leaf j receives saved leaf order[j]
        diffs = [f"{name}{why}" for why in leaves_lib.check_leaves(abstract_leaves, table, order)]
        return Plan(abstract_node, leaves, None, order), diffs
    saved_paths = tree_lib.leaf_paths(saved_node)
    index = {tuple([k for _, k in p]): i for i, p in enumerate(saved_paths)}
    as_text: dict[tuple, int] = {}
    pairs, diffs, covered = [], [], set()
    for path, leaf in abstract_leaves:
        key = tuple([k for _, k in path])
        i = index.get(key)
        if i is None:  # Orbax stores keys as text ({0: ...} as {"0": ...}, as an nnx.Optimizer's state has), and
            # restores them into the abstract tree's keys: so does ckpt
            as_text = as_text or {tuple(map(str, k)): j for k, j in index.items()}
            i = as_text.get(tuple(map(str, key)))
        if leaf is leaves_lib.PLACEHOLDER or (leaf is None and i is None):
            under = [i for p, i in index.items() if p[: len(key)] == key]
            covered.update(under)
            if leaf is None and not under and tree_lib.subtree(saved_node, path) is None:
                diffs.append(f"{name}{keystr(path)}: in the abstract tree, not in the checkpoint")
            pairs.append((path, leaf, under))
            continue
        if i is None:
            diffs.append(f"{name}{keystr(path)}: in the abstract tree, not in the checkpoint")
            continue
        covered.add(i)
        why = leaves_lib.check_leaf(path, table[i], leaf)
        if why:
            diffs.append(f"{name}{why}")
        pairs.append((path, leaf, [i]))
    if not partial:
        for i, p in enumerate(saved_paths):
            if i not in covered and not _empty_receives(table[i], abstract_node, p):
                empty = _empty_above(abstract_node, p)
                diffs.append(f"{name}{keystr(p)}{_ONLY_SAVED}" if empty is None else
                             f"{name}{keystr(p)}{_UNDER_EMPTY}{name}{keystr(empty)} is empty)")
    return Plan(abstract_node, leaves, pairs), diffs


_ONLY_SAVED = ": in the checkpoint, not in the abstract tree"  # a difference partial_load accepts
_UNDER_EMPTY = ": in the checkpoint, not in the abstract tree (where "  # one it would silently drop


def _partial_load_hint(diffs: list[str]) -> str:
    """How to load what the abstract tree leaves out: for entries under an empty container of the
    abstract tree, read that part as saved (a partial load would drop them); for keys that differ by
    torch.compile's ``_orig_mod.``, the wrapped module's state; when all that differs is what the abstract
    tree leaves out, load a part."""
    if any(_UNDER_EMPTY in d for d in diffs):
        return ("\nAn empty container of the abstract tree receives none of the checkpoint's entries under it (a "
                "torch optimizer's state_dict() holds an empty 'state' until its first step): put None in its place "
                "(or in place of a container above it) to read that part as saved; a partial load would leave "
                "those entries out.")
    if any("_orig_mod" in d for d in diffs):
        return ("\nKeys that differ by `_orig_mod.` come from `torch.compile`, whose module's state_dict() names each "
                "key under the module it wraps: save and load the wrapped module's state (`compiled._orig_mod`, or "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict, which leaves the prefix out).")
    if diffs and all(d.endswith(_ONLY_SAVED) for d in diffs):
        return ("\nTo load only the abstract tree's part of the checkpoint, load inside "
                "`with ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True)):` (Orbax's "
                "ctx.pytree.loading.partial_load).")
    return ""


def _empty_above(abstract_node: tree_lib.Node, path: KeyPath) -> KeyPath | None:
    """The path of the empty container (``{}``, ``[]``) of the abstract tree that ``path`` (a saved leaf's)
    lies under, or None if it lies under none."""
    for depth in range(len(path)):
        node = tree_lib.subtree(abstract_node, path[:depth])
        if node is None:
            return None
        if node.kind != "leaf" and not node.children:
            return path[:depth]
    return None


def _empty_receives(meta: dict, abstract_node: tree_lib.Node, path: KeyPath) -> bool:
    """Whether a saved None is received by an empty container of the abstract tree (an optax
    ``EmptyState``, ``{}``): neither holds data, and Orbax stores every empty container as None."""
    node = tree_lib.subtree(abstract_node, path)
    return meta["type"] == "none" and node is not None and node.kind != "leaf" and not node.children


def unwrap(abstract: Any) -> dict[str, Any] | None:
    """The abstract trees, where a :class:`CheckpointMetadata` (what ``metadata()`` returned) stands
    for its ``.metadata``, as Orbax accepts ``load(path, metadata(path))``; None (every checkpointable) for
    None or an empty dict, as Orbax loads every checkpointable for either.

    Raises:
      TypeError: ``abstract`` is no mapping of checkpointable names (a list of names, a tree's name).
    """
    if isinstance(abstract, CheckpointMetadata):
        abstract = abstract.metadata
    if abstract is None or (isinstance(abstract, Mapping) and not abstract):
        return None
    if not isinstance(abstract, Mapping):
        raise TypeError(f"abstract_checkpointables must be a dict of checkpointable names to abstract trees ({{'state': "
                        f"None}} reads 'state' as saved; None reads every one), got {type(abstract).__name__} "
                        f"{abstract!r:.200}")
    return {name: tree.metadata if isinstance(tree, CheckpointMetadata) else tree for name, tree in abstract.items()}


def only_tree(trees: dict, handled: dict, names: Iterable[str]) -> str | None:
    """The name to read when ``names`` is just ``"state"`` (or Orbax's ``"AUTO"``) and the step has no
    such checkpointable but exactly one tree (beside any checkpointables saved by handlers): that tree's
    name, as Orbax falls back to it; for ``"AUTO"``, ``"state"`` where the step has it; else None."""
    names = list(names)
    if names == [fmt.AUTO] and (fmt.DEFAULT_CHECKPOINTABLE in trees or fmt.DEFAULT_CHECKPOINTABLE in handled):
        return fmt.DEFAULT_CHECKPOINTABLE
    if (len(names) == 1 and names[0] in (fmt.DEFAULT_CHECKPOINTABLE, fmt.AUTO) and names[0] not in trees
            and names[0] not in handled and len(trees) == 1):
        return next(iter(trees))
    return None


def load_checkpointables(step_dir: Path, abstract: dict[str, Any] | None, *, partial_load: bool = False,
                         registry: Any = None) -> dict[str, Any]:
    """Loads the named checkpointables of one step directory (all of them when ``abstract`` is None).

    A lone ``"state"`` (or ``"AUTO"``) that the step lacks means its only checkpointable (see
    :func:`only_tree`). Checkpointables saved by handlers are loaded by :mod:`ckpt.custom`
    (``registry``: the handlers to use; default: the active Context's).
    """
    manifest = read_manifest(step_dir)
    # The collector stays paused until tree.json's objects (a few per leaf) are freed, reads included:
    # else its first pass walks them all, and keeping them promotes them until a full collection
    # follows (11 us a leaf of a 10,000-leaf load).
    with collector.paused():
        return _load_checkpointables(step_dir, manifest, abstract, partial_load, registry)


def _load_checkpointables(step_dir: Path, manifest: dict, abstract: dict[str, Any] | None, partial_load: bool,
                          registry: Any) -> dict[str, Any]:
    doc = read_tree(step_dir, manifest)
    trees, handled = doc["checkpointables"], doc.get("handled", {})
    abstract = unwrap(abstract)
    if abstract is None:
        abstract = {name: None for name in [*trees, *handled]}
    only = only_tree(trees, handled, abstract)
    if only is not None:
        (name, tree), = abstract.items()
        return {name: load_checkpointables(step_dir, {only: tree}, partial_load=partial_load)[only]}
    missing = [name for name in abstract if name not in trees and name not in handled]
    if missing:
        raise CheckpointableNotFoundError(step_dir, missing, [*trees, *handled])
    customs = {name: abstract[name] for name in abstract if name in handled}
    if customs:
        loaded = custom.load(step_dir, handled, customs, registry)
        rest = {name: tree for name, tree in abstract.items() if name not in handled}
        return {**(load_checkpointables(step_dir, rest, partial_load=partial_load) if rest else {}), **loaded}
    packed = _PackedReader(step_dir, doc.get("packed"), storage.LocalFiles(step_dir) if isinstance(step_dir, Path) else None)

    large: list[_LeafSource] = []  # the leaves with arrays of their own, as sources() makes them

    def sources(name: str, table: LeafTable, wanted: Iterable[int]) -> list[Any]:
        whole = wanted == range(len(table))  # (what else _wanted gives never equals a range)
        wanted = list(wanted)
        if table.spans is not None and (whole or len(set(wanted)) == len(table)):  # every leaf packed, each one wanted
            row = [packed] * len(table)
            packed.add(name, row, table, wanted)
            return row
        row: list[Any] = [None] * len(table)
        small, spans, more = [], table.packed, table.more
        for i in wanted:
            if row[i] is None:
                if spans[i] is not None:
                    row[i] = packed
                    small.append(i)
                elif more[i] is not None and "array" in more[i]:
                    row[i] = _LeafSource(step_dir, name, table[i], packed.files)
                    large.append(row[i])
        packed.add(name, row, table, small)
        return row

    def reads() -> list[tuple[Any, list[chunks.Read]]]:
        return [(packed, packed.reads())] + [(source, source.reads()) for source in large
                                             if "chunk_crc32" in source.meta]

    return load_trees(step_dir, doc["checkpointables"], abstract, partial_load=partial_load,
                      sources=sources, reads=reads)


Sources = Callable[[str, LeafTable, Iterable[int]], list[Any]]
Reads = Callable[[], list[tuple[Any, list[chunks.Read]]]]


def load_trees(step_dir: Any, trees: dict[str, dict], abstract: dict[str, Any] | None, *, partial_load: bool,
               sources: Sources, reads: Reads) -> dict[str, Any]:
    """Matches the abstract trees against saved ones (``trees``: name -> ``{"tree", "leaves"}`` as in
    tree.json, the leaves a :class:`LeafTable` or a list of entries), reads the leaves asked for and
    builds the result; any format's reader calls it, having checked that every name of ``abstract`` is
    one of ``trees``.

    ``sources(name, table, wanted)`` gives one source per saved leaf (None for leaves stored inline
    and those not in ``wanted``); a source's ``read(index)`` returns the leaf, whole or a slice. (A
    reader may put the leaf's array itself in the row in place of its source, filled by its reads.)
    ``reads()`` then gives ``(checker, chunk reads)`` pairs for the sources made: the reads all run on the
    reading threads, then each checker's ``check(results)`` raises for damage.
    """
    abstract = unwrap(abstract)
    if abstract is None:
        abstract = {name: None for name in trees}
    with collector.paused():  # a few objects per leaf (see ckpt.collector)
        nodes = {name: tree_lib.from_json(trees[name]["tree"]) for name in abstract}
        tables = {name: as_table(trees[name]["leaves"]) for name in abstract}
        plans, diffs = {}, []
        for name, abstract_tree in abstract.items():
            if abstract_tree is None:
                plans[name] = None
                continue
            plans[name], found = _match(tables[name], nodes[name], abstract_tree, name, partial_load)
            diffs.extend(found)
        if diffs:
            raise TreeMismatchError(
                f"User-provided restore item and on-disk value differ: the abstract tree does not "
                f"match the checkpoint in {step_dir} ({len(diffs)} difference"
                f"{'s' if len(diffs) != 1 else ''}):\n  " + "\n  ".join(diffs) + _partial_load_hint(diffs),
                differences=diffs)
        rows = {name: sources(name, tables[name], _wanted(len(tables[name]), plans[name])) for name in abstract}
        jobs = reads()
    every_read = [read for _, job_reads in jobs for read in job_reads]
    tracker = progress.Tracker(f"loading {step_dir}", sum(read.nbytes for read in every_read))
    results = iter(chunks.run_all(every_read, tracker))
    tracker.finish()
    for reader, job_reads in jobs:
        reader.check([next(results) for _ in job_reads])
    with collector.paused(), transfers.explicit():
        built = {}
        for name in abstract:
            try:
                built[name] = _build(tables[name], nodes[name], plans[name], rows[name])
            except leaves_lib.LeafDataError as e:
                if not e.mismatch:
                    raise _leaf_damaged(step_dir, name + e.path, e.why) from None
                why = f"{name}{e.path}: {e.why}"
                raise TreeMismatchError(f"User-provided restore item and on-disk value differ in {step_dir}: {why}",
                                        differences=[why]) from None
        return built


def _wanted(count: int, plan: Plan | None) -> Iterable[int]:
    """The saved leaves a load reads: all, or those the abstract tree asks for (not placeholders)."""
    if plan is None:
        return range(count)
    if plan.pairs is None:
        order = range(count) if plan.order is None else plan.order
        if _PLACEHOLDER_TYPE not in set(map(type, plan.leaves)):  # (by type: == may be elementwise)
            return order
        return [i for i, leaf in zip(order, plan.leaves) if leaf is not leaves_lib.PLACEHOLDER]
    return (i for _, leaf, idx in plan.pairs if leaf is not leaves_lib.PLACEHOLDER for i in idx)


def array_nbytes(meta: dict) -> int:
    """The bytes of a large leaf's own array; 0 for packed and inline leaves."""
    if "array" not in meta:
        return 0
    array = meta["array"]["metadata"]
    return math.prod(array["shape"]) * leaves_lib.parse_dtype(array["data_type"]).itemsize


_NDARRAY, _NUMPY = {np.ndarray}, {"numpy"}
_CANNOT_BECOME = (ValueError, TypeError, OverflowError, SystemError)
_SAYS_WHY = (leaves_lib.LeafDataError, CheckpointCorruptedError, TreeMismatchError, UnsupportedLayoutError,
             InvalidLayoutError, UnregisteredTypeError)
_SECOND, _DTYPE = operator.itemgetter(1), operator.attrgetter("dtype")
_PLACEHOLDER_TYPE = type(leaves_lib.PLACEHOLDER)


def _build(table: LeafTable, saved_node: tree_lib.Node, plan: Plan | None, sources: list[Any]) -> Any:
    # The usual tree: each leaf a numpy array read already (a packed one), saved as numpy (no abstract
    # tree) or received by a numpy abstract leaf of its dtype, is returned as it is.
    if plan is None and set(map(type, sources)) == _NDARRAY and set(table.type) == _NUMPY:
        return tree_lib.unflatten(saved_node, iter(sources))
    if plan is not None and plan.pairs is None:
        received = sources if plan.order is None else [sources[i] for i in plan.order]
        leaves = plan.leaves
        if (set(map(type, leaves)) == _NDARRAY and set(map(type, received)) == _NDARRAY
                and list(map(_DTYPE, leaves)) == list(map(_DTYPE, received))):
            return tree_lib.unflatten(plan.node, iter(received))
    to_device = transfers.ToDevice()  # the device transfers of every leaf, in one pass at the end
    reads = [source if source is None or type(source) is np.ndarray else source.read for source in sources]

    def value(i: int, abstract_leaf: Any) -> Any:
        try:
            return leaves_lib.restore(table[i], reads[i], abstract_leaf, to_device)
        except _CANNOT_BECOME as e:  # numpy's, torch's and Python's conversions (ckpt's own errors pass)
            if isinstance(e, _SAYS_WHY):
                raise
            into = "saved" if abstract_leaf is None else f"a {type(abstract_leaf).__name__} of the abstract tree"
            mismatch = abstract_leaf is not None or isinstance(e, casts.OutOfRangeError)  # (no damage: values jax narrows)
            raise leaves_lib.LeafDataError(table.path[i], f"it cannot be restored as {into} ({type(e).__name__}: {e})",
                                           mismatch=mismatch) from None

    # The usual leaf, a numpy array read already (a packed one), is returned as it is, cast into a numpy
    # abstract leaf, or put on the default device for a jax.ShapeDtypeStruct without a sharding nor a weak
    # type (as jax.eval_shape gives most), without a call: what leaves.restore would make of it.
    skip, array = leaves_lib.PLACEHOLDER, np.ndarray
    if plan is None:
        values = [read if type(read) is array and kind == "numpy" else value(i, None)
                  for i, (kind, read) in enumerate(zip(table.type, reads))]
        return tree_lib.unflatten(saved_node, iter(to_device.run()(values)))
    abstract_node, abstract_leaves, pairs, order = plan
    subtrees = []
    if pairs is None:
        kinds, received = table.type, (reads if order is None else [reads[i] for i in order])
        order = range(len(reads)) if order is None else order
        shaped, put = getattr(sys.modules.get("jax"), "ShapeDtypeStruct", None), to_device.jax
        try:
            out = [leaf if leaf is skip
                   else casts.cast(read, leaf.dtype) if type(read) is array and type(leaf) is array
                   else put(casts.cast(read, leaf.dtype), None)
                   if type(read) is array and type(leaf) is shaped and leaf.sharding is None and kinds[i] == "jax"
                   and isinstance(leaf.dtype, np.dtype) and not leaf.weak_type
                   else value(i, None if isinstance(leaf, LeafMetadata) else leaf)
                   for leaf, i, read in zip(abstract_leaves, order, received)]
        except _CANNOT_BECOME:  # a cast above failed: the general path finds the leaf and names it
            out = [leaf if leaf is skip else value(i, None if isinstance(leaf, LeafMetadata) else leaf)
                   for leaf, i in zip(abstract_leaves, order)]
    else:
        out = []
        for path, leaf, idx in pairs:
            if leaf is leaves_lib.PLACEHOLDER:
                out.append(leaves_lib.PLACEHOLDER)
            elif leaf is None and (len(idx) != 1 or tree_lib.subtree(saved_node, path).kind != "leaf"):
                subtrees.append((len(out), tree_lib.subtree(saved_node, path), [value(i, None) for i in idx]))
                out.append(None)
            else:
                out.append(value(idx[0], None if isinstance(leaf, LeafMetadata) else leaf))
    resolve = to_device.run()
    out = resolve(out)
    for position, node, values in subtrees:
        out[position] = tree_lib.unflatten(node, iter(resolve(values)))
    transfers.tie_as_templates(abstract_leaves if pairs is None else [leaf for _, leaf, _ in pairs], out)
    return tree_lib.unflatten(abstract_node, iter(out))
