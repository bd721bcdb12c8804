"""Sharded torch tensors (``torch.distributed.tensor.DTensor``, FSDP2's state dicts) on disk and back.

A DTensor is one global array whose shards live on different ranks. Saving, each rank writes the
shards it holds whose replica is the primary one (coordinate 0 on every mesh dimension that
replicates the tensor), into one zarr3 array whose chunks follow the sharding, so that no two ranks
ever write the same chunk. A shard's place in the global array comes from
``DTensor.__create_chunk_list__()``, the protocol torch's own ``torch.distributed.checkpoint`` uses.
A DTensor smaller than ``format.SMALL_LEAF_BYTES`` on a mesh of every rank is gathered instead and packed
with the other small leaves (one collective, not one file per rank and leaf).

Loading into a DTensor template (the state dict of a freshly sharded model, at any world size and
mesh, made on the meta device or not), each rank reads only the slice of its own local shard.
Without a template the saved array comes back whole, as a plain tensor. FSDP1's ``ShardedTensor`` is
refused, so is a DTensor with a ``Partial`` placement (a pending reduction), so is a DTensor
whose local shard is not one block (a lone ``_StridedShard``), so is one split over a mesh dimension
along which the mesh's ranks are not ascending (see :func:`out_of_order`), and so is one whose local shard is not
the block its layout gives the rank (see :func:`misshapen`).

Example::

    model_state, optim_state = get_state_dict(model, optimizer)       # DTensors, in every rank
    ckptr.save_checkpointables(step, {"model": model_state, "optim": optim_state})
    templates = get_state_dict(fresh_model, fresh_optimizer)          # any world size
    loaded = ckptr.load_checkpointables(abstract_checkpointables={"model": templates[0], "optim": templates[1]})
    set_state_dict(fresh_model, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
"""
from __future__ import annotations

import functools
import math
import sys
import zlib
from typing import Any, Callable

import numpy as np

from ckpt import format as fmt
from ckpt import tree as tree_lib
from ckpt.tree import KeyPath, keystr

