"""One step: plan the tree, snapshot it (async), write it with tensorstore, commit it.

``plan`` validates and flattens without touching the disk, so every bad input fails before anything
is written. ``snapshot`` copies the leaves into memory the checkpointer owns (async saves only).
``write`` puts the bytes in a temporary step directory; ``commit`` makes it visible atomically.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tensorstore as ts

from ckpt import format as fmt
from ckpt import layout as layout_lib
from ckpt import leaves as leaves_lib
from ckpt import chunks, collector, custom, distributed, dtensor, entries, loading, packing, preemption, progress, root
from ckpt import host_memory, storage, storage_options, transfers
from ckpt import tree as tree_lib
from ckpt.context import Context
from ckpt.errors import TreeMismatchError
from ckpt.metadata import now_nsecs
from ckpt.tree import KeyPath, keystr

logger = logging.getLogger("ckpt")


@dataclasses.dataclass
class PlannedLeaf:
    """A leaf with its manifest entry and where its bytes go (inline, packed at ``offset``, or its own array)."""

    path: KeyPath
    host: leaves_lib.HostLeaf
    location: str = "inline"
    offset: int = 0
    nbytes: int = 0
    array_name: str = ""


@dataclasses.dataclass
class Plan:
    """Everything a step's write needs; owns its bytes once :func:`snapshot` has run."""

    structures: dict[str, str]  # each checkpointable's tree structure, as tree.json writes it
    leaves: dict[str, list[PlannedLeaf]]
    packed: list[PlannedLeaf]
    arrays: list[PlannedLeaf]
    packed_nbytes: int
    metrics: Any                 # as the manifest stores them (fmt.stored_json)
    custom_metadata: Any
    init_timestamp_nsecs: int
    commit_timestamp_nsecs: int | None = None  # the commit's time when None; a converted step keeps its source's
    packed_buffer: np.ndarray | None = None
    written_arrays: set[str] = dataclasses.field(default_factory=set)
    staging: list[np.ndarray] = dataclasses.field(default_factory=list)
    layout: layout_lib.Layout | None = None  # what the next save of the same tree may reuse
    values: list[Any] | None = None          # a reused layout's leaves (packed ones stay in its tables)
    copies: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # their snapshot, by index
    packed_copies: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # the same, of packed leaves

    unpacked: dict[int, PlannedLeaf] = dataclasses.field(default_factory=dict)  # a reused plan's other leaves
    dtensors: list[str] = dataclasses.field(default_factory=list)  # each DTensor's key path and layout (see agree)
    sliced: list[tuple[str, PlannedLeaf, Any]] = dataclasses.field(default_factory=list)  # DTensors with copies (see agree)
    non_finite: dict[str, list] = dataclasses.field(default_factory=dict)  # the manifest's "non_finite"

    @property
    def nbytes(self) -> int:
        if self.values is not None:
            return self.layout.total_nbytes
        return self.packed_nbytes + sum(leaf.nbytes for leaf in self.arrays)

    @property
    def packed_spans(self) -> tuple[list[int], list[int]]:
        """The offsets and the sizes of the packed leaves, in offset order (:func:`ckpt.packing.in_order`'s)."""
        if self.values is not None:
            return self.layout.packed_offsets, self.layout.packed_sizes
        return [leaf.offset for leaf in self.packed], [leaf.nbytes for leaf in self.packed]

    def materialize_unpacked(self) -> None:
        """Makes the planned leaves of a reused plan's large and inline leaves (the writer's work, in the
        background for an async save); its packed leaves stay in the layout's tables, their bytes in the
        packed buffer of a snapshot or still in ``values``. Without a snapshot (a sync save), whose writer casts
        the packed leaves into their storage dtype as it copies them from ``values``, those whose cast can change
        a value are checked first (ValueError naming the leaf, see :func:`ckpt.storage_options.check`)."""
        if self.values is None:
            return
        layout = self.layout
        if self.packed_buffer is None:
            for i in layout.checked:
                if layout.location[i] == "packed":
                    storage_options.check(layout.paths[i], self.values[i], layout.storage.dtype)
        self.unpacked = {i: self._materialize(i, self.values[i]) for i in self.layout.unpacked}
        self.arrays = [self.unpacked[i] for i in self.layout.own_arrays]
        self.copies = {}

    def materialize(self) -> None:
        """Makes every planned leaf of a plan that reused a layout, as a fresh plan has them (a snapshot
        that cannot copy the whole plan): each leaf's manifest entry from the layout's, with its snapshot
        copy or its host bytes."""
        values, layout = self.values, self.layout
        if values is None:
            return
        self.values = None
        start = 0
        for name, count in zip(layout.names, layout.counts):
            self.leaves[name] = [self._materialize(i, values[i]) for i in range(start, start + count)]
            start += count
        flat = [leaf for row in self.leaves.values() for leaf in row]
        self.packed = [flat[i] for i in layout.packed_order]
        self.arrays = [flat[i] for i in layout.own_arrays]
        self.copies, self.packed_copies = {}, {}

    def _materialize(self, i: int, value: Any) -> PlannedLeaf:
        layout = self.layout
        path, where = layout.paths[i], layout.location[i]
        if where == "inline":
            host = leaves_lib.to_host(path, value)
        else:
            array = (self.packed_copies if where == "packed" else self.copies).get(i)
            host = leaves_lib.HostLeaf(dict(layout.meta[i]), leaves_lib.to_host(path, value).array if array is None else array)
            if array is None and layout.storage.dtype is not None:
                storage_options.cast(path, host, layout.storage.dtype)
        return PlannedLeaf(path, host, where, layout.offset[i], layout.nbytes[i], layout.array_name[i])


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    """The C-order bytes of an array as a flat uint8 array (a view when already contiguous)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


@contextlib.contextmanager
def _settled_on_error(in_flight: Callable[[], list[Any]]) -> Iterator[None]:
    """Where the block raises (an I/O error, a KeyboardInterrupt), waits for the tensorstore writes and
    opens still in flight (``in_flight()``; their own errors ignored) before the error goes on: the
    failing save removes its temporary directory next, and writes landing in it meanwhile would make
    that removal fail, leaving the directory and raising "Directory not empty" in place of the error."""
    try:
        yield
    except BaseException:
        for future in in_flight():
            with contextlib.suppress(Exception):
                future.result()
        raise


def _filler(packed: list[PlannedLeaf]) -> Callable[[np.ndarray, int, int], int]:
    """The ``fill`` of :func:`ckpt.packing.windows` for a fresh plan's packed leaves (in :func:`ckpt.packing.in_order`'s
    order: the last leaf begun in a window ends last)."""
    position = 0

    def fill(buffer: np.ndarray, lo: int, hi: int) -> int:
        nonlocal position
        first = position
        while position < len(packed) and packed[position].offset < hi:
            position += 1
        if first == position:
            return 0
        last = packed[position - 1]
        end = last.offset - lo + packing.slot(last.nbytes)
        buffer[packed[first].offset - lo: end] = 0  # the padding of each slot (and no byte past it: see windows)
        for leaf in packed[first: position]:
            start = leaf.offset - lo
            buffer[start: start + leaf.nbytes] = _raw_bytes(leaf.host.array)
        return end
    return fill


def plan_checkpointables(checkpointables: dict[str, Any], options: Context, *, metrics: Any = None,
                         custom_metadata: Any = None, previous: layout_lib.Layout | None = None
                         ) -> tuple[Plan, dict[str, tuple[type | None, Any]]]:
    """The :func:`plan` of a save's checkpointables with ``options`` (the call's Context: its handler registry and
    storage options), and the checkpointables their handlers save (:func:`ckpt.custom.split`).

    Raises:
      ValueError / TypeError: as :func:`ckpt.custom.split` and :func:`plan` do.
    """
    trees, handled = custom.split(checkpointables, options.checkpointables_options.registry)
    return plan(trees, metrics=metrics, custom_metadata=custom_metadata, previous=previous,
                storage=options.array_options.saving), handled


def stored_metadata(metrics: Any, custom_metadata: Any) -> dict[str, Any]:
    """A step's ``metrics`` and ``custom_metadata`` as its manifest stores them: the manifest's members ``metrics``,
    ``custom_metadata`` and ``non_finite`` (see :func:`ckpt.format.stored_json`; :func:`ckpt.format.decode_json` reads
    them back), strict JSON.

    Raises:
      ValueError: metrics or custom metadata that are not JSON, or take more than a manifest holds.
    """
    non_finite = {}
    if metrics is not None:
        metrics, non_finite["metrics"] = fmt.stored_json(metrics, "metrics", numbers=True)
    if custom_metadata is not None:
        custom_metadata, non_finite["custom_metadata"] = fmt.stored_json(custom_metadata, "custom_metadata")
    described = {"metrics": metrics, "custom_metadata": custom_metadata, fmt.NON_FINITE: non_finite}
    fmt.to_json_bytes(described, "the metrics and custom metadata",
                      fmt.MANIFEST_MAX_BYTES - fmt.MANIFEST_ROOM)  # (the manifest's)
    return described


def plan(checkpointables: dict[str, Any], *, metrics: Any = None, custom_metadata: Any = None,
         previous: layout_lib.Layout | None = None, storage: Any = None) -> Plan:
    """Validates names, metadata and leaves, and decides where each leaf's bytes go. No I/O. A tree
    with the structure, types, shapes and dtypes of ``previous`` (the last plan's layout), saved with
    the same ``storage`` options (a Context's ``array.saving`` group) and no per-leaf creator, reuses it.

    Raises:
      ValueError: an invalid checkpointable name, metrics/custom metadata that are not JSON or take more
        than a manifest holds, or bad storage options.
      TypeError: a leaf that cannot be stored (named by its key path).
    """
    if not isinstance(checkpointables, dict):  # empty when every checkpointable has a handler (ckpt.custom)
        raise ValueError(f"checkpointables must be a non-empty dict of name -> tree, got {type(checkpointables).__name__}")
    for name in checkpointables:
        fmt.validate_checkpointable_name(name)
    described = stored_metadata(metrics, custom_metadata)
    metrics, custom_metadata, non_finite = described["metrics"], described["custom_metadata"], described[fmt.NON_FINITE]
    stored = storage_options.of(storage)
    reusable = previous is not None and previous.storage == stored and stored.scoped is None
    values = previous.leaves_of(checkpointables) if reusable else None
    if values is not None:
        made = Plan(previous.structures, {}, [], [], previous.packed_nbytes, metrics, custom_metadata, now_nsecs(),
                    layout=previous, values=values)
    else:
        with collector.paused():
            made = _plan(checkpointables, metrics, custom_metadata, stored)
    made.non_finite = {key: paths for key, paths in non_finite.items() if paths}
    return made


def _plan(checkpointables: dict[str, Any], metrics: Any, custom_metadata: Any, stored: storage_options.Storage) -> Plan:
    """:func:`plan` of a tree that reuses no layout. Each leaf's fields are made as columns; a tree whose
    leaves are all in host memory is written from its layout's tables, with no planned leaf per leaf."""
    structures, nodes, counts, paths, values, metas, arrays, spreads = {}, [], [], [], [], [], [], []
    gathers, dtensors, sliced = [], [], []
    for name, tree in checkpointables.items():
        try:
            node, flat = tree_lib.flatten(tree)
            described = leaves_lib.describe(flat)
        except TypeError as e:
            raise type(e)(f"checkpointable {name!r}: {e}") from None  # the same error, naming the checkpointable
        structures[name] = tree_lib.to_text(node)
        dtensors += dtensor.layouts(name, flat)
        sliced += [(name, len(paths) + i, flat[i][1]) for i in dtensor.on_slices(flat)]
        nodes.append(node)
        counts.append(len(flat))
        paths += [path for path, _ in flat]
        values += [value for _, value in flat]
        metas += described[0]
        arrays += described[1]
        spreads += described[2]
        gathers += described[3]
    chunk_bytes, checked = _apply_storage(stored, paths, values, metas, arrays, spreads, gathers)
    _refuse_spread_bytes(list(checkpointables), counts, paths, metas, spreads)
    nbytes = [0 if "dtype" not in meta else array.nbytes if array is not None else
              math.prod(meta["shape"]) * leaves_lib.parse_dtype(meta["dtype"]).itemsize
              for meta, array in zip(metas, arrays)]
    location = ["inline" if "dtype" not in meta else "packed" if n < fmt.SMALL_LEAF_BYTES and spread is None
                else "array" for meta, n, spread in zip(metas, nbytes, spreads)]
    offset, array_name = [0] * len(metas), [""] * len(metas)
    packed_nbytes = packing.place(layout_lib.where(location, "packed"), metas, nbytes, offset)
    own_arrays = layout_lib.where(location, "array")
    for k, i in enumerate(own_arrays):
        array_name[i], metas[i] = f"{fmt.ARRAYS}/{k}", dict(metas[i])  # an entry of its own (see describe)
        _describe_array(metas[i], spreads[i], nbytes[i], array_name[i], chunk_bytes(i))
    layout = None
    if spreads.count(None) == len(spreads):
        kept = list(metas)  # the writer adds each array's checksums to its entry: the layout keeps its own
        for i in own_arrays:
            kept[i] = dict(metas[i])
        layout = layout_lib.of(tuple(checkpointables), nodes, structures, counts, paths, values, kept, location,
                               offset, nbytes, array_name, packed_nbytes, stored, checked)
    if layout is not None and stored.scoped is None and layout.on_host():
        # the host arrays are not kept: the writer copies from the leaves themselves
        return Plan(structures, {}, [], [], packed_nbytes, metrics, custom_metadata, now_nsecs(), layout=layout,
                    values=values)
    hosts = map(leaves_lib.HostLeaf, metas, arrays, spreads, gathers)
    flat_planned = list(map(PlannedLeaf, paths, hosts, location, offset, nbytes, array_name))
    planned, start = {}, 0
    for name, count in zip(checkpointables, counts):
        planned[name], start = flat_planned[start: start + count], start + count
    packed = [flat_planned[i] for i in packing.in_order(layout_lib.where(location, "packed"), offset, nbytes)]
    return Plan(structures, planned, packed, [flat_planned[i] for i in own_arrays], packed_nbytes, metrics,
                custom_metadata, now_nsecs(), layout=layout, dtensors=dtensors,
                sliced=[(name, flat_planned[i], x) for name, i, x in sliced])


def _apply_storage(stored: storage_options.Storage, paths: list[KeyPath], values: list[Any], metas: list[dict],
                   arrays: list[np.ndarray | None], spreads: list[leaves_lib.Spread | None],
                   gathers: list[Any]) -> tuple[Callable[[int], int], list[int]]:
    """Casts each leaf stored as another dtype (by ``stored`` or its per-leaf creator; ``metas``, ``arrays``,
    ``spreads`` and ``gathers``: the columns of :func:`ckpt.leaves.describe`, changed in place), refusing a value
    that dtype cannot hold (ValueError naming the leaf); returns the chunk size of leaf i's array, and the leaves
    whose casts can change a value (which a snapshot reusing the plan's layout checks as it casts them)."""
    if stored.dtype is None and stored.scoped is None:
        return (lambda i: stored.chunk_bytes or fmt.ARRAY_CHUNK_BYTES), []
    options = [stored.of_leaf(path, value) for path, value in zip(paths, values)]
    checked = []
    for i, leaf_storage in enumerate(options):
        if leaf_storage.dtype is not None:  # an entry of its own (see leaves.describe)
            if storage_options.changes_values(metas[i], leaf_storage.dtype):
                checked.append(i)
            host = leaves_lib.HostLeaf(dict(metas[i]), arrays[i], spreads[i], gathers[i])
            storage_options.cast(paths[i], host, leaf_storage.dtype)
            metas[i], arrays[i], spreads[i] = host.meta, host.array, host.spread
    return (lambda i: options[i].chunk_bytes or fmt.ARRAY_CHUNK_BYTES), checked


def _refuse_spread_bytes(names: list[str], counts: list[int], paths: list[KeyPath], metas: list[dict],
                         spreads: list[leaves_lib.Spread | None]) -> None:
    """Raises TypeError for an array spread over processes of a dtype zarr3 does not store (uint4, float8_e4m3,
    float6_*): such an array is stored whole, as bytes (see :func:`_describe_array`), which no process holding
    only its shards can write (its step was committed unreadable, or its save failed while it wrote)."""
    for i, spread in enumerate(spreads):
        dtype = None if spread is None else leaves_lib.parse_dtype(metas[i]["dtype"])
        if dtype is not None and not storage.zarr_stores(dtype):
            name = names[bisect.bisect_right(list(itertools.accumulate(counts)), i)]
            raise TypeError(
                f"checkpointable {name!r}: the array at {keystr(paths[i]) or 'the root'} is spread over processes "
                f"and has dtype {dtype}, which ckpt stores only whole (zarr3 lacks it), and no process holds it whole: "
                "save it as another dtype (astype, or ckpt's storage option dtype), or whole. Nothing was written.")


def _describe_array(meta: dict, spread: leaves_lib.Spread | None, nbytes: int, name: str, chunk_bytes: int) -> None:
    """Puts the zarr3 spec of a large leaf (stored as array ``name``) in its manifest entry (raw bytes
    for dtypes zarr3 lacks)."""
    dtype, shape = leaves_lib.parse_dtype(meta["dtype"]), tuple(meta["shape"])
    chunks = None if spread is None else spread.chunk_shape
    if not storage.zarr_stores(dtype):
        dtype, shape, chunks = np.dtype(np.uint8), (nbytes,), None
        meta["stored_as"] = "bytes"
    meta["array"] = storage.array_spec({"driver": "file", "path": name + "/"}, dtype, shape,
                                       chunk_bytes, checksum=chunks is not None, chunk_shape=chunks)


def agree(plan: Plan, final: storage.Location, processes: distributed.Processes, operation: str,
          timeout_secs: float) -> None:
    """Checks, before any process writes anything, that every process of a multi-process job saves the
    same tree (the same key paths, arrays of the same dtypes and shapes, and DTensors and jax arrays spread over
    processes of the same layouts at the same ones) to ``final``: the primary writes the replicated leaves once, so a leaf that only another
    process holds, or holds otherwise, would be lost.
    A barrier named ``operation``; nothing in one process. Then gathers the plan's small DTensors (see
    :func:`ckpt.leaves.gather`: a collective, which processes holding other DTensors would leave waiting).

    Raises:
      TreeMismatchError: on every process alike, naming each key path not every process holds (or holds
        with another dtype or shape, or as an inline value of another type) and a path that differs; nothing is
        written.
      ValueError: an array spread over processes saved by one alone (a DTensor saved by one rank, under
        ``MultiprocessingOptions(processes=SingleProcess())``, not :class:`ckpt.distributed.OwnPart`): the
        step would miss the others' shards; nothing is written.
      ConnectionError: the gathering of small DTensors failed in torch.distributed (a rank stopped in it);
        nothing is written. This rank running out of device memory there raises torch's ``OutOfMemoryError``.
    """
    if processes.count == 1 and not getattr(processes, "partial", False):
        _refuse_spread(plan, final)
    elif getattr(processes, "partial", False):
        _chunks_apart(plan)
    for leaf in compare(plan, final, processes, operation, timeout_secs):  # another slice's ranks write it
        leaf.host.spread = dataclasses.replace(leaf.host.spread, own_shards=lambda: [])
    try:
        leaves_lib.gather([(leaf.path, leaf.host) for leaves in plan.leaves.values() for leaf in leaves])
    except RuntimeError as e:  # torch.distributed's collective (gloo's 'Connection closed by peer', NCCL's errors)
        if processes.count == 1 or isinstance(e, getattr(sys.modules.get("torch"), "OutOfMemoryError", ())):
            raise  # (torch's OutOfMemoryError is this rank's own failure, which its message says)
        raise ConnectionError(
            f"rank {processes.index} of {processes.count}: the save of {final} failed while the ranks gathered its "
            f"small DTensors: another rank stopped, or the process group failed ({type(e).__name__}: "
            f"{str(e).strip()}). Nothing was written.") from e


def compare(plan: Plan, final: storage.Location, processes: distributed.Processes, operation: str,
            timeout_secs: float) -> list[PlannedLeaf]:
    """:func:`agree`'s comparison of the processes' trees (to save to ``final``; a barrier named ``operation``,
    nothing in one process), and of the copies of DTensors on slices of one mesh (see :func:`_one_copy`). Also what
    a two-tier save in a job checks, whose processes each save their part to a local tier alone (see
    :mod:`ckpt.tiers`). Returns the DTensors of ``plan`` that another slice's ranks write.

    Raises:
      TreeMismatchError: on every process alike, as :func:`agree` says; nothing is written.
    """
    if processes.count == 1:
        return []
    _compare(plan, final, processes, operation, timeout_secs)
    if not plan.sliced:
        return []
    return _one_copy(plan, final, processes, operation, timeout_secs)  # (on every process alike: the trees agree)


def _chunks_apart(plan: Plan) -> None:
    """Gives each array of ``plan`` whose chunks neighbouring processes' shards share (see
    :func:`ckpt.dtensor.in_two_rounds`) chunks that none share, for a process saving its own part alone
    (:class:`ckpt.distributed.OwnPart`, a local tier): a promotion puts the processes' files together, and two
    processes' parts of one chunk would be two files of one name, one of them lost."""
    for leaf in plan.arrays:
        spread = leaf.host.spread
        if spread is not None and spread.shares_chunks:
            leaf.host.spread = dataclasses.replace(spread, chunk_shape=spread.apart, apart=None)
            _describe_array(leaf.host.meta, leaf.host.spread, leaf.nbytes, leaf.array_name, fmt.ARRAY_CHUNK_BYTES)


def _refuse_spread(plan: Plan, final: storage.Location) -> None:
    """:func:`agree`'s ValueError for an array spread over processes that one process saves alone (a small
    DTensor split over ranks too: its gathering is a collective, which would wait for the other processes,
    or meet one of their own; one on a mesh of other ranks, of which it holds nothing). One this process holds
    whole (a replicated DTensor) it writes whole."""
    for name, planned in plan.leaves.items():
        for leaf in planned:
            spread, small = leaf.host.spread, leaf.host.gather
            if spread is not None and spread.whole is not None:
                leaf.host.spread = dataclasses.replace(spread, own_shards=spread.whole)
            elif spread is not None or (small is not None and not dtensor.held_whole(small)):
                raise ValueError(
                    f"checkpointable {name!r}: the array at {keystr(leaf.path) or 'the root'} is spread over "
                    f"processes, but this process saves {final} alone (MultiprocessingOptions.processes): the step "
                    "would hold only its shards. Save it from every process (ckpt's default), or save its whole "
                    "(DTensor.full_tensor()) or this process's shard (to_local()) instead. Nothing was written.")


def _compare(plan: Plan, final: storage.Location, processes: distributed.Processes, operation: str,
             timeout_secs: float) -> None:
    """:func:`agree`'s comparison of the processes' trees."""
    value = {"path": storage.place(final), "structures": plan.structures, "dtensors": plan.dtensors + _jax_layouts(plan),
             "arrays": _array_types(plan)}
    key = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    differing = distributed.differences(processes, operation, key, value, timeout_secs)
    if not differing:
        return
    primary = differing.pop(0)
    _refuse_full_state_dict(primary, differing, final)
    diffs = []
    for index, other in sorted(differing.items()):
        elsewhere = other["path"] != primary["path"]
        if elsewhere:
            diffs.append(f"process {index} saves to {other['path']}, process 0 to {primary['path']}")
        diffs += (_tree_differences(primary["structures"], other["structures"], index)
                  or _dtensor_differences(primary["dtensors"], other["dtensors"], index)
                  or _array_differences(primary, other, index)
                  or ([] if elsewhere else
                      [f"process {index} holds the same key paths in other containers (or checkpointables)"]))
    raise TreeMismatchError(
        f"the processes of this job save different trees to {final}, and ckpt writes a leaf the processes "
        f"replicate once, from process 0: {'; '.join(diffs)}. Every process saves the same key paths (each "
        "holding its own shards of sharded arrays); for state that differs between processes (pipeline "
        "stages), save each process's with ckpt.save to a path of its own inside ckpt.Context(multiprocessing_options="
        "ckpt.MultiprocessingOptions(processes=ckpt.distributed.SingleProcess())). Nothing was written.",
        differences=diffs)


def _one_copy(plan: Plan, final: storage.Location, processes: distributed.Processes, operation: str,
              timeout_secs: float) -> list[PlannedLeaf]:
    """:func:`agree`'s check of the DTensors on slices of one mesh (``root["dp"]`` at each coordinate of its other
    dimensions: FSDP2 over the modules that tensor parallelism leaves alone, see :func:`ckpt.dtensor.on_slices`):
    each slice's ranks hold a copy, written once, by the slice of the lowest rank, where every rank's local shard
    has the CRC32 of the shards at its coordinate in the other slices (pipeline stages whose modules name their
    parameters alike hold other values: refused, as one copy would lose the others). Returns those another slice's
    ranks write (each rank tells alone, see :func:`ckpt.dtensor.writes_copy`: through a Processes object without
    ``compare``, which compares nothing, one copy is written too)."""
    mine = [[f"{name}{keystr(leaf.path)}", *dtensor.digest(x)] for name, leaf, x in plan.sliced]
    found = distributed.differences(processes, f"{operation}/copies", mine, mine, timeout_secs)
    crcs, slices = {}, {}
    for index in range(processes.count):
        for key, ranks, coordinate, crc in found.get(index, found[0]) if found else mine:
            crcs.setdefault((key, tuple(coordinate)), set()).add(crc)
            slices.setdefault(key, set()).add(tuple(ranks))
    differ = sorted({key for (key, _), held in crcs.items() if len(held) > 1})
    if differ:
        diffs = [f"{key}: its copies on the slices {', '.join(map(str, sorted(slices[key])))} of one mesh hold other "
                 "values" for key in differ]
        raise TreeMismatchError(
            f"the processes of this job save different values under one key path to {final}: {'; '.join(diffs)}. ckpt "
            "writes a DTensor that the slices of one mesh hold alike (FSDP2 over the modules that tensor parallelism "
            "leaves alone) once; DTensors that differ between slices (pipeline stages whose modules name their "
            "parameters alike) cannot share a key path. Nothing was written.", differences=diffs)
    return [leaf for _, leaf, x in plan.sliced if not dtensor.writes_copy(x)]


def _refuse_full_state_dict(primary: dict, differing: dict[int, dict], final: storage.Location) -> None:
    """:func:`_compare`'s TreeMismatchError where processes other than 0 save trees without a leaf and process 0 a
    tree with some: a full state dict (torch's ``get_state_dict`` with ``full_state_dict=True`` gives the whole
    state to rank 0 and empty dicts to the others), which rank 0 saves alone."""
    held = sorted(_leaf_paths(primary["structures"]))
    empty = [index for index, other in sorted(differing.items()) if not _leaf_paths(other["structures"])]
    if not held or not empty:
        return
    diffs = [f"{held[0]} on process 0, not on process {index}" for index in empty]
    raise TreeMismatchError(
        f"the processes of this job save different trees to {final}: process{'es' if len(empty) > 1 else ''} "
        f"{', '.join(map(str, empty))} save{'' if len(empty) > 1 else 's'} no leaf, process 0 saves {len(held)} "
        f"({held[0]} first). State that process 0 alone holds (a full state dict: torch's get_state_dict with "
        "StateDictOptions(full_state_dict=True) gives the whole state to rank 0 and empty dicts to the others) is saved "
        "from process 0 alone (`if rank == 0:`) inside `with ckpt.Context(multiprocessing_options=ckpt."
        "MultiprocessingOptions(processes=ckpt.distributed.SingleProcess())):` (see the README); or save the sharded "
        "state dicts of get_state_dict's default options from every rank. Nothing was written.", differences=diffs)


def _jax_layouts(plan: Plan) -> list[str]:
    """Each jax array of ``plan`` spread over processes, with its chunks and sharding (a ``NamedSharding``'s mesh,
    device ids and spec), in words: each process writes the chunks its own sharding gives it, so processes whose
    shardings of an array differ (another spec, a mesh of the devices in another order) would write some chunks
    twice and leave others unwritten (a step no load can read)."""
    overs: dict[int, str] = {}  # (by sharding: shardings.describe gives one dict per sharding, which many share)

    def said(meta: dict, chunks: tuple[int, ...]) -> str:
        sharding = meta.get("sharding")
        over = "" if sharding is None else overs.get(id(sharding)) or overs.setdefault(id(sharding), (
            f" over devices {sharding['device_ids']} (a mesh of shape {tuple(sharding['mesh_shape'])}), spec "
            f"{sharding['spec']}"))
        return f"a jax array of shape {tuple(meta['shape'])}, {meta['dtype']}, in chunks of {chunks}{over}"

    return [f"{name}{keystr(leaf.path)}: {said(leaf.host.meta, leaf.host.spread.chunk_shape)}"
            for name, leaves in plan.leaves.items() for leaf in leaves
            if leaf.host.spread is not None and leaf.host.meta["type"] != "torch"]


def _array_types(plan: Plan) -> str:
    """The dtype and shape of each leaf of ``plan`` (an inline value's type; see :func:`ckpt.layout.array_types`),
    made once per layout: a leaf the primary writes alone, which another process holds with another dtype or shape
    (or type), is not one that the processes replicate."""
    if plan.values is not None:  # a reused layout (its leaves' dtypes and shapes are its own)
        return plan.layout.array_types
    return layout_lib.array_types([leaf.host.meta for leaves in plan.leaves.values() for leaf in leaves])


def _array_differences(primary: dict, other: dict, index: int) -> list[str]:
    """The leaves that process ``index`` holds with another dtype or shape than process 0, or stores inline as a
    value of another type (see :func:`_array_types`), in trees of the same key paths."""
    paths = [f"{name}{keystr(path)}" for name, text in primary["structures"].items()
             for path in tree_lib.leaf_paths(tree_lib.from_json(json.loads(text)))]

    def said(kind: list | str) -> str:
        if isinstance(kind, str):
            return f"{'None' if kind == 'none' else 'a value of type ' + kind} stored inline"
        return f"{kind[0]} of shape {tuple(kind[1])}"

    return [f"{path}: {said(ours)} on process 0, {said(theirs)} on process {index}"
            for path, ours, theirs in zip(paths, json.loads(primary["arrays"]), json.loads(other["arrays"]))
            if ours != theirs]


def _dtensor_differences(primary: list[str], other: list[str], index: int) -> list[str]:
    """The DTensors (key path and layout, see :func:`ckpt.dtensor.layouts`) of process 0 not in process
    ``index``'s, and the reverse."""
    ours, theirs = set(primary), set(other)
    diffs = [f"{d} on process 0, not on process {index}" for d in primary if d not in theirs]
    return diffs + [f"{d} on process {index}, not on process 0" for d in other if d not in ours]


def _tree_differences(primary: dict[str, str], other: dict[str, str], index: int) -> list[str]:
    """The key paths of process 0's structures (each checkpointable's, as tree.json writes it) not in
    process ``index``'s, and the reverse."""
    ours, theirs = _leaf_paths(primary), _leaf_paths(other)
    diffs = [f"{p} on process 0, not on process {index}" for p in sorted(ours - theirs)]
    return diffs + [f"{p} on process {index}, not on process 0" for p in sorted(theirs - ours)]


def _leaf_paths(structures: dict[str, str]) -> set[str]:
    """The key paths of the leaves of each checkpointable's structure (as tree.json writes it), in words."""
    return {f"{name}{keystr(path)}" for name, text in structures.items()
            for path in tree_lib.leaf_paths(tree_lib.from_json(json.loads(text)))}


class StagingBuffers:
    """Host buffers of async snapshots, kept from one save for the next: copying into memory already
    touched is several times faster than into fresh memory, whose pages fault in on first touch.
    They hold one copy of the last snapshot's bytes until :meth:`clear` (a load, which reads into them,
    or closing). Also keeps the last plan's ``layout``, which the next save of the same tree reuses."""

    def __init__(self):
        self._free: dict[tuple[int, bool], list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.layout: layout_lib.Layout | None = None

    def take(self, nbytes: int, pinned: bool = False) -> np.ndarray:
        """A buffer of ``nbytes`` bytes: one of the last snapshot's, or a new one of zeros (so that
        the gaps between packed leaves hold no stray bytes; in page-locked memory when ``pinned``:
        copies from an accelerator into it do not block)."""
        with self._lock:
            bucket = self._free.get((nbytes, pinned))
            if bucket:
                return bucket.pop()
        return transfers.pinned_zeros(nbytes) if pinned else host_memory.zeros(nbytes)

    def reserve(self, sizes: list[int]) -> None:
        """Makes buffers of ``sizes`` bytes for the next snapshot (in place of any kept) and touches every
        page of them, so that its copies do not fault fresh memory in (a first async save took several
        times as long as the next ones). Pages are touched without the GIL: call it in a background thread."""
        self.clear()  # what an earlier reservation made for a smaller state
        made = []
        for nbytes in sizes:
            buffer = host_memory.empty(nbytes)
            ctypes.memset(buffer.ctypes.data, 0, nbytes)  # a foreign call: releases the GIL
            made.append(buffer)
        with self._lock:
            for buffer in made:
                self._free.setdefault((buffer.size, False), []).append(buffer)

    def give(self, buffers: list[np.ndarray]) -> None:
        """Keeps ``buffers`` (a finished snapshot's) for the next snapshot, and only them."""
        free: dict[tuple[int, bool], list[np.ndarray]] = {}
        for buffer in buffers:
            free.setdefault((buffer.size, transfers.is_pinned(buffer)), []).append(buffer)
        with self._lock:
            self._free = free

    def clear(self) -> list[np.ndarray]:
        """Forgets the buffers kept; returns those in pageable memory, which nothing uses any more."""
        with self._lock:
            kept, self._free = self._free, {}
            if self.layout is not None:
                self.layout.forget_buffer()
        return [buffer for (_, pinned), buffers in kept.items() if not pinned for buffer in buffers]


def staging_sizes(plan: Plan, max_inflight_bytes: int | None) -> list[int]:
    """The sizes of the buffers :func:`snapshot` takes from its staging buffers for ``plan``."""
    if _copies_whole(plan, max_inflight_bytes):
        layout = plan.layout
        return ([layout.packed_nbytes] if layout.packed_nbytes else []) + [layout.nbytes[i] for i in layout.own_arrays]
    plan.materialize()
    copied, _ = _within_budget(plan, max_inflight_bytes)
    return ([plan.packed_nbytes] if plan.packed else []) + [
        leaf.nbytes for leaf in copied if leaf.host.spread is None]


def _copies_whole(plan: Plan, max_inflight_bytes: int | None) -> bool:
    """Whether a snapshot copies a plan made from a layout's tables whole (the state fits the budget)."""
    return plan.values is not None and plan.nbytes <= (float("inf") if max_inflight_bytes is None else max_inflight_bytes)


def _within_budget(plan: Plan, max_inflight_bytes: int | None) -> tuple[list[PlannedLeaf], list[PlannedLeaf]]:
    """The large leaves a snapshot copies (after the packed ones, in order, while they fit in
    ``max_inflight_bytes``) and those it leaves uncopied."""
    budget = float("inf") if max_inflight_bytes is None else max_inflight_bytes
    budget -= plan.packed_nbytes if plan.packed else 0
    copied, uncopied = [], []
    for leaf in plan.arrays:
        if leaf.nbytes > budget:
            uncopied.append(leaf)
            continue
        copied.append(leaf)
        budget -= leaf.nbytes
    return copied, uncopied


def _staged(array: np.ndarray, staging: StagingBuffers, plan: Plan, pinned: bool = False) -> np.ndarray:
    """A copy of ``array`` in one of ``staging``'s buffers (page-locked when ``pinned``), which the plan keeps."""
    buffer = staging.take(array.nbytes, pinned)
    plan.staging.append(buffer)
    copy = buffer.view(array.dtype).reshape(array.shape)
    if isinstance(array, transfers.DeviceRows):
        return array.copy_rows(copy, 0)
    np.copyto(copy, array)
    return copy


def snapshot(plan: Plan, max_inflight_bytes: int | None, staging: StagingBuffers | None = None) -> list[PlannedLeaf]:
    """Copies leaves into memory the plan owns (``staging``'s buffers when given), small leaves first,
    up to ``max_inflight_bytes``.

    Returns the large leaves left uncopied: the caller must write them before returning to its caller.
    """
    staging = staging or StagingBuffers()
    if _copies_whole(plan, max_inflight_bytes):
        _snapshot_reused(plan, staging)
        return []
    plan.materialize()
    pinned = plan.layout is not None and plan.layout.pinned  # as the next save, which reuses the layout, takes them
    if plan.packed:
        buffer = staging.take(plan.packed_nbytes, pinned)
        plan.staging.append(buffer)
        for leaf in plan.packed:
            array = leaf.host.array
            view = buffer[leaf.offset: leaf.offset + leaf.nbytes].view(array.dtype).reshape(array.shape)
            np.copyto(view, array)
            leaf.host.array = view
        plan.packed_buffer = buffer
    copied, uncopied = _within_budget(plan, max_inflight_bytes)
    for leaf in copied:
        if leaf.host.spread is not None:
            leaf.host.shards = [(index, _staged(data, staging, plan)) for index, data in leaf.host.spread.own_shards()]
        else:
            leaf.host.array = _staged(leaf.host.array, staging, plan, pinned)
    return uncopied


def _snapshot_reused(plan: Plan, staging: StagingBuffers) -> None:
    """:func:`snapshot` of a plan that reused a layout: every leaf with bytes is copied straight into
    its place (runs of packed numpy arrays together, see :class:`ckpt.packing.Run`, other packed leaves
    into views of the packed buffer made once per buffer); transfers from devices all start first, and
    the snapshot waits for them once (:class:`ckpt.transfers.ToHost`)."""
    layout, values, copies = plan.layout, plan.values, plan.copies
    pinned = layout.pinned
    to_host = transfers.ToHost(values, layout.device_leaves)
    if layout.packed_nbytes:
        buffer = staging.take(layout.packed_nbytes, pinned)
        plan.staging.append(buffer)
        plan.packed_buffer = buffer
        layout.use_buffer(buffer)
        for run, target in layout.torch_run_targets:  # first: from a device, they start transfers
            to_host.copy_run(run, target)
        for run, target in layout.run_targets:
            run.copy(values, target)
        for i, view in layout.alone_views:
            to_host.copy(i, view)
        plan.packed_copies = layout.packed_views  # made anew for each buffer, never changed
    for i in layout.own_arrays:
        buffer = staging.take(layout.nbytes[i], pinned)
        plan.staging.append(buffer)
        copies[i] = to_host.copy(i, layout.view_of(i, buffer))
    to_host.wait()
    for i in layout.checked:  # copied into their storage dtype: refused where a value did not fit it
        out = copies[i] if i in copies else layout.packed_views[i]
        storage_options.check(layout.paths[i], values[i], out.dtype, out)


def _chunks_of(meta: dict, source: np.ndarray | transfers.DeviceRows
               ) -> Iterator[tuple[chunks.Chunk, slice, Any, np.ndarray | None]]:
    """Each chunk of a large leaf's array (``meta``: its entry; ``source``: its data, at least 1-d), with
    its rows, their data and, where they lie in memory as one block, their bytes. A leaf left on its
    devices is copied into one host buffer a chunk at a time, and each chunk's checksums are taken as it
    is copied: the caller writes each chunk before it asks for the next."""
    layout, row_bytes = chunks.layout(meta), source.nbytes // max(1, source.shape[0])
    if not isinstance(source, transfers.DeviceRows):
        raw = _raw_bytes(source) if source.flags.c_contiguous else None  # (a view: never a copy of a large leaf)
        for chunk in layout:
            rows = slice(chunk.start // row_bytes, chunk.stop // row_bytes)
            yield chunk, rows, source[rows], None if raw is None else raw[chunk.start: chunk.stop]
        return
    buffer = host_memory.empty(max(chunk.stop - chunk.start for chunk in layout))
    crc32s, sum64s = meta["chunk_crc32"], meta["chunk_sum64"] = [], []
    for chunk in layout:
        rows, raw = slice(chunk.start // row_bytes, chunk.stop // row_bytes), buffer[: chunk.stop - chunk.start]
        data = source.copy_rows(raw.view(source.dtype).reshape((rows.stop - rows.start, *source.shape[1:])), rows.start)
        crc32s.append(fmt.crc32(raw))
        sum64s.append(chunks.sum64(raw))
        yield chunk, rows, data, raw


class StepWriter:
    """Writes one plan into ``tmp_dir`` and commits it as ``final_dir``.

    With several processes, the primary (index 0) prepares the directory and writes every leaf but
    the shards of arrays spread over processes, which each process writes for itself; then, after a
    barrier, the primary writes the manifest and commits, and a last barrier publishes the step.
    """

    def __init__(self, plan: Plan, tmp_dir: Path, final_dir: Path, *, overwrite: bool = False,
                 dir_mode: int | None = None, processes: distributed.Processes | None = None, operation: str = "",
                 timeout_secs: float = 1200.0, marks: tuple[str, ...] = ()):
        self.plan = plan
        self.marks = marks  # names of empty files the primary writes into the step before its manifest
        self.tmp_dir = tmp_dir
        self.final_dir = final_dir
        self.overwrite = overwrite  # the committed step at final_dir (checked as one) may be replaced
        self.dir_mode = dir_mode
        self.processes = processes or distributed.SingleProcess()
        self.primary = self.processes.index == 0
        self.operation = operation
        self.timeout_secs = timeout_secs
        self._prepared = not self.primary
        self._marker: int | None = None  # holds the temporary's marker locked while it is written
        self._background = False  # set once the caller has returned: write on about one core, not all
        self._hurry = threading.Event()
        self.progress = progress.Tracker(f"saving {final_dir}", plan.nbytes)
        self.custom: custom.Saves | None = None  # checkpointables saved by handlers (ckpt.custom)
        self.packed_crcs: list[int] = []  # of the packed leaves, in offset order, once written
        self._unsynced: set[storage.Location] = set()  # the directories of arrays written without an fsync per file
        self._second_round: list[tuple[PlannedLeaf, list[tuple[Any, np.ndarray]]]] = []  # see dtensor.in_two_rounds

    def prepare_dir(self) -> None:
        """Creates a fresh temporary directory, marked as ckpt's (removing one a crashed save left)."""
        if self._prepared:
            return
        self._marker = storage.make_temporary(self.tmp_dir, mode=self.dir_mode)
        self._prepared = True

    def discard(self) -> None:
        """Removes the temporary directory of a save that failed before its commit, if it made one (see
        :func:`ckpt.storage.remove_failed_temporary`)."""
        self._release()
        if self.primary and self._prepared:  # (only the primary makes it)
            storage.remove_failed_temporary(self.tmp_dir)

    def _release(self) -> None:
        marker, self._marker = self._marker, None
        storage.release_temporary(marker)

    def start_custom(self, handled: dict[str, tuple[type | None, Any]]) -> None:
        """Runs the caller's part of the handlers' saves (see :func:`ckpt.custom.start`); the rest runs in :meth:`run`.
        With several processes, every process's handlers run (each may write files of its own): the primary
        makes the step's directory first, so that any of them may make its directory at once; a failure in
        any process raises in all (see :func:`ckpt.distributed.settle`)."""
        if not handled:
            return

        def start() -> None:
            self.custom = custom.start(handled, self.tmp_dir, self.prepare_dir)

        try:
            if self.processes.count > 1:
                self._settle("custom", self.prepare_dir)
            self._settle("custom/started", start)
        except BaseException:
            self.discard()
            raise

    def hand_off(self, max_inflight_bytes: int | None = None, staging: StagingBuffers | None = None) -> None:
        """The part of an async save its caller waits for: copies the leaves into memory the plan owns
        (up to ``max_inflight_bytes``; see :func:`snapshot`) and writes the large ones left uncopied.
        :meth:`run` then finishes the save in the background, on about one core. A failure here (no memory for
        the copies) meets the other processes where their :meth:`run` begins, so that they raise at once too.
        """
        try:
            self.write_arrays(snapshot(self.plan, max_inflight_bytes, staging))
        except Exception as e:
            def failed() -> None:
                raise e
            self._settle("prepared", failed)  # (raises e)
        self._background = True

    def hurry(self) -> None:
        """Switches a background write to full speed from its next chunk on (``Checkpointer.wait``,
        ``close``, and a save arriving while this one writes call it; so does a preemption notice)."""
        self._hurry.set()

    def _slow(self) -> bool:
        """Whether to go on writing on about one core: in the background, until :meth:`hurry` or a
        preemption notice."""
        if self._background and (self._hurry.is_set() or preemption.preempted()):
            self._background = False
        return self._background

    def write_arrays(self, leaves: list[PlannedLeaf]) -> None:
        """Writes large leaves, each as a zarr3 array, and records their chunks' checksums: while
        tensorstore writes (in the caller), or before it, one file at a time (in the background)."""
        todo = [leaf for leaf in leaves if leaf.array_name not in self.plan.written_arrays
                and (self.primary or leaf.host.spread is not None)]
        if not todo:  # an async save that copied everything: the directory is made in the background
            return
        self.prepare_dir()
        background = self._slow()
        opening: list[Any] = []
        futures: list[tuple[PlannedLeaf, list[Any]]] = []
        with _settled_on_error(lambda: opening + [future for _, pending in futures for future in pending]):
            for leaf in todo:  # all at once: each open writes a zarr.json
                synced = not background or leaf.host.spread is not None  # (a process's shards: not file by file)
                if not synced:
                    self._unsynced.add(self.tmp_dir / leaf.array_name)
                opening.append(self._open(leaf.host.meta["array"], background=background, synced=synced))
            if background:  # checksums first, then the writes: one busy thread at a time
                self._checksum_arrays(todo)
            for leaf, store in zip(todo, opening):
                with storage.io_errors(f"writing {keystr(leaf.path)} to {self.tmp_dir}"):
                    futures.append((leaf, self._write_array(leaf, store.result(), background)))
            if not background:  # checksums while tensorstore writes
                self._checksum_arrays(todo)
            self._finish_arrays(futures)

    def _finish_arrays(self, futures: list[tuple[PlannedLeaf, list[Any]]]) -> None:
        """Waits for each leaf's writes; records its zarr.json's CRC32 and frees its snapshot copy."""
        for leaf, pending in futures:
            with storage.io_errors(f"writing {keystr(leaf.path)} to {self.tmp_dir}"):
                for future in pending:
                    future.result()
            if self.primary:
                zarr_json = storage.read_json_bytes(self.tmp_dir / leaf.array_name / "zarr.json")
                leaf.host.meta["zarr_json_crc32"] = fmt.crc32(zarr_json)
            self.plan.written_arrays.add(leaf.array_name)
            self.progress.advance(leaf.nbytes)
            leaf.host.array = None  # release the snapshot copy as soon as it is on disk

    @staticmethod
    def _checksum_arrays(leaves: list[PlannedLeaf]) -> None:
        """Records each chunk's CRC32 and word sum (arrays spread over processes use crc32c instead; the
        writer takes those of a leaf left on its devices as it copies each chunk)."""
        for leaf in leaves:
            if leaf.host.spread is None and not isinstance(leaf.host.array, transfers.DeviceRows):
                meta = leaf.host.meta
                raw, layout = _raw_bytes(leaf.host.array), chunks.layout(meta)
                meta["chunk_crc32"], meta["chunk_sum64"] = chunks.checksums(raw, layout), chunks.sums(raw, layout)

    def _write_array(self, leaf: PlannedLeaf, store: ts.TensorStore, slow: bool) -> list[Any]:
        """Writes a leaf's chunks, or starts their writes; returns what is left to wait for. A chunk
        whose bytes lie aligned in memory (as in a snapshot's buffers) goes straight to its file (see
        :func:`storage.write_direct`); the others through ``store``: one at a time and each file's
        writeback started when ``slow`` (opened for the background), until :meth:`hurry`, or when the leaf
        is left on its devices (its chunks are copied to host memory one at a time)."""
        if leaf.host.spread is not None:
            shards = leaf.host.shards if leaf.host.shards is not None else leaf.host.spread.own_shards()
            leaf.host.shards = None
            if leaf.host.spread.shares_chunks:
                shards, second = dtensor.in_two_rounds(shards, leaf.host.spread.chunk_shape)
                self._second_round.append((leaf, second))
            return [store[index].write(data, can_reference_source_data_indefinitely=True).commit
                    for index, data in shards]
        source = _raw_bytes(leaf.host.array) if "stored_as" in leaf.host.meta else leaf.host.array
        if source.ndim == 0:
            return [store.write(source, can_reference_source_data_indefinitely=True).commit]
        on_device = isinstance(source, transfers.DeviceRows)
        directory, pending = self.tmp_dir / leaf.array_name, []
        with _settled_on_error(lambda: pending):
            for chunk, rows, data, raw in _chunks_of(leaf.host.meta, source):
                if raw is not None and self._written_direct(directory, chunk, raw):
                    continue
                file = directory / chunk.key
                if slow and not self._slow():  # hurried: the rest at full speed
                    slow, store = False, self._open(leaf.host.meta["array"]).result()
                written = store[rows].write(data, can_reference_source_data_indefinitely=not on_device).commit
                if slow or on_device:  # (a leaf on its devices: the buffer is the next chunk's)
                    written.result()
                if slow:
                    storage.start_writeback(file)
                elif not on_device:
                    pending.append(written)
        return pending

    def write_packed(self) -> None:
        """Writes every small leaf into one uint8 zarr3 array, chunk by chunk, and records each leaf's
        CRC32 and each chunk's word sum."""
        plan = self.plan
        if not plan.packed_spans[0]:
            return
        self.prepare_dir()
        spec = storage.array_spec({"driver": "file", "path": fmt.PACKED + "/"}, np.dtype(np.uint8),
                                  (plan.packed_nbytes,), fmt.PACKED_CHUNK_BYTES, checksum=False)
        pending: list[Any] = []
        self.packed_sums = []
        with (storage.io_errors(f"writing the packed leaves to {self.tmp_dir}"),
              _settled_on_error(lambda: [commit for commit, _ in pending])):
            slow = self._slow()
            store = self._open(spec, background=slow, synced=not slow).result()
            directory = self.tmp_dir / fmt.PACKED
            layout = chunks.spec_layout(spec)
            if slow:
                self._unsynced.add(directory)
            if not slow and plan.packed_buffer is None and plan.packed_nbytes and isinstance(directory, Path):
                self._write_pieces(directory, layout)  # a sync save to local files
            else:
                for start, chunk in self._packed_chunks(fmt.PACKED_CHUNK_BYTES):
                    self.packed_sums.append(chunks.sum64(chunk))
                    if not chunk.size:  # only empty leaves: no chunk at all
                        continue
                    self.progress.advance(chunk.size)
                    where = layout[start // fmt.PACKED_CHUNK_BYTES]
                    if self._written_direct(directory, where, chunk):
                        continue
                    file = directory / where.key
                    if slow and not self._slow():  # hurried: the rest at full speed
                        slow, store = False, self._open(spec).result()
                    if len(pending) >= 2:
                        self._written(*pending.pop(0))
                    pending.append((store[start: start + chunk.size].write(
                        chunk, can_reference_source_data_indefinitely=True).commit, file if slow else None))
            for written in pending:
                self._written(*written)
        self.packed_spec = spec
        self.packed_zarr_json_crc32 = fmt.crc32(storage.read_json_bytes(directory / "zarr.json"))

    def _write_pieces(self, directory: Path, layout: list[chunks.Chunk]) -> None:
        """Writes the packed array's chunk files (``layout``) from its pieces (see
        :func:`ckpt.packing.piece_bytes`) as they are filled, through the page cache (each file's writeback
        started once it is written, all of them fsync'd before tree.json): the save holds a piece of the
        packed array at a time, not a chunk."""
        self._unsynced.add(directory)
        step = packing.piece_bytes(packing.slot(max(self.plan.packed_spans[1], default=0)))
        pieces = self._packed_chunks(step)
        for chunk in layout:
            sums: list[int] = []

            def parts(count: int) -> Iterator[np.ndarray]:
                for _, piece in itertools.islice(pieces, count):
                    sums.append(chunks.sum64(piece))  # (additive: each piece starts at a multiple of 8 bytes)
                    self.progress.advance(piece.size)
                    yield piece
                    del piece  # let go before the next is filled: every piece in one buffer (see packing.windows)

            count = -(-(chunk.stop - chunk.start) // step)  # (pieces never cross a chunk's edge)
            storage.write_new_file(directory / chunk.key, parts(count), chunk.file_bytes)
            storage.start_writeback(directory / chunk.key)
            self.packed_sums.append(sum(sums) & 0xFFFFFFFFFFFFFFFF)

    def _open(self, spec: dict, *, background: bool = False, synced: bool = True) -> ts.Future:
        """Starts opening the array of ``spec`` (its kvstore relative to the step's temporary directory)
        for writing; see :func:`storage.open_for_write`."""
        return storage.open_for_write(storage.resolve_kvstore(spec, self.tmp_dir), background=background,
                                      synced=synced)

    def _written_direct(self, directory: storage.Location, chunk: chunks.Chunk, data: np.ndarray) -> bool:
        """Writes ``chunk`` of the array in ``directory`` straight from ``data``, its bytes, when they are
        the whole file (not an edge chunk, whose file holds a whole chunk with fill) and lie aligned in
        memory (:func:`storage.write_direct`); its directory is then fsync'd before tree.json."""
        if data.nbytes != chunk.file_bytes or not storage.write_direct(directory / chunk.key, data):
            return False
        self._unsynced.add(directory)
        return True

    @staticmethod
    def _written(commit: Any, unsynced_file: storage.Location | None) -> None:
        """Waits for the write of a packed chunk; starts the writeback of its file, when given (one that
        tensorstore does not fsync)."""
        commit.result()
        if unsynced_file is not None:
            storage.start_writeback(unsynced_file)

    def _packed_chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """The packed array's windows of ``size`` bytes (chunks, or pieces of them), in order (see
        :func:`ckpt.packing.windows`; from a snapshot's buffer, chunks). The CRC32s of the small leaves
        (``packed_crcs``, in offset order) are taken from each window before it is written, while
        tensorstore writes the chunks before (in the background, all of them first: one busy thread at
        a time)."""
        plan = self.plan
        checksums = packing.Checksums(*plan.packed_spans)
        self.packed_crcs = checksums.values
        if plan.packed_buffer is None:
            fill = plan.layout.filler(plan.values, size) if plan.values is not None else _filler(plan.packed)
            source: Iterator[tuple[int, np.ndarray]] = packing.windows(fill, plan.packed_nbytes, size)
        else:
            whole = [(start, plan.packed_buffer[start: start + size]) for start in range(0, max(plan.packed_nbytes, 1), size)]
            if self._background:  # every checksum first, then the writes
                for start, chunk in whole:
                    checksums.feed(start, chunk)
                yield from whole
                return
            source = iter(whole)
        for start, chunk in source:
            checksums.feed(start, chunk)
            yield start, chunk
            del chunk  # (see packing.windows: a caller that lets go of each gets them in one buffer)

    def _tree_json(self) -> list[bytes]:
        """tree.json, in parts (see :func:`ckpt.entries.tree_json`): each checkpointable's structure and leaf
        entries, the handled ones, the packed array."""
        plan = self.plan
        packed = None
        if plan.packed_spans[0]:
            packed = {"spec": self.packed_spec, "nbytes": plan.packed_nbytes,
                      "zarr_json_crc32": self.packed_zarr_json_crc32, "chunk_sum64": self.packed_sums}
        return entries.tree_json(plan.structures, self._leaf_tables(), None if self.custom is None else self.custom.records,
                                 packed)

    def _leaf_tables(self) -> dict[str, list[bytes]]:
        """Each checkpointable's leaf table in tree.json, in parts (:func:`ckpt.entries.table_parts`): a reused
        plan's from the texts its layout keeps (:attr:`ckpt.layout.Layout.table_texts`), the ``more`` fields of
        the leaves not packed made anew."""
        plan, crcs = self.plan, list(map(str, self.packed_crcs))
        if plan.values is None:
            crc_of = dict(zip(map(id, plan.packed), crcs))
            tables = {}
            for name, row in plan.leaves.items():
                texts = entries.rows(tree_lib.keystrs([leaf.path for leaf in row]), [leaf.host.meta for leaf in row],
                                     [(leaf.offset, leaf.nbytes) if leaf.location == "packed" else None for leaf in row])
                crc_texts = [crc_of.get(id(leaf), entries.NULL) for leaf in row]
                tables[name] = entries.table_parts(entries.head(texts), crc_texts, texts["more"])
            return tables
        layout = plan.layout
        heads, more = layout.table_texts
        crc_texts = [entries.NULL] * len(more)
        for i, crc in zip(layout.packed_order, crcs):
            crc_texts[i] = crc
        if plan.unpacked:  # (their other columns do not change: the layout's type, dtype and shape, packed null)
            more = list(more)
            for i, text in zip(plan.unpacked, entries.more([leaf.host.meta for leaf in plan.unpacked.values()])):
                more[i] = text
        out, start = {}, 0
        for name, count, head in zip(layout.names, layout.counts, heads):
            stop = start + count
            out[name] = entries.table_parts(head, crc_texts[start: stop], more[start: stop])
            start = stop
        return out

    def write_manifest(self, step: int | None, extra: dict | None = None) -> None:
        """Writes tree.json and then manifest.json (the commit record) into the temporary directory."""
        plan = self.plan
        self.prepare_dir()
        with collector.paused():
            tree_parts = self._tree_json()
        storage.write_file(self.tmp_dir / fmt.TREE, tree_parts)
        tree_crc32 = 0
        for part in tree_parts:
            tree_crc32 = fmt.crc32(part, tree_crc32)
        manifest = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "step": step,
            "init_timestamp_nsecs": plan.init_timestamp_nsecs,
            "commit_timestamp_nsecs": plan.commit_timestamp_nsecs or now_nsecs(),
            "metrics": plan.metrics,
            "custom_metadata": plan.custom_metadata,
            fmt.NON_FINITE: plan.non_finite,
            "checkpointables": list(plan.structures),
            "nbytes": plan.nbytes,
            "tree_crc32": tree_crc32,
            **(extra or {}),
        }
        storage.write_file(self.tmp_dir / fmt.MANIFEST, fmt.sealed_manifest(manifest))
        self.manifest = manifest

    def commit(self, step: int | None) -> None:
        """Makes the written step visible atomically (see :func:`ckpt.root.commit`)."""
        root.commit(self.tmp_dir, self.final_dir, step=step, overwrite=self.overwrite, mode=self.dir_mode)

    def _barrier(self, phase: str) -> None:
        if self.processes.count > 1:
            self.processes.barrier(f"{self.operation}/{phase}", self.timeout_secs)

    def _settle(self, phase: str, part: Callable[[], None]) -> None:
        """This process's ``part`` of ``phase``, then the barrier ending it (see :func:`ckpt.distributed.settle`)."""
        distributed.settle(self.processes, f"{self.operation}/{phase}", part, self.timeout_secs,
                           f"the save of {self.final_dir}")

    def _write_own(self) -> None:
        """This process's part of the step: every process's shards of the arrays spread over processes, the
        primary's everything else; each handler's files."""
        if not self.primary:
            root.check_shared(self.tmp_dir, self.processes.index)
        self.write_arrays(self.plan.arrays)
        if self.primary:
            self.write_packed()
        if self.custom is not None:
            self.custom.finish()
        for directory in self._unsynced:
            storage.fsync_files(directory)

    def _write_second_round(self) -> None:
        """This process's parts of the chunks of DTensors that neighbouring processes' shards share, once every
        process wrote its first parts (see :func:`ckpt.dtensor.in_two_rounds`)."""
        pending: list[tuple[PlannedLeaf, Any]] = []
        with _settled_on_error(lambda: [future for _, future in pending]):
            for leaf, parts in self._second_round:
                if parts:
                    with storage.io_errors(f"writing {keystr(leaf.path)} to {self.tmp_dir}"):
                        store = self._open(leaf.host.meta["array"]).result()
                        pending += [(leaf, store[index].write(data).commit) for index, data in parts]
            for leaf, future in pending:
                with storage.io_errors(f"writing {keystr(leaf.path)} to {self.tmp_dir}"):
                    future.result()
        self._second_round = []

    def run(self, step: int | None) -> dict:
        """Writes everything not yet written, then commits; returns the manifest. A save that fails
        before its commit removes its temporary directory. In a job, the primary returns once it committed even where
        the processes' last meeting fails (a process stopped after the commit): the step is committed, which it logs
        with the error (the others raise it)."""
        try:
            self.plan.materialize_unpacked()
            self._settle("prepared", self.prepare_dir)
            self._settle("written", self._write_own)
            if any(leaf.host.spread is not None and leaf.host.spread.shares_chunks for leaf in self.plan.arrays):
                self._settle("written shared chunks", self._write_second_round)
            if self.primary:
                for name in self.marks:  # (committed with the step: a crash never leaves it without them)
                    storage.write_file(self.tmp_dir / name, b"")
                self.write_manifest(step)
                self.commit(step)
        except BaseException:
            self.discard()
            raise
        finally:
            self._release()
        try:
            self._barrier("committed")
        except Exception as e:
            if not self.primary:
                raise
            logger.warning("ckpt: step %s is committed at %s, but not every process reached the end of its save: %s",
                           step, self.final_dir, e)
        if not self.primary:
            self.manifest = loading.read_manifest(self.final_dir)
        self.progress.finish()
        return self.manifest
