"""The layout of a saved tree, kept from one async save to plan the next one of the same tree.

A training loop saves the same structure, shapes and dtypes at every step; only the values change.
Planning a save (flattening with key paths, classifying each leaf, building its manifest entry and
its place in the packed array) costs several microseconds of Python per leaf, which is most of the
blocking time of a state of thousands of small leaves. :class:`Layout` keeps what a plan decided, as
tables (one list per field, not an object per leaf); :meth:`Layout.leaves_of` finds the leaves of a
new tree in one walk along the saved structure and checks each leaf's type, shape and dtype against
the table; when all match, the snapshot copies the leaves straight into the places the table gives,
and the manifest entries are made in the background. A fresh plan of a tree whose leaves are all in
host memory is written from its new layout's tables too, so that its first save already takes that path.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import operator
import sys
from typing import Any, Callable

import numpy as np

from ckpt import collector, entries
from ckpt import format as fmt
from ckpt import leaves as leaves_lib
from ckpt import packing, storage_options, transfers
from ckpt import tree as tree_lib
from ckpt.tree import KeyPath

_SHAPE, _DTYPE, _DEVICE = operator.attrgetter("shape"), operator.attrgetter("dtype"), operator.attrgetter("device")


@dataclasses.dataclass
class Layout:
    """What a plan decided about each leaf, in flatten order over the checkpointables (see the module).

    ``kinds[i]`` is leaf i's type; the numpy arrays' shapes and dtypes are kept as two columns, the
    :func:`signature` of each other leaf but a Python value in ``signature`` (by leaf).
    ``meta[i]`` is leaf i's manifest entry before any checksum; ``location[i]`` is "inline",
    "packed" (at ``offset[i]``) or "array" (``array_name[i]``). ``storage``: the storage options the
    plan applied (its dtype is in ``meta``, its chunk size in the array specs); a save with others plans anew.
    ``checked``: the leaves whose casts into the storage dtype can change a value (a snapshot checks them).
    """

    names: tuple[str, ...]
    walkers: list[tuple]
    structures: dict[str, str]
    counts: list[int]
    paths: list[KeyPath]
    kinds: list[type]
    numpy_shapes: list[tuple[int, ...]]
    numpy_dtypes: list[np.dtype]
    signature: dict[int, Any]
    meta: list[dict]
    location: list[str]
    offset: list[int]
    nbytes: list[int]
    array_name: list[str]
    packed_nbytes: int
    storage: storage_options.Storage
    checked: list[int] = dataclasses.field(default_factory=list)
    buffer: np.ndarray | None = None  # the packed staging buffer that the views below view
    packed_views: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # leaf i's bytes there
    run_targets: list[tuple[packing.Run, np.ndarray]] = dataclasses.field(default_factory=list)
    alone_views: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)
    torch_run_targets: list[tuple[transfers.TorchRun, Any]] = dataclasses.field(default_factory=list)
    groups_by_size: dict[int, tuple[list[packing.Run], list[int]]] = dataclasses.field(default_factory=dict)
    windows_by_size: dict[int, list[tuple[list[packing.Run], list[int]]]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        """Makes the tables a save from the layout needs."""
        self.own_arrays = where(self.location, "array")
        self.total_nbytes = self.packed_nbytes + sum(self.nbytes[i] for i in self.own_arrays)  # as a fresh plan counts
        # numpy arrays are checked as one table of (shape, dtype); other typed leaves one by one
        self.numpy_index = where(self.kinds, np.ndarray)
        self.numpy_arrays = packing.picker(self.numpy_index)
        self.other_typed = sorted(self.signature)
        self.device_leaves = [i for i in self.other_typed if self.kinds[i].__module__.startswith(("torch", "jax"))]
        torch = sys.modules.get("torch")
        # torch tensors are checked as columns of (shape, dtype, device); the other typed leaves one by one
        torch_index = [i for i in self.other_typed if torch is not None and self.kinds[i] is torch.Tensor]
        self.torch_tensors = packing.picker(torch_index)
        self.torch_columns = [list(column) for column in zip(*(self.signature[i][1:] for i in torch_index))]
        self.checked_alone = sorted(set(self.other_typed) - set(torch_index))
        self.pinned = torch is not None and any(  # torch leaves on an accelerator: stage in page-locked memory
            self.kinds[i] is torch.Tensor and self.signature[i][3].type == "cuda" for i in self.device_leaves)
        self.packed_order = packing.in_order(where(self.location, "packed"), self.offset, self.nbytes)
        self.packed_offsets = list(map(self.offset.__getitem__, self.packed_order))
        self.packed_sizes = list(map(self.nbytes.__getitem__, self.packed_order))
        self.unpacked = sorted(self.own_arrays + where(self.location, "inline"))

    def copy_groups(self, size: int) -> tuple[list[packing.Run], list[int]]:
        """The runs of packed numpy leaves copied together, none crossing a window of ``size`` bytes of the
        packed array (a snapshot's: a chunk; a sync save's: a piece, in more runs), and the packed leaves
        copied one by one; made once per size, when the layout is first reused."""
        found = self.groups_by_size.get(size)
        if found is None:
            align, meta, nbytes = fmt.ALIGN, self.meta, self.nbytes  # a numpy leaf's key: packing.group's (its
            keys = dict(zip(self.numpy_index, [  # type is numpy) and its own dtype
                (meta[i]["dtype"], dtype, shape if nbytes[i] <= align else None)
                for i, shape, dtype in zip(self.numpy_index, self.numpy_shapes, self.numpy_dtypes)]))
            found = self.groups_by_size[size] = packing.runs(self.packed_order, keys, self.meta, self.offset,
                                                             self.nbytes, size)
        return found

    @functools.cached_property
    def array_types(self) -> str:
        """Each leaf's dtype and shape as :func:`array_types` gives them (made once)."""
        return array_types(self.meta)

    @functools.cached_property
    def table_texts(self) -> tuple[list[list[bytes]], list[str]]:
        """The text of each checkpointable's leaf table in tree.json before its ``crc32`` column (see
        :func:`ckpt.entries.head`: a few parts per checkpointable, not a text per field), and the text of each
        leaf's ``more`` field; made when the layout's first tree.json is written. A save adds the CRC32s and
        makes the ``more`` of the leaves not packed anew."""
        offsets = [offset if where == "packed" else None for where, offset in zip(self.location, self.offset)]
        return entries.heads(self.paths, self.meta, offsets, self.nbytes, self.counts)

    def windows(self, size: int) -> list[tuple[list[packing.Run], list[int]]]:
        """The runs and lone leaves of each window of ``size`` bytes of the packed array, a chunk or a
        piece (see :func:`ckpt.packing.by_window`); made once per size."""
        found = self.windows_by_size.get(size)
        if found is None:
            found = self.windows_by_size[size] = packing.by_window(*self.copy_groups(size), self.offset, size)
        return found

    def filler(self, values: list[Any], size: int) -> Callable[[np.ndarray, int, int], int]:
        """The ``fill`` of :func:`ckpt.packing.windows` for this layout's leaves ``values``, by windows of
        ``size`` bytes (a chunk or a piece): the packed array of a save that keeps no copy of the state
        (each transfer from a device waited for before its window is written)."""
        windows, offset, nbytes = self.windows(size), self.offset, self.nbytes
        to_host = transfers.ToHost(values, self.device_leaves)

        def fill(buffer: np.ndarray, lo: int, hi: int) -> int:
            runs, alone = windows[lo // size] if lo // size < len(windows) else ((), ())
            end = max([run.stop for run in runs] + [offset[i] - lo + packing.slot(nbytes[i]) for i in alone], default=0)
            if alone or any(run.shape is not None for run in runs):  # leaves copied without their padding
                buffer[min([run.start for run in runs] + [offset[i] - lo for i in alone]): end] = 0
            for run in runs:
                run.copy(values, run.target(buffer))
            for i in alone:
                start = offset[i] - lo
                to_host.copy(i, self.view_of(i, buffer[start: start + nbytes[i]]))
            to_host.wait()
            return end
        return fill

    def use_buffer(self, buffer: np.ndarray) -> None:
        """Makes the views of the packed leaves and runs in ``buffer`` (once per buffer: the next
        snapshot usually gets the same one back)."""
        if buffer is not self.buffer:
            self.buffer = buffer
            runs, alone = self.copy_groups(fmt.PACKED_CHUNK_BYTES)
            self.packed_views = {i: self.view_of(i, buffer[self.offset[i]: self.offset[i] + self.nbytes[i]])
                                 for i in self.packed_order}
            self.run_targets = [(run, run.target(buffer)) for run in runs]
            batched = {i for run in self.torch_runs for i in run.indices}
            self.alone_views = [(i, self.packed_views[i]) for i in alone if i not in batched]
            self.torch_run_targets = [(run, run.target(buffer)) for run in self.torch_runs]

    def forget_buffer(self) -> None:
        self.buffer, self.packed_views, self.run_targets, self.alone_views = None, {}, [], []
        self.torch_run_targets = []

    @functools.cached_property
    def torch_runs(self) -> list[transfers.TorchRun]:
        """The packed torch leaves that a snapshot copies together (see :func:`ckpt.transfers.torch_runs`);
        made when the layout's first snapshot copies them."""
        if not self.device_leaves:
            return []
        packed = [(i, self.offset[i], self.nbytes[i]) for i in self.packed_order]
        return transfers.torch_runs(packed, self.signature, [meta.get("dtype") for meta in self.meta])

    def view_of(self, i: int, raw: np.ndarray) -> np.ndarray:
        """Leaf i's bytes in ``raw`` (flat uint8 of its size) as its dtype and shape."""
        meta = self.meta[i]
        return raw.view(leaves_lib.parse_dtype(meta["dtype"])).reshape(meta["shape"])

    def on_host(self) -> bool:
        """Whether every leaf's bytes are in host memory (numpy, Python values, torch tensors on the
        CPU): a fresh plan of such a tree is written from this layout's tables at once, as the next
        save of the same tree is, while one of leaves on an accelerator keeps the host copies it made."""
        torch = sys.modules.get("torch")
        return all(torch is not None and self.kinds[i] is torch.Tensor and self.signature[i][3].type == "cpu"
                   for i in self.device_leaves)

    def leaves_of(self, checkpointables: dict[str, Any]) -> list[Any] | None:
        """The leaves of ``checkpointables`` in flatten order when they have this layout's structure and
        each leaf its type, shape and dtype; None otherwise."""
        if tuple(checkpointables) != self.names:
            return None
        found: list[Any] = []
        for walker, tree in zip(self.walkers, checkpointables.values()):
            if not _walk(walker, tree, found):
                return None
        if len(found) != len(self.kinds) or list(map(type, found)) != self.kinds:
            return None
        arrays = self.numpy_arrays(found)
        if list(map(_SHAPE, arrays)) != self.numpy_shapes or list(map(_DTYPE, arrays)) != self.numpy_dtypes:
            return None
        if self.torch_columns:
            tensors = self.torch_tensors(found)
            if [list(map(_SHAPE, tensors)), list(map(_DTYPE, tensors)), list(map(_DEVICE, tensors))] != self.torch_columns:
                return None
        if any(signature(found[i]) != self.signature[i] for i in self.checked_alone):
            return None
        return found


def of(names: tuple[str, ...], nodes: list[tree_lib.Node], structures: dict[str, str], counts: list[int],
       paths: list[KeyPath], values: list[Any], meta: list[dict], location: list[str], offset: list[int],
       nbytes: list[int], array_name: list[str], packed_nbytes: int, storage: storage_options.Storage,
       checked: list[int]) -> Layout | None:
    """The layout of a plan from its columns (``nodes``: each checkpointable's structure, ``counts`` its
    number of leaves; the other lists: each leaf's value or field, in flatten order; see :class:`Layout`),
    or None when a leaf is of a kind whose plan is never reused."""
    kinds = list(map(type, values))
    arrays = packing.picker(where(kinds, np.ndarray))(values)
    typed = {kind for kind in set(kinds) if kind is not np.ndarray and kind not in leaves_lib.INLINE_TYPES}
    signatures = {i: signature(values[i]) for i, kind in enumerate(kinds) if kind in typed} if typed else {}
    if None in signatures.values():
        return None
    return Layout(names, [_walker(node) for node in nodes], structures, counts, paths, kinds,
                  list(map(_SHAPE, arrays)), list(map(_DTYPE, arrays)), signatures, meta, location, offset, nbytes,
                  array_name, packed_nbytes, storage, checked)


def array_types(meta: list[dict]) -> str:
    """The dtype and shape of each leaf of manifest entries ``meta`` as JSON text, ``[dtype, shape]``, or the
    type of a leaf stored inline (``"int"``, ``"str"``, ``"none"``): what the processes of a job compare before
    a save (see :func:`ckpt.saving.agree`).

    Example::

        assert array_types([{"type": "numpy", "dtype": "float32", "shape": [2]}, {"type": "int", "value": 1}]) == (
            '[["float32", [2]], "int"]')
    """
    with collector.paused():
        return json.dumps([[entry["dtype"], entry["shape"]] if "shape" in entry else entry["type"] for entry in meta])


def where(column: list[Any], value: Any) -> list[int]:
    """The indices i where ``column[i] == value``, in one pass in C.

    Example::

        assert where(["packed", "array", "packed"], "packed") == [0, 2]
    """
    return list(itertools.compress(range(len(column)), map(operator.eq, column, itertools.repeat(value))))


def signature(x: Any) -> Any:
    """What must not change for a plan to be reused: the type, and for array data shape and dtype
    (plus, for jax, the sharding and weak type); None for a leaf whose plan is never reused."""
    kind = type(x)
    if kind in leaves_lib.INLINE_TYPES:
        return kind
    if kind is np.ndarray:
        return (kind, x.shape, x.dtype)
    if kind is bytes:
        return (kind, len(x))
    if isinstance(x, np.generic):  # immutable: kept as is, no copy
        return (kind, x.dtype)
    torch = sys.modules.get("torch")
    if torch is not None and kind is torch.Tensor:
        return (kind, x.shape, x.dtype, x.device)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        if x.is_deleted() or leaves_lib.primarys_alone(x):  # a donated one: planned to be refused; (see there)
            return None
        return (kind, x.shape, x.dtype, x.sharding, x.weak_type)
    return None


def _walker(node: tree_lib.Node) -> tuple:
    """A compact form of a structure for :func:`_walk`: (kind, container type, keys, children,
    whether every child is a leaf, the keys' types when one is not a str)."""
    if node.kind == "leaf":
        return _LEAF_WALKER
    children = [_LEAF_WALKER if child.kind == "leaf" else _walker(child) for child in node.children]
    keys = [key for _, key in node.keys]
    types = list(map(type, keys))
    return (node.kind, node.container, keys, children, children.count(_LEAF_WALKER) == len(children),
            None if set(types) <= {str} else types)


_LEAF_WALKER = ("leaf",)


def _walk(walker: tuple, x: Any, out: list[Any]) -> bool:
    """Appends the leaves of ``x`` to ``out`` if ``x`` has the structure of ``walker``; False if not."""
    kind = walker[0]
    if kind == "leaf":
        out.append(x)
        return True
    if type(x) is not walker[1]:
        return False
    if kind == "dict":  # (1 == 1.0 == True: an int key's type is compared too, as flatten refuses the others)
        if list(x) != walker[2] or (walker[5] is not None and list(map(type, x)) != walker[5]):
            return False
        values: Any = x.values()
    elif kind == "pytree":
        found = tree_lib.children(x)
        if found is None or found[0] != walker[2] or (walker[5] is not None and list(map(type, found[0])) != walker[5]):
            return False
        values = found[1]
    else:  # list, tuple, namedtuple: the type fixes a namedtuple's length
        if len(x) != len(walker[3]):
            return False
        values = x
    if walker[4]:
        out.extend(values)
        return True
    return all(_walk(child, value, out) for child, value in zip(walker[3], values))