Index = tuple[slice, ...]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (False without importing torch.distributed.tensor when nothing did)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def holds_dtensors(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a DTensor."""
    return sys.modules.get("torch.distributed.tensor") is not None and any(
        is_dtensor(leaf) for _, leaf in tree_lib.flatten(tree)[1])


def layouts(name: str, flat: list[tuple[KeyPath, Any]]) -> list[str]:
    """Each DTensor among ``flat`` ((key path, value) pairs of checkpointable ``name``) with its global shape,
    dtype, placements and mesh (its shape and ranks), in words: what every process of a job holds alike
    (nothing without torch.distributed.tensor imported). Ranks holding a key over meshes of other ranks
    (pipeline stages whose modules name their parameters alike) would write their shards into one array; a
    mesh sliced from a larger one (``root["dp"]``) is named by the slice's dimensions and the larger mesh,
    alike on every slice: their ranks hold copies of the DTensor, whose values a save compares (see
    :func:`on_slices`).

    Example::

        assert layouts("state", [(("w",), np.ones(2))]) == []
    """
    if sys.modules.get("torch.distributed.tensor") is None:
        return []
    return [f"{name}{keystr(path)}: a DTensor of shape {tuple(x.shape)}, {str(x.dtype).removeprefix('torch.')}, "
            f"{x.placements} over {_mesh_words(x.device_mesh)}" for path, x in flat if is_dtensor(x)]


@functools.lru_cache(maxsize=64)
def _mesh_words(mesh: Any) -> str:
    """``mesh`` in words: its shape and ranks (a range of them as its ends), or its place in the mesh it is a
    slice of, made once per mesh."""
    root = _sliced_from(mesh)
    if root is not None:
        return (f"a slice {mesh.mesh_dim_names} of shape {tuple(mesh.shape)} of {_mesh_words(root)} named "
                f"{root.mesh_dim_names}")
    ranks = mesh.mesh.flatten().tolist()
    if ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        held = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    else:
        held = f"ranks {mesh.mesh.tolist()}"
    return f"a mesh of shape {tuple(mesh.shape)} of {held}"


@functools.lru_cache(maxsize=64)
def _sliced_from(mesh: Any) -> Any | None:
    """The mesh that ``mesh`` is a slice of (``root["dp"]``), where that one holds more ranks, else None."""
    get_root = getattr(mesh, "_get_root_mesh", None)  # (torch 2.8+; before, the mesh resources' registry)
    root = get_root() if get_root is not None else (
        sys.modules["torch.distributed.device_mesh"]._mesh_resources.get_root_mesh(mesh))
    return root if root.size() > mesh.size() else None


def on_slices(flat: list[tuple[KeyPath, Any]]) -> list[int]:
    """The indices of the DTensors among ``flat`` ((key path, value) pairs) on a slice of a larger mesh (FSDP2's
    ``mesh["dp"]`` over the modules that tensor parallelism leaves alone): each slice's ranks hold a copy."""
    if sys.modules.get("torch.distributed.tensor") is None:
        return []
    return [i for i, (_, x) in enumerate(flat) if is_dtensor(x) and _sliced_from(x.device_mesh) is not None]


def writes_copy(x: Any) -> bool:
    """Whether this rank's slice holds the copy of DTensor ``x`` (one of :func:`on_slices`) that a save writes: the
    slice of the lowest rank of the mesh it is a slice of, as DCP writes it (each rank tells alone, the same way on
    every rank: the slices share no rank)."""
    return int(_sliced_from(x.device_mesh).mesh.min()) in x.device_mesh.mesh.flatten().tolist()


def digest(x: Any) -> list:
    """``[ranks, coordinate, crc]``: the ranks of the mesh of DTensor ``x`` (sorted), this rank's coordinate in
    it, and the CRC32 of the bytes of this rank's local shard (a copy to host memory off a CPU), which the ranks
    holding copies of ``x`` on other slices of one mesh compare (see :func:`on_slices`)."""
    import torch

    local = _values(x).contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return [sorted(x.device_mesh.mesh.flatten().tolist()), list(x.device_mesh.get_coordinate()), zlib.crc32(local)]


def refuse_sharded_tensor(path: KeyPath, x: Any) -> None:
    """Raises TypeError for FSDP1's ``ShardedTensor`` (its shards' layout is not a DTensor's)."""
    if type(x).__name__ == "ShardedTensor" and type(x).__module__.startswith("torch.distributed._shard"):
        raise TypeError(
            f"leaf at {keystr(path) or 'the root'} is an FSDP1 ShardedTensor, which ckpt does not store: use "
            "FSDP2 (torch.distributed.fsdp.fully_shard, whose state dicts hold DTensors), or FSDP1's full state "
            "dict (StateDictType.FULL_STATE_DICT)")


def refuse_partial(path: KeyPath, x: Any) -> None:
    """Raises TypeError for a DTensor with a ``Partial`` placement, small or large: a pending reduction
    is no state to save (gathered as bytes, a small one would be the sum of the ranks' bit patterns)."""
    for placement in x.placements:
        if placement.is_partial():
            raise TypeError(f"DTensor at {keystr(path) or 'the root'} has the placement {placement} (a pending "
                            "reduction); reduce it (redistribute to Replicate or Shard) before saving")


def out_of_order(x: Any) -> str | None:
    """Why DTensor ``x``'s shards have no one place in the global tensor, or None: it is split over a mesh
    dimension along which the mesh's ranks are not in ascending order (``DeviceMesh("cpu", [3, 2, 1, 0])``).
    torch's collectives (``distribute_tensor``, ``full_tensor``) order the shards by rank there, its shard
    layout (``__create_chunk_list__``, which DCP and ckpt write and read by) by place in the mesh: the two
    disagree, and either would save or load some shards in another's place."""
    mesh = x.device_mesh
    for mesh_dim, placement in enumerate(x.placements):
        if _split_dim(placement) is not None and mesh.size(mesh_dim) > 1 and _descends(mesh, mesh_dim):
            return (f"it is split ({placement}) over dimension {mesh_dim} of {_mesh_words(mesh)}, along which the "
                    "ranks are not in ascending order: torch's collectives (distribute_tensor, full_tensor) place its "
                    "shards by rank, its shard layout (__create_chunk_list__, DCP's and ckpt's) by place in the mesh, "
                    "which disagree. Make the mesh with its ranks ascending along that dimension (init_device_mesh "
                    "does), or redistribute the DTensor to Replicate there")
    return None


@functools.lru_cache(maxsize=64)
def _descends(mesh: Any, mesh_dim: int) -> bool:
    """Whether the ranks of ``mesh`` are not in ascending order along ``mesh_dim`` (the same on every rank)."""
    return not bool((np.diff(mesh.mesh.numpy(), axis=mesh_dim) > 0).all())


def is_small(x: Any) -> bool:
    """Whether the whole of DTensor ``x`` is gathered and packed rather than written shard by shard: under
    ``SMALL_LEAF_BYTES``, on a mesh of every rank of the job (a rank outside the mesh has no part in the
    gathering, and rank 0, which packs, may be one)."""
    return (math.prod(x.shape) * x.element_size() < fmt.SMALL_LEAF_BYTES
            and x.device_mesh.size() == sys.modules["torch.distributed"].get_world_size())


def split(x: Any) -> bool:
    """Whether DTensor ``x`` is split over several ranks (a ``Shard`` on a mesh dimension of more than one):
    its whole needs the other ranks' shards."""
    return any(_split_dim(p) is not None and x.device_mesh.size(d) > 1 for d, p in enumerate(x.placements))


_CARRIERS = {1: "uint8", 2: "float16", 4: "int32", 8: "int64"}  # by element size: dtypes every backend gathers


def gather(x: Any) -> Any:
    """The whole of a small DTensor, as a plain tensor (a collective: every rank calls it alike). Its
    bytes are gathered as a dtype of the same size that every backend moves (gloo refuses int16, the
    unsigned integers and float8), bit for bit."""
    import torch
    from torch.distributed.tensor import DTensor

    carrier = _CARRIERS.get(x.element_size())
    local = _values(x)
    if carrier is not None and x.dtype != getattr(torch, carrier):
        local = local.view(getattr(torch, carrier))
    bytes_of = DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())
    return bytes_of.full_tensor().view(x.dtype)


def _values(x: Any) -> Any:
    """DTensor ``x``'s local shard holding its values: a lazily conjugated or negated view resolved (a view
    as another dtype, the gathering's, would raise on it)."""
    return x.to_local().detach().resolve_conj().resolve_neg()


def gather_small(flat: list[tuple[KeyPath, Any]]) -> list[Any]:
    """The values of ``flat`` ((key path, value) pairs) with each small DTensor replaced by its whole
    tensor (every rank calls it alike). Those split on their first dimension over a one-dimensional mesh
    (FSDP2's layout) are gathered together, one collective per mesh and device instead of one per tensor;
    the others one by one.

    Raises:
      TypeError: a small DTensor with a ``Partial`` placement (see :func:`refuse_partial`), before any
        collective.
    """
    values = [value for _, value in flat]
    if sys.modules.get("torch.distributed.tensor") is None:
        return values
    groups: dict[tuple, list[int]] = {}
    out = list(values)
    for i, (path, x) in enumerate(flat):
        if is_dtensor(x) and is_small(x):
            refuse_partial(path, x)
            placement = x.placements[0]
            if len(x.placements) == 1 and type(placement).__name__ == "Shard" and placement.dim == 0 and x.ndim:
                groups.setdefault((x.device_mesh, x.to_local().device), []).append(i)
            else:
                out[i] = gather(x)
    for (mesh, device), indices in groups.items():
        for i, whole in zip(indices, _gather_rows(mesh, device, [values[i] for i in indices])):
            out[i] = whole
    return out


def _gather_rows(mesh: Any, device: Any, tensors: list[Any]) -> list[Any]:
    """The whole of each DTensor split on dim 0 over ``mesh`` (``torch.chunk``'s split: rank r holds
    rows ``[r*c, (r+1)*c)`` of n, c = ceil(n / ranks)), from one all-gather of every rank's bytes."""
    import torch
    import torch.distributed as dist

    ranks, me = mesh.size(), mesh.get_local_rank()
    sizes = []  # per tensor, the bytes each rank holds
    for x in tensors:
        n, row = x.shape[0], math.prod(x.shape[1:]) * x.element_size()
        per = -(-n // ranks)
        sizes.append([max(0, min(per, n - r * per)) * row for r in range(ranks)])
    longest = max(sum(s[r] for s in sizes) for r in range(ranks))
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    at = 0
    for x, held in zip(tensors, sizes):
        mine[at: at + held[me]] = _values(x).contiguous().reshape(-1).view(torch.uint8)  # (its size: see misshapen)
        at += held[me]
    every = [torch.empty_like(mine) for _ in range(ranks)]
    dist.all_gather(every, mine, group=mesh.get_group())
    wholes, starts = [], [0] * ranks
    for x, held in zip(tensors, sizes):
        pieces = [every[r][starts[r]: starts[r] + held[r]] for r in range(ranks)]
        starts = [start + h for start, h in zip(starts, held)]
        wholes.append(torch.cat(pieces).view(x.dtype).reshape(x.shape))
    return wholes


def chunk_shape(path: KeyPath, x: Any, shared: bool = True) -> tuple[int, ...]:
    """The zarr3 chunk shape of a DTensor: along a dimension split over one mesh dimension of size k by a
    ``Shard``, ``ceil(n / k)`` (``torch.chunk``'s split: each rank's shard is whole chunks); along a dimension
    split over mesh dimensions of sizes k1, k2, ... (nested, or FSDP2's ``_StridedShard`` over tensor
    parallelism's ``Shard``), ``n / (k1 * k2 ...)`` when that divides it (each rank's shard is one of those
    equal blocks), else, along the first such dimension and where ``shared``, the rows of the smallest block
    (517 rows over 2 x 2 ranks, blocks of 130, 129, 129, 129: chunks of 129 rows, which two neighbouring ranks'
    shards may share, written in two rounds: see :func:`in_two_rounds`), and along any other the greatest
    common divisor of the blocks' places (no chunk shared); whole along the others. The same on every rank (it
    depends on the global shape and placements only), as the shared zarr.json requires.

    Raises:
      TypeError: a local shard that is not one block of the global tensor (see :func:`_strided_apart`).
    """
    splits: dict[int, list[tuple[int, bool]]] = {}  # dim -> (mesh size, a plain Shard) of each split
    apart = _strided_apart(x)
    if apart is not None:
        raise TypeError(f"DTensor at {keystr(path) or 'the root'} has the placements {x.placements}: {apart}; "
                        "redistribute it (to Shard or Replicate) before saving")
    for mesh_dim, placement in enumerate(x.placements):
        dim = _split_dim(placement)
        if dim is not None:
            splits.setdefault(dim, []).append((x.device_mesh.size(mesh_dim), type(placement).__name__ == "Shard"))
    shape, sharing = [], not shared
    for dim, n in enumerate(x.shape):
        ways = splits.get(dim, [])
        parts = math.prod(k for k, _ in ways)
        if not ways:
            shape.append(n)
        elif len(ways) == 1 and ways[0][1]:
            shape.append(-(-n // parts))
        elif n % parts == 0:  # nested or strided splits: equal blocks
            shape.append(n // parts)
        else:
            shape.append(_uneven_chunk(x, dim, shared_rows=not sharing))
            sharing = True
    return tuple(shape)


def _uneven_chunk(x: Any, dim: int, shared_rows: bool) -> int:
    """The chunk length along ``dim`` of DTensor ``x``, whose blocks there are of unequal lengths (nested
    splits that do not divide it): the smallest block's where ``shared_rows`` (no chunk then spans more than two
    blocks), else the greatest common divisor of the blocks' places (each block whole chunks); 1 where torch
    cannot tell the blocks."""
    blocks = _layout_blocks(tuple(x.shape), x.device_mesh.shape, tuple(x.placements))
    if blocks is None:
        return 1
    held = [(offsets[dim], sizes[dim]) for sizes, offsets in blocks if sizes[dim]]
    if shared_rows:
        return min(size for _, size in held)
    return max(1, math.gcd(x.shape[dim], *(offset for offset, _ in held), *(size for _, size in held)))


@functools.lru_cache(maxsize=256)
def _layout_blocks(shape: tuple[int, ...], mesh_shape: tuple[int, ...],
                   placements: tuple[Any, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """(sizes, offsets) of the block every coordinate of a mesh of ``mesh_shape`` holds of a DTensor of the global
    ``shape`` and ``placements`` (the same on every rank), or None where this torch cannot tell them."""
    try:
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as place
        return [tuple(map(tuple, place(shape, mesh_shape, list(coordinate), placements)))
                for coordinate in np.ndindex(*mesh_shape)]
    except (ImportError, TypeError, AttributeError):  # (a private function of torch's, of another signature)
        return None


def shares_chunks(x: Any, chunks: tuple[int, ...]) -> bool:
    """Whether some chunk of DTensor ``x``'s array (chunk shape ``chunks``, see :func:`chunk_shape`) holds
    rows of two ranks' blocks, which are then written in two rounds (see :func:`in_two_rounds`)."""
    if not _nested(x):  # (torch.chunk's blocks are whole chunks of ceil(n / k))
        return False
    blocks = _layout_blocks(tuple(x.shape), x.device_mesh.shape, tuple(x.placements))
    return blocks is not None and any(
        offset % c for sizes, offsets in blocks if all(sizes) for offset, c in zip(offsets, chunks))


def _nested(x: Any) -> bool:
    """Whether some dimension of DTensor ``x`` is split over more than one mesh dimension."""
    dims = [_split_dim(p) for p in x.placements if _split_dim(p) is not None]
    return len(dims) != len(set(dims))


def in_two_rounds(shards: list[tuple[Index, np.ndarray]], chunks: tuple[int, ...]
                  ) -> tuple[list[tuple[Index, np.ndarray]], list[tuple[Index, np.ndarray]]]:
    """``shards`` ((global index, host array) of a DTensor's shards this rank writes, into an array of the
    chunk shape ``chunks`` that neighbouring ranks' blocks may share, see :func:`chunk_shape`) split in the
    parts written in the first round (from the first chunk that starts in the shard on) and those written in
    the second, once every rank's first round is on disk: each shard's head, its rows in a chunk that starts
    in the block before (a copy: the shard may be the tensor itself, which training changes meanwhile). A chunk
    is then written by the rank holding its start, then completed by the one holding its end (tensorstore reads
    the chunk and writes it back whole), never by two at once."""
    first, second = [], []
    for index, data in shards:
        cut = [(dim, s) for dim, (s, c) in enumerate(zip(index, chunks)) if s.start % c]
        if not cut:
            first.append((index, data))
            continue
        dim, s = cut[0]  # (one dimension at most: chunk_shape shares rows along one alone)
        end = min(s.stop, s.start + chunks[dim] - s.start % chunks[dim])
        local = [slice(None)] * data.ndim
        local[dim] = slice(0, end - s.start)
        second.append((index[:dim] + (slice(s.start, end),) + index[dim + 1:], np.array(data[tuple(local)])))
        if end < s.stop:
            local[dim] = slice(end - s.start, None)
            first.append((index[:dim] + (slice(end, s.stop),) + index[dim + 1:], data[tuple(local)]))
    return first, second


def _split_dim(placement: Any) -> int | None:
    """The tensor dimension ``placement`` splits (a ``Shard``, or a ``_StridedShard``, which torch 2.13's
    ``is_shard()`` denies), or None."""
    if placement.is_shard() or type(placement).__name__ == "_StridedShard":
        return placement.dim
    return None


def _strided_apart(x: Any) -> str | None:
    """Why the local shard of ``x`` is not one block of the global tensor, or None when it is. A
    ``_StridedShard(dim, split_factor=k)`` on one mesh dimension leaves each rank k pieces of ``dim``
    (torch's ``__create_chunk_list__`` then reports one wrong block); they join into one block only when
    the mesh dimensions after it split ``dim`` k ways (FSDP2 over tensor parallelism: k is the TP degree)."""
    for mesh_dim, placement in enumerate(x.placements):
        if type(placement).__name__ != "_StridedShard":
            continue
        later = math.prod(x.device_mesh.size(d) for d, p in enumerate(x.placements)
                          if d > mesh_dim and _split_dim(p) == placement.dim)
        if later != placement.split_factor:
            return (f"its {placement} on mesh dimension {mesh_dim} leaves each rank {placement.split_factor // later} "
                    f"pieces of dimension {placement.dim} apart, not one block")
    return None


def own_shards(x: Any) -> list[tuple[Index, Any]]:
    """(global index, local torch tensor) of the shards this rank writes: its local shard when it is
    the primary replica and not empty, else nothing."""
    coordinate = x.device_mesh.get_coordinate()
    if coordinate is None or any(c != 0 for c, p in zip(coordinate, x.placements) if p.is_replicate()):
        return []
    out = []
    for chunk in x.__create_chunk_list__():
        if math.prod(chunk.sizes):
            out.append((_index(chunk), x.to_local()))
    return out


def held_whole(x: Any) -> bool:
    """Whether this rank holds the whole of DTensor ``x``: it is not :func:`split`, and this rank is in its mesh
    (a rank outside it holds an empty local tensor)."""
    return not split(x) and x.device_mesh.get_coordinate() is not None


def whole(x: Any) -> list[tuple[Index, Any]]:
    """(global index, local torch tensor) of a DTensor this rank holds whole (:func:`held_whole`): its
    local shard, whichever replica it is (what a rank saving it alone writes), unless empty."""
    return [(tuple(slice(0, n) for n in x.shape), x.to_local())] if math.prod(x.shape) else []


def restore(template: Any, read: Callable[[Index], np.ndarray],
            to_torch: Callable[[np.ndarray, Any, Any], Any]) -> Any:
    """A DTensor like ``template`` (its mesh, placements and global shape) holding the saved values:
    this rank reads only the slice of its local shard through ``read`` and makes it a tensor with
    ``to_torch(array, device, dtype)``. A template on the meta device (a model made there, then sharded)
    gives only shapes, dtypes and layouts: the local shard goes to the device type of its mesh."""
    import torch
    from torch.distributed.tensor import DTensor

    out_of_place = out_of_order(template)  # (a rank whose local shard is empty reads nothing: refused there too)
    if out_of_place is not None:
        raise TypeError(f"a DTensor template with the placements {template.placements} cannot be loaded into: "
                        f"{out_of_place}")
    like = template.to_local()
    device = torch.device(template.device_mesh.device_type) if like.device.type == "meta" else like.device
    if like.numel():
        local = to_torch(read(_local_index(template)), device, like.dtype)
    else:
        local = torch.empty(like.shape, dtype=like.dtype, device=device)
    return DTensor.from_local(local, template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


def misshapen(x: Any, local: Any) -> str | None:
    """Why ``local``, the local shard of DTensor ``x``, is not the block its layout gives this rank, or None: a
    DTensor made with ``DTensor.from_local(..., shape=...)`` from local shards that ``torch.chunk`` would not split
    so (each rank would write, or gather, a piece the others do not expect)."""
    if x.device_mesh.get_coordinate() is None:
        return None  # (a rank outside the mesh holds nothing)
    blocks, local = _blocks(x), tuple(local.shape)
    if len(blocks) == 1 and _sizes(blocks[0]) == local:
        return None
    return (f"its local shard on this rank has the shape {local}, where its layout (global shape {tuple(x.shape)}, "
            f"{x.placements} over {_mesh_words(x.device_mesh)}) puts a block of the shape "
            f"{' + '.join(str(_sizes(b)) for b in blocks)} (torch.chunk's split)")


_BLOCKS: dict[tuple, list[Index]] = {}  # (shape, mesh, placements, coordinate) -> the local shard's blocks


def _blocks(x: Any) -> list[Index]:
    """Where DTensor ``x``'s layout puts this rank's local shard in the global tensor (torch's
    ``__create_chunk_list__``), asked once per layout: a model's tensors share a few, and
    ``__create_chunk_list__`` costs about a millisecond."""
    mesh = x.device_mesh
    key = (tuple(x.shape), mesh, x.placements, tuple(mesh.get_coordinate() or ()))
    blocks = _BLOCKS.get(key)
    if blocks is None:
        blocks = [_index(chunk) for chunk in x.__create_chunk_list__()]
        if len(_BLOCKS) < 4096:
            _BLOCKS[key] = blocks
    return blocks


def _sizes(index: Index) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


def _local_index(template: Any) -> Index:
    """Where the local shard of ``template`` lies in the global tensor."""
    apart = _strided_apart(template)
    if apart is not None:
        raise TypeError(f"a DTensor template with the placements {template.placements} cannot be loaded into: "
                        f"{apart}")
    blocks = _blocks(template)
    if len(blocks) != 1 or _sizes(blocks[0]) != tuple(template.to_local().shape):
        raise TypeError(f"a DTensor template whose local shard is not one block of the global tensor "
                        f"({[_sizes(b) for b in blocks]}) cannot be loaded into")
    return blocks[0]


def _index(chunk: Any) -> Index:
    return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
