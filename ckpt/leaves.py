"""What each leaf type becomes on disk and back.

A leaf is stored either inline in the manifest (Python int/float/bool/str/None) or as array data
(numpy arrays and scalars, bytes, jax arrays, typed PRNG keys as their key data, torch tensors,
DTensors through :mod:`ckpt.dtensor`). Framework types are recognised only when their module is
already imported, and translated here, at the boundary: the rest of ckpt sees numpy arrays, JSON,
and arrays spread over processes as a :class:`Spread`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
import sys
from typing import Any, Callable

import ml_dtypes  # noqa: F401  (registers bfloat16, float8_*, int4 with numpy)
import numpy as np

from ckpt import casts, dtensor, shardings, transfers
from ckpt import format as fmt
from ckpt.errors import UnregisteredTypeError
from ckpt.leaf_table import LeafTable
from ckpt.tree import KeyPath, keystr


# The abstract leaf that means "skip this leaf" (``ckpt.PLACEHOLDER``): the Ellipsis object, as Orbax's
# ``ocp.PLACEHOLDER``, so ``...`` in an abstract tree skips its leaf too (see ``ckpt.load``'s example).
PLACEHOLDER = ...

INLINE_TYPES = {int: "int", float: "float", bool: "bool", str: "str", type(None): "none"}


@dataclasses.dataclass
class Spread:
    """An array spread over processes (a jax.Array or a DTensor): the zarr3 chunk shape under which no
    two processes' shards share a chunk, unless ``apart`` is that shape (then neighbouring processes' shards
    share chunks of ``chunk_shape``, written in two rounds: see :func:`ckpt.dtensor.in_two_rounds`; a process
    saving its own part alone, whose files a promotion puts together, writes chunks of ``apart``),
    ``own_shards()``, the (global index, host array) of the shards this process writes (the primary replica of
    each), and ``whole``, where this process holds every shard (a DTensor replicated, or on a mesh of one rank),
    what it writes of them saving alone."""

    chunk_shape: tuple[int, ...]
    own_shards: Callable[[], list[tuple[Any, np.ndarray]]]
    whole: Callable[[], list[tuple[Any, np.ndarray]]] | None = None
    apart: tuple[int, ...] | None = None

    @property
    def shares_chunks(self) -> bool:
        """Whether neighbouring processes' shards share chunks (written in two rounds)."""
        return self.apart is not None


@dataclasses.dataclass
class HostLeaf:
    """A leaf ready to be written: its manifest entry and, for array leaves, its host bytes (or, for a
    large jax array whose host copy a save makes a chunk at a time, a :class:`ckpt.transfers.DeviceRows`)."""

    meta: dict[str, Any]
    array: np.ndarray | transfers.DeviceRows | None = None
    spread: Spread | None = None  # spread over processes: each writes the shards it owns
    gather: Any = None  # a small DTensor, whose whole :func:`gather` puts in ``array`` (None until then)
    shards: list[tuple[Any, np.ndarray]] | None = None  # (index, host copy) of this process's shards, once snapshot


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: np.dtype) -> str:
    """The name a dtype is stored under: ``float32``, ``bfloat16``, ``float8_e4m3fn``; ``<U5`` for others
    (cached: numpy builds ``dtype.name`` anew on every access, a few microseconds per leaf)."""
    if dtype.kind in "biufc" or type(dtype).__module__.startswith("ml_dtypes") or dtype.name in _ML_NAMES:
        return dtype.name
    return dtype.str


_ML_NAMES = {name for name in dir(ml_dtypes) if isinstance(getattr(ml_dtypes, name), type)}
# Numeric dtypes in this machine's byte order, stored as they are: their names, without asking
# ``_check_array`` and ``_native``.
_NATIVE_NAMES = {np.dtype(t): dtype_name(np.dtype(t)) for t in
                 (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                  np.float16, np.float32, np.float64, np.complex64, np.complex128, ml_dtypes.bfloat16)
                 if sys.byteorder == "little" or np.dtype(t).itemsize == 1}


def parse_dtype(name: str) -> np.dtype:
    """Inverse of :func:`dtype_name`; raises ValueError for anything else, object dtypes included."""
    dtype = _parse_dtype(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"{name!r} is not a dtype ckpt stores (a manifest names only numeric, bool, string "
                         "and bytes dtypes, never Python objects)")
    return dtype


@functools.lru_cache(maxsize=None)
def _parse_dtype(name: str) -> np.dtype | None:
    """The dtype stored as ``name``, or None (cached: a load parses a dtype per leaf)."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = np.dtype(getattr(ml_dtypes, name)) if name in _ML_NAMES else None
    return None if dtype is None or dtype.hasobject else dtype


_FLOAT0 = np.dtype([("float0", np.void, 0)])  # jax.dtypes.float0, known without importing jax


def _check_array(path: KeyPath, dtype: np.dtype, shape: tuple[int, ...], what: str) -> None:
    """Raises TypeError (ValueError for the shape) naming the key path for an array ckpt cannot store."""
    where = keystr(path) or "the root"
    if dtype.hasobject:
        raise TypeError(f"{what} at {where} has dtype {dtype}, which holds Python objects; store numeric, bool, "
                        "string or bytes data instead (nothing is pickled)")
    if dtype == _FLOAT0:
        raise TypeError(f"{what} at {where} has jax's dtype float0 (the gradient of an integer or bool input), which "
                        "holds no values and which ckpt does not store: drop the leaf or replace it with None before "
                        "saving")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"{what} at {where} has the structured dtype {dtype}, which ckpt does not store (its field "
                        "names would be lost): store each field as an array of its own")
    _check_ndim(path, shape, what)


def _check_ndim(path: KeyPath, shape: tuple[int, ...], what: str) -> None:
    if len(shape) > fmt.MAX_NDIM:
        raise ValueError(f"{what} at {keystr(path) or 'the root'} has {len(shape)} dimensions; ckpt stores at most "
                         f"{fmt.MAX_NDIM}")


def _check_jax_array(path: KeyPath, x: Any, jax: Any) -> None:
    """Raises naming the key path for a jax array with no values to save (a tracer, a deleted array)."""
    where = keystr(path) or "the root"
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"jax array at {where} is a tracer, which holds no values: the save was called inside a "
                        "transformed function (jax.jit, grad, vmap). Save the arrays it returns, outside it")
    if x.is_deleted():
        raise ValueError(f"jax array at {where} has been deleted (donated to a jitted function, or .delete()): "
                         "save the array the function returned in its place")
    unreduced = getattr(getattr(x.sharding, "spec", None), "unreduced", None)  # (older jax has none)
    if unreduced:
        raise TypeError(f"jax array at {where} is unreduced over the mesh axes {sorted(unreduced)} (each device holds "
                        "a partial sum, not its values): reduce it first (jax.lax.psum, or jax.sharding.reshard)")
    _check_ndim(path, x.shape, "jax array")


def _native(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def to_host(path: KeyPath, x: Any) -> HostLeaf:
    """Classifies a leaf and returns its manifest entry plus its data as a numpy array (maybe a view), or
    as :class:`ckpt.transfers.DeviceRows` for a large jax array a save copies a chunk at a time.

    Raises:
      UnregisteredTypeError: the leaf's type cannot be stored (a TypeError); the message names the key path
        and the type.
    """
    if type(x) is np.ndarray:  # the usual leaf, first
        name = _NATIVE_NAMES.get(x.dtype)
        if name is not None and x.ndim <= fmt.MAX_NDIM:
            return HostLeaf({"type": "numpy", "dtype": name, "shape": list(x.shape)}, x)
    if type(x) is HostLeaf:  # described already (``ckpt convert`` keeps each leaf as it was saved)
        return x
    kind = INLINE_TYPES.get(type(x))
    if kind is not None:
        if kind == "float" and not math.isfinite(x):
            return HostLeaf({"type": "float", "value": repr(x)})
        if kind == "int" and x.bit_length() > fmt.MAX_INT_BITS:
            raise ValueError(f"int at {keystr(path) or 'the root'} has {x.bit_length()} bits; ckpt stores ints of "
                             f"at most {fmt.MAX_INT_BITS} (store a larger number as a str)")
        return HostLeaf({"type": kind, "value": x})
    if isinstance(x, bytes) and not isinstance(x, np.generic):  # np.bytes_ is a numpy scalar
        return HostLeaf({"type": "bytes", "dtype": "uint8", "shape": [len(x)]}, np.frombuffer(x, np.uint8))
    if isinstance(x, np.ndarray):
        _check_array(path, x.dtype, x.shape, "numpy array")
        masked = sys.modules.get("numpy.ma")
        if masked is not None and isinstance(x, masked.MaskedArray):
            raise TypeError(f"numpy array at {keystr(path) or 'the root'} is a masked array, whose mask ckpt would "
                            "lose: store its data and its mask (np.ma.getmaskarray) as two arrays")
        x = _native(x)
        return HostLeaf({"type": "numpy", "dtype": dtype_name(x.dtype), "shape": list(x.shape)}, x)
    if isinstance(x, np.generic):
        _check_array(path, x.dtype, (), "numpy scalar")
        array = _native(np.asarray(x))
        return HostLeaf({"type": "np_scalar", "dtype": dtype_name(array.dtype), "shape": []}, array)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if dtensor.is_dtensor(x):
            return _dtensor_leaf(path, x)
        dtensor.refuse_sharded_tensor(path, x)
        array = torch_to_numpy(path, x)
        _check_array(path, array.dtype, array.shape, "torch tensor")
        return HostLeaf({"type": "torch", "dtype": dtype_name(array.dtype), "shape": list(array.shape)}, array)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        _check_jax_array(path, x, jax)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(x)
            meta = {"type": "jax_key", "impl": str(jax.random.key_impl(x)), "dtype": dtype_name(np.dtype(data.dtype)),
                    "shape": list(data.shape), "key_shape": list(x.shape)}
        else:
            meta, data = {"type": "jax", "dtype": dtype_name(np.dtype(x.dtype)), "shape": list(x.shape)}, x
            if x.weak_type:  # a Python scalar's type, which takes the dtype of the arrays it meets
                meta["weak_type"] = True
        sharding = shardings.describe(x.sharding)
        if sharding is not None:
            meta["sharding"] = sharding
        return _jax_leaf(meta, data)
    if jax is not None and isinstance(x, getattr(jax, "Ref", ())):  # (jax 0.7 and later)
        raise UnregisteredTypeError(
            f"leaf at {keystr(path) or 'the root'} is a jax.Ref, which ckpt does not store (nor does Orbax): a Ref is "
            "mutable, so save the array it holds, `ref[...]` (the Flax helpers read an NNX model's Refs themselves)")
    raise UnregisteredTypeError(
        f"leaf at {keystr(path) or 'the root'} has type {type(x).__module__}.{type(x).__qualname__}, which ckpt "
        "cannot store; supported leaves are numpy arrays and scalars, int, float, bool, str, bytes, None, "
        "jax.Array and torch.Tensor (nothing is pickled: convert the object to one of these)"
    )


def describe(flat: list[tuple[KeyPath, Any]]) -> tuple[list[dict], list[np.ndarray | transfers.DeviceRows | None],
                                                     list[Spread | None], list[Any]]:
    """:func:`to_host` of each (key path, leaf) as four columns: the manifest entries, the host arrays,
    the spreads and the small DTensors left to :func:`gather` (``HostLeaf.gather``; their arrays None until
    then: no collective here), with no object per numpy array. Numpy arrays of one dtype and shape share
    one manifest entry: copy an entry before changing it.

    Example::

        metas, arrays, spreads, gathers = describe([(("w",), np.ones(2)), (("b",), np.zeros(2))])
        assert metas[0] is metas[1] == {"type": "numpy", "dtype": "float64", "shape": [2]}
    """
    values = [x for _, x in flat]
    native, shared, max_ndim = _NATIVE_NAMES, {}, fmt.MAX_NDIM
    found = [  # to_host's first case, inline
        shared.get(key) or shared.setdefault(key, {"type": "numpy", "dtype": key[0], "shape": list(key[1])})
        if type(x) is np.ndarray and (key := (native.get(x.dtype), x.shape))[0] is not None and len(key[1]) <= max_ndim
        else to_host(path, x)
        for path, x in flat]
    hosts = [i for i, entry in enumerate(found) if type(entry) is HostLeaf]
    metas, arrays, spreads, gathers = found, values, [None] * len(found), [None] * len(found)
    for i in hosts:
        host = found[i]
        metas[i], arrays[i], spreads[i], gathers[i] = host.meta, host.array, host.spread, host.gather
    return metas, arrays, spreads, gathers


def _jax_leaf(meta: dict, x: Any) -> HostLeaf:
    if x.is_fully_addressable:
        return HostLeaf(meta, transfers.device_rows(x) or np.asarray(x))
    if primarys_alone(x):  # the primary holds it whole, and writes it so: planned here as there, never read
        return HostLeaf(meta, np.zeros(meta["shape"], parse_dtype(meta["dtype"])))
    return HostLeaf(meta, None, spread=Spread(
        tuple(x.sharding.shard_shape(x.shape)),
        lambda: [(s.index, np.asarray(s.data)) for s in x.addressable_shards if s.replica_id == 0]))


def primarys_alone(x: Any) -> bool:
    """Whether a jax array that is not fully addressable here lies on the primary process's devices alone (none
    of its shards here): the primary sees it whole, and plans it as a leaf it writes alone (packed when small), which
    every process must plan alike (the same places, the same array names)."""
    return not x.addressable_shards and all(device.process_index == 0 for device in x.sharding.device_set)


def _dtensor_leaf(path: KeyPath, x: Any) -> HostLeaf:
    """A DTensor: stored as a plain tensor when small (its whole left to :func:`gather`), else written
    shard by shard."""
    dtensor.refuse_partial(path, x)
    out_of_order = dtensor.out_of_order(x)
    if out_of_order is not None:
        raise TypeError(f"DTensor at {keystr(path) or 'the root'} has no one layout: {out_of_order}")
    local = x.to_local()
    misshapen = dtensor.misshapen(x, local)
    if misshapen is not None:
        raise ValueError(f"DTensor at {keystr(path) or 'the root'} does not hold what its layout says: {misshapen}. "
                         "Make it with distribute_tensor, or from local shards split as torch.chunk splits them")
    dtype = torch_to_numpy(path, local.unsqueeze(0)[:0]).dtype  # from an empty view: no copy off a device
    _check_array(path, dtype, tuple(x.shape), "torch tensor")
    meta = {"type": "torch", "dtype": dtype_name(dtype), "shape": list(x.shape)}
    if dtensor.is_small(x):
        return HostLeaf(meta, None, gather=x)
    def host(shards: list[tuple[dtensor.Index, Any]]) -> list[tuple[dtensor.Index, np.ndarray]]:
        return [(index, torch_to_numpy(path, t)) for index, t in shards]

    chunks = dtensor.chunk_shape(path, x)
    apart = dtensor.chunk_shape(path, x, shared=False) if dtensor.shares_chunks(x, chunks) else None
    return HostLeaf(meta, None, spread=Spread(
        chunks, lambda: host(dtensor.own_shards(x)),
        (lambda: host(dtensor.whole(x))) if dtensor.held_whole(x) else None, apart))


def gather(leaves: list[tuple[KeyPath, HostLeaf]]) -> None:
    """Puts in each leaf of a small DTensor (``HostLeaf.gather``) among ``leaves`` (key path, leaf) its whole
    tensor, as its entry's dtype (a storage option may have changed it). A collective: in a multi-process
    job every process calls it with leaves of the same DTensors, which only a comparison of their trees
    makes sure of (see :func:`ckpt.saving.agree`); a process missing one would leave the others waiting
    in it, or end them.
    """
    pending = [(path, host) for path, host in leaves if host.gather is not None]
    for (path, host), whole in zip(pending, dtensor.gather_small([(path, host.gather) for path, host in pending])):
        array = torch_to_numpy(path, whole)
        host.array, host.gather = stored_as(path, array, parse_dtype(host.meta["dtype"])), None


def stored_as(path: KeyPath, array: np.ndarray, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """``array`` (the leaf at ``path``) as the storage dtype ``dtype`` asks (a storage option's), rounded as numpy
    rounds (``out``: that cast made already, by a snapshot's copy, checked); raises ValueError naming the leaf where
    a value does not fit ``dtype`` (see :func:`ckpt.casts.cast`), or numpy cannot cast it (text into a number)."""
    try:
        if out is None:
            return casts.cast(array, dtype)
        casts.check(array, out)
        return out
    except (casts.OutOfRangeError, ValueError, TypeError) as e:
        raise ValueError(f"the array at {keystr(path) or 'the root'} cannot be stored as {dtype} (the storage options' "
                         f"dtype): {e}. Store it as a dtype that holds its values (a scoped_storage_options_creator "
                         "can keep its own for it).") from None


_TORCH_VIEWS = {"bfloat16": ("int16", "bfloat16"), "float8_e4m3fn": ("uint8", "float8_e4m3fn"),
                "float8_e5m2": ("uint8", "float8_e5m2"), "float8_e4m3fnuz": ("uint8", "float8_e4m3fnuz"),
                "float8_e5m2fnuz": ("uint8", "float8_e5m2fnuz"), "float8_e8m0fnu": ("uint8", "float8_e8m0fnu")}
# The same, from the numpy side: ml_dtypes' dtype -> (carrier, torch dtype name).
_NUMPY_VIEWS = {np.dtype(getattr(ml_dtypes, target)): (carrier, name) for name, (carrier, target) in _TORCH_VIEWS.items()}


def torch_holds(dtype: np.dtype) -> bool:
    """Whether a torch tensor converts to a numpy array of ``dtype`` (:func:`torch_to_numpy`) and back."""
    return dtype.kind in "biufc" or dtype in _NUMPY_VIEWS


def torch_to_numpy(path: KeyPath, t: Any) -> np.ndarray:
    """A CPU numpy view (or copy, off-CPU) of a torch tensor, bfloat16 and float8 (e8m0 too) included."""
    torch = sys.modules["torch"]
    where = keystr(path) or "the root"
    if uninitialized(t):
        raise TypeError(f"torch tensor at {where} is an uninitialized parameter of a lazy module, which holds no values "
                        "yet: run a forward pass (which gives it its shape) before saving")
    if t.layout != torch.strided or t.is_nested or t.device.type == "meta":
        kind = "a nested tensor" if t.is_nested else "on the meta device" if t.device.type == "meta" else f"{t.layout}"
        raise TypeError(f"torch tensor at {where} is {kind}, which ckpt cannot store: store a dense tensor that holds "
                        "its data (to_dense(), or its parts)")
    t = t.detach().resolve_conj().resolve_neg()  # a lazily conjugated or negated view: its values
    if t.device.type != "cpu":
        t = t.cpu()
    name = str(t.dtype).removeprefix("torch.")
    try:
        if name in _TORCH_VIEWS:
            carrier, target = _TORCH_VIEWS[name]
            return t.contiguous().view(getattr(torch, carrier)).numpy().view(getattr(ml_dtypes, target))
        return t.contiguous().numpy()
    except (TypeError, RuntimeError) as e:  # a dtype numpy lacks, or a wrapper subclass (torchao's NF4Tensor)
        what = f"dtype {t.dtype}" if type(t) is torch.Tensor else (
            f"type {type(t).__module__}.{type(t).__qualname__} (a tensor subclass)")
        raise TypeError(f"torch tensor at {where} has {what}, which ckpt cannot store ({e})") from None


def uninitialized(x: Any) -> bool:
    """Whether ``x`` is an uninitialized parameter or buffer of a lazy module (``torch.nn.LazyLinear`` before its
    first forward pass), which has no shape yet."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.nn.parameter.UninitializedTensorMixin)


def _nested(x: Any) -> bool:
    """Whether ``x`` is a nested torch tensor (``torch.nested``), whose shape torch does not give (or gives
    with ragged dimensions)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor) and x.is_nested


def _check_torch_template(template: Any) -> None:
    """Raises TypeError for a template of a layout ckpt neither stores nor loads into (sparse: the load gave a dense
    tensor in its place), or whose dtype torch cannot copy values into (bits, quantized and sub-byte dtypes)."""
    layout = template.layout
    if layout != sys.modules["torch"].strided:
        raise TypeError(f"the template is a {layout} tensor, which ckpt neither stores nor loads into: give a dense "
                        "tensor of its shape, and make the loaded one sparse after the load (to_sparse())")
    why = _torch_cannot_receive(template.dtype)
    if why is not None:
        raise TypeError(f"the template has dtype {template.dtype}, which torch cannot copy values into ({why}): give it "
                        "the dtype the leaf was saved with, or another numeric one")


@functools.lru_cache(maxsize=None)
def _torch_cannot_receive(dtype: Any) -> str | None:
    """Why torch cannot copy values into a tensor of ``dtype``, or None (asked of torch once per dtype)."""
    torch = sys.modules["torch"]
    try:
        torch.zeros(1, dtype=torch.uint8).to(dtype=dtype)
    except (NotImplementedError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def torch_cast(array: np.ndarray, dtype: Any) -> Any:
    """A CPU tensor of ``array`` on its way into a tensor of the torch ``dtype``: where the cast can change a
    value, cast and checked by :mod:`ckpt.casts` (raises ``OutOfRangeError`` for a value ``dtype`` cannot hold);
    else a view of ``array``, for the caller to cast (on the tensor's device)."""
    tensor = numpy_to_torch(array)
    if dtype == sys.modules["torch"].complex32:  # (no numpy twin: checked as the two float16s it holds)
        try:
            for part in (array.real, array.imag) if array.dtype.kind == "c" else (array,):
                casts.cast(part, np.float16)
        except casts.OutOfRangeError as e:
            raise casts.OutOfRangeError(f"{e}: complex32 holds two float16s") from None
    target = _checked_twin(array.dtype, dtype)
    if target is None:
        return tensor
    if target.itemsize == 1:  # torch's float8 casts saturate (1000.0 and inf become 448.0 in float8_e4m3fn) or
        return numpy_to_torch(casts.cast(array, target))  # drop a sign (float8_e8m0fnu), which no check could tell
    out = (tensor.real if tensor.is_complex() and not dtype.is_complex else tensor).to(dtype)
    casts.check(array, torch_to_numpy((), out))  # (a complex one's imaginary parts too)
    return out


@functools.lru_cache(maxsize=None)
def _checked_twin(source: np.dtype, dtype: Any) -> np.dtype | None:
    """The numpy dtype that :func:`torch_to_numpy` gives a tensor of the torch ``dtype``, where a cast from ``source``
    into it can change a value; else None (or where numpy has no such dtype)."""
    try:
        target = torch_to_numpy((), sys.modules["torch"].empty(0, dtype=dtype)).dtype
    except TypeError:
        return None
    return target if casts.changes_values(source, target) else None


def numpy_to_torch(array: np.ndarray) -> Any:
    """A CPU torch tensor viewing ``array`` (bfloat16/float8 included; a numpy scalar, as a 0-d array's
    element reads, becomes a 0-d tensor)."""
    import torch

    array = np.asarray(array)
    array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    view = _NUMPY_VIEWS.get(array.dtype)
    return torch.from_numpy(array) if view is None else torch.from_numpy(array.view(view[0])).view(getattr(torch, view[1]))


def _logical_shape(meta: dict) -> list[int]:
    return meta.get("key_shape", meta.get("shape", []))


def abstract_shape(abstract: Any) -> tuple[int, ...] | None:
    """The shape an abstract leaf asks for, or None when it does not constrain it."""
    if isinstance(abstract, type) or abstract is None or abstract is PLACEHOLDER:
        return None
    shape = getattr(abstract, "shape", None)
    return None if shape is None else tuple(shape)


def check_leaf(path: KeyPath, meta: dict, abstract: Any) -> str | None:
    """Why ``abstract`` cannot receive the saved leaf ``meta``, or None when it can."""
    if abstract is None or abstract is PLACEHOLDER:
        return None
    if uninitialized(abstract):
        return (f"{keystr(path)}: the abstract leaf is an uninitialized parameter of a lazy module, which has no shape "
                "yet: put None in its place to read the leaf as saved (the lazy module's load_state_dict takes it), or "
                "run a forward pass first")
    if _nested(abstract):
        return (f"{keystr(path)}: the abstract leaf is a nested torch tensor, which ckpt neither stores nor loads into: "
                "put None in its place to read the leaf as saved, or a dense tensor of its shape")
    if type(abstract) is np.ndarray and meta.get("shape") == list(abstract.shape) and "key_shape" not in meta:
        return None  # the usual leaf
    want = abstract_shape(abstract)
    inline = meta["type"] in ("int", "float", "bool", "str", "none")
    if want is not None and inline and (want != () or not _becomes_array(meta["type"], abstract)):
        return f"{keystr(path)}: saved a {meta['type']} value, abstract leaf wants an array of shape {want}"
    numpy_type = isinstance(abstract, type) and issubclass(abstract, _NUMPY_NUMBERS)
    python = "number" if numpy_type else _PYTHON_RECEIVES.get(abstract if isinstance(abstract, type) else type(abstract))
    if python is not None and _as_python(meta) != python:
        wants = f"a numpy {abstract.__name__}" if numpy_type else f"a Python {python}"
        return f"{keystr(path)}: saved {_saved_what(meta)}, abstract leaf wants {wants}"
    impl = _key_impl(abstract)
    if meta["type"] == "jax_key" and impl is None:
        why = _key_data_mismatch(meta, abstract, want)
        if why:
            return f"{keystr(path)}: {why}"
    elif meta["type"] != "jax_key" and impl is not None:
        data_shape = want + tuple(abstract.dtype._impl.key_shape)
        if meta.get("dtype") != "uint32" or tuple(meta.get("shape", ())) != data_shape:
            return (f"{keystr(path)}: saved {_saved_what(meta)}, abstract leaf wants {impl!r} PRNG keys of shape "
                    f"{want}, which only their uint32 key data (shape {data_shape}) becomes")
    elif want is not None and not inline and tuple(_logical_shape(meta)) != want:
        return f"{keystr(path)}: saved shape {tuple(_logical_shape(meta))}, abstract leaf wants {want}"
    if meta["type"] == "jax_key" and impl is not None and impl != meta.get("impl"):
        return f"{keystr(path)}: saved {meta.get('impl')!r} PRNG keys, abstract leaf wants {impl!r} keys"
    return None


_PYTHON_RECEIVES = {int: "number", float: "number", bool: "number", str: "str", bytes: "bytes"}
_NUMPY_NUMBERS = (np.number, np.bool_)  # (numpy scalar types an abstract leaf may be, receiving a number as ints do)
"""What an abstract leaf of each Python type receives: a saved number (cast, as Orbax casts), str or bytes.
Never a value made up from another (an array's printout as a str, a str's truth as a bool)."""


def _as_python(meta: dict) -> str | None:
    """What a saved leaf is as one Python value ("number", "str", "bytes"), or None (None, an array that is
    not 0-d, PRNG keys)."""
    kind = meta["type"]
    if kind in ("int", "float", "bool"):
        return "number"
    if kind in ("str", "bytes"):
        return kind
    if kind in ("numpy", "np_scalar", "jax", "torch") and not meta.get("shape"):
        return {"U": "str", "S": "bytes"}.get(parse_dtype(meta["dtype"]).kind, "number")
    return None


def _saved_what(meta: dict) -> str:
    if meta["type"] in ("int", "float", "bool", "str", "none", "bytes"):
        return f"a {meta['type']} value"
    return f"a {meta['type']} leaf of dtype {meta.get('dtype')} and shape {tuple(_logical_shape(meta))}"


def _key_data_mismatch(meta: dict, abstract: Any, want: tuple[int, ...] | None) -> str | None:
    """Why an abstract leaf that is not a typed key cannot receive saved PRNG keys, or None. A jax leaf (an
    array, a ``ShapeDtypeStruct``: ``metadata()``'s uint32 leaves) of the keys' shape receives the keys; a
    numpy leaf or a torch tensor receives their uint32 key data, of shape ``key_shape + (words,)``."""
    dtype = None if isinstance(abstract, type) else getattr(abstract, "dtype", None)
    wanted = None if dtype is None else str(dtype).removeprefix("torch.")  # (a torch dtype is no numpy dtype)
    if wanted is not None and wanted != "uint32":
        return f"saved {meta.get('impl')!r} PRNG keys (uint32 key data), abstract leaf wants {wanted}"
    torch = sys.modules.get("torch")
    as_data = isinstance(abstract, (np.ndarray, np.generic)) or (
        torch is not None and isinstance(abstract, torch.Tensor))
    shape = meta["shape"] if as_data else _logical_shape(meta)
    if want is not None and tuple(shape) != want:
        what = "their key data has" if as_data else "the keys have"
        return f"saved {meta.get('impl')!r} PRNG keys, {what} shape {tuple(shape)}, abstract leaf wants {want}"
    return None


def _becomes_array(kind: str, abstract: Any) -> bool:
    """Whether a saved inline value of ``kind`` can become the 0-d array ``abstract`` asks for: a number or
    bool can, None cannot, a str only an array of text."""
    if kind == "str":
        return getattr(getattr(abstract, "dtype", None), "kind", None) in ("U", "S")
    return kind != "none"


def _key_impl(abstract: Any) -> str | None:
    """The PRNG implementation of a typed key (array or ``ShapeDtypeStruct``), as saved in ``impl``; else None."""
    impl = getattr(getattr(abstract, "dtype", None), "_impl", None)  # (jax.random.key_impl takes arrays only)
    return None if impl is None else str(getattr(impl, "name", impl))


def check_leaves(flat: list[tuple[KeyPath, Any]], table: LeafTable, order: list[int] | None = None) -> list[str]:
    """:func:`check_leaf` of each (key path, abstract leaf) in ``flat`` and the saved leaf of its position
    (row ``order[j]`` of ``table`` for leaf j; None: row j): why each cannot receive it. Abstract leaves
    whose shapes all match the saved ones (the usual tree) are checked in a few passes in C."""
    if shapes_match(list(map(_SECOND, flat)), table, order):
        return []
    rows = range(len(flat)) if order is None else order
    return [why for (path, leaf), i in zip(flat, rows) if (why := check_leaf(path, table[i], leaf))]


def shapes_match(leaves: list[Any], table: LeafTable, order: list[int] | None = None) -> bool:
    """Whether each abstract leaf of ``leaves`` has the shape of the saved leaf of its position (see
    :func:`check_leaves`) and no saved leaf is a PRNG key: then :func:`check_leaf` finds nothing to say
    of any of them. Checked in a few passes in C."""
    shapes = table.shape if order is None else [table.shape[i] for i in order]
    try:
        wanted = list(map(list, map(_SHAPE, leaves)))
    except (AttributeError, TypeError, RuntimeError):  # a leaf without a shape (None, a type, a placeholder, a lazy
        return False  # module's uninitialized parameter)
    return wanted == shapes and (table.more.count(None) == len(table)
                                 or not any("key_shape" in more for more in table.more if more is not None))


_SECOND, _SHAPE = operator.itemgetter(1), operator.attrgetter("shape")
Reader = Callable[[tuple[slice, ...] | None], np.ndarray]


def restore(meta: dict, read: Reader | np.ndarray | None, abstract: Any,
            to_device: transfers.ToDevice | None = None) -> Any:
    """Turns a stored leaf back into a value shaped by ``abstract`` (see ``Checkpointer.load``); ``read``
    reads its array (None for a leaf stored inline), or is that array, read already. With
    ``to_device``, a jax leaf may be a :class:`ckpt.transfers.Pending` until ``to_device.run()``."""
    if to_device is None:
        to_device = transfers.ToDevice()
        return to_device.run()([restore(meta, read, abstract, to_device)])[0]
    if type(read) is np.ndarray:
        read = _reader(read)
    kind = meta["type"]
    if kind in ("int", "float", "bool", "str", "none"):
        value = meta["value"]
        if kind == "float":
            value = float(value)
        if kind in ("int", "float", "bool") and (_is_array_like(abstract) or _is_array_type(abstract)):
            array = np.asarray(value)  # e.g. TrainState.step saved as a Python int, restored as int32
            if array.dtype == object:  # (an int past 64 bits)
                raise casts.OutOfRangeError(f"its int value ({value.bit_length()} bits) does not fit a numpy integer "
                                            "(int64, uint64), as an array holds it")
            as_numpy = {"type": "numpy", "dtype": dtype_name(array.dtype), "shape": []}
            return restore(as_numpy, _reader(array), abstract, to_device)
        return _cast_python(value, abstract)
    if abstract is None or abstract is np.ndarray and kind == "numpy":
        return _restore_as_saved(meta, read, to_device)
    if type(abstract) is np.ndarray:
        return casts.cast(read(None), abstract.dtype)
    jax = sys.modules.get("jax")
    if jax is not None and (type(abstract) is jax.ShapeDtypeStruct or isinstance(abstract, (jax.ShapeDtypeStruct, jax.Array))
                            or abstract is jax.Array or abstract is jax.ShapeDtypeStruct):
        return _restore_jax(meta, read, abstract, jax, to_device)
    if jax is not None and isinstance(abstract, getattr(jax, "Ref", ())):  # a new Ref holding the array, placed as
        return jax.new_ref(_restore_jax(meta, read, abstract, jax, to_device))  # the abstract's (Orbax: the array)
    if dtensor.is_dtensor(abstract):
        _check_torch_template(abstract)
        return transfers.as_template(
            dtensor.restore(abstract, read, lambda array, device, dtype: torch_cast(array, dtype).to(device, dtype)),
            abstract)
    torch = sys.modules.get("torch")
    if torch is not None and (isinstance(abstract, torch.Tensor) or abstract is torch.Tensor):
        if abstract is not torch.Tensor:
            _check_torch_template(abstract)
        tensor = numpy_to_torch(read(None)) if abstract is torch.Tensor else torch_cast(read(None), abstract.dtype)
        return tensor if abstract is torch.Tensor else to_device.torch(tensor, abstract)
    if isinstance(abstract, type):
        if abstract is np.ndarray:
            return read(None)
        return _restore_python(meta, read, abstract, to_device)
    if isinstance(abstract, np.generic):
        return abstract.dtype.type(casts.cast(read(None), abstract.dtype)[()])
    if hasattr(abstract, "shape") and hasattr(abstract, "dtype"):
        return casts.cast(read(None), np.dtype(abstract.dtype))
    return _restore_python(meta, read, abstract, to_device)


def _reader(array: np.ndarray) -> Reader:
    """Reads ``array``, whole or a slice."""
    return lambda index: array if index is None else array[index]


def _is_array_like(abstract: Any) -> bool:
    return not isinstance(abstract, type) and hasattr(abstract, "shape") and hasattr(abstract, "dtype")


def _is_array_type(abstract: Any) -> bool:
    """Whether ``abstract`` is an array class (``np.ndarray``, ``jax.Array``, ``torch.Tensor``), which asks for an
    array of its kind (a saved Python number becomes a 0-d one)."""
    jax, torch = sys.modules.get("jax"), sys.modules.get("torch")
    return (abstract is np.ndarray or (jax is not None and abstract is jax.Array)
            or (torch is not None and abstract is torch.Tensor))


def _restore_as_saved(meta: dict, read: Reader, to_device: transfers.ToDevice) -> Any:
    kind = meta["type"]
    if kind in ("jax", "jax_key") and "sharding" in meta:
        jax = _import_or_none("jax")
        sharding = None if jax is None else shardings.restore(meta["sharding"], _logical_shape(meta))
        if sharding is not None and kind == "jax_key":
            return _restore_keys(jax, meta, read, meta["impl"], sharding)
        if sharding is not None:  # where it was saved
            return _restore_jax(meta, read, _as_saved(jax, meta, sharding), jax, to_device)
    array = read(None)
    if kind == "bytes":
        return array.tobytes()
    if kind == "np_scalar":
        return array[()]
    if kind in ("jax", "jax_key"):
        jax = _import_or_none("jax")
        if jax is None:
            return array
        if kind == "jax_key":
            return _wrap_key(jax, meta, array, meta["impl"])
        if meta.get("weak_type") is True:
            return _restore_jax(meta, _reader(array), _as_saved(jax, meta, None), jax, to_device)
        return to_device.jax(array, None)
    if kind == "torch":
        torch = _import_or_none("torch")
        return array if torch is None else numpy_to_torch(array)
    return array


def _as_saved(jax: Any, meta: dict, sharding: Any) -> Any:
    """The abstract leaf of a saved jax array: its shape, dtype and weak type, placed by ``sharding``."""
    return jax.ShapeDtypeStruct(tuple(meta["shape"]), parse_dtype(meta["dtype"]), sharding=sharding,
                                weak_type=meta.get("weak_type") is True)


class LeafDataError(ValueError):
    """A saved leaf that cannot become what it is restored as: data its framework refuses (a PRNG key
    of an implementation jax does not know, a dtype torch has no type for, text past Unicode's code
    points), or a value the abstract leaf's type cannot hold (``mismatch``: a str into an int). The
    load raises :class:`ckpt.errors.CheckpointCorruptedError`, or for a mismatch
    :class:`ckpt.errors.TreeMismatchError`, naming the leaf (``path``)."""

    def __init__(self, path: str, why: str, *, mismatch: bool = False):
        super().__init__(why)
        self.path, self.why, self.mismatch = path, why, mismatch


def _restore_keys(jax: Any, meta: dict, read: Reader, impl: str, sharding: Any) -> Any:
    """PRNG keys of implementation ``impl`` from their saved key data, placed by ``sharding`` (None: the
    default device). Under a ``NamedSharding`` the key data is read as any sharded array is (each process
    reads its own shards, the key data's last dimension whole) and wrapped where it lies, so that the
    sharding may span processes."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        keys = _wrap_key(jax, meta, read(None), impl)
        return keys if sharding is None else jax.device_put(keys, sharding)
    data = _from_callback(jax, meta, sharding, read, parse_dtype(meta["dtype"]))
    return _wrap_key(jax, meta, data, impl, sharding)


@functools.lru_cache(maxsize=64)
def _key_wrapper(impl: str, sharding: Any) -> Callable[[Any], Any]:
    """``jax.random.wrap_key_data`` compiled for key data placed by ``sharding`` (one per layout)."""
    jax = sys.modules["jax"]
    return jax.jit(functools.partial(jax.random.wrap_key_data, impl=impl), out_shardings=sharding)


def _wrap_key(jax: Any, meta: dict, data: Any, impl: str, sharding: Any = None) -> Any:
    """The PRNG keys whose key data ``data`` is (a numpy array, or a jax array placed by ``sharding``),
    of implementation ``impl``; a saved key (``meta`` of type jax_key: its implementation and key data
    both come from the checkpoint) that jax refuses raises :class:`LeafDataError`."""
    try:
        with shardings.outside_context_mesh(jax):
            if sharding is None:
                return jax.random.wrap_key_data(jax.numpy.asarray(data), impl=impl)
            return _key_wrapper(impl, sharding)(data)
    except (ValueError, TypeError) as e:
        if meta["type"] != "jax_key":  # saved as plain data, received by a key of the abstract tree
            raise
        raise LeafDataError(meta["path"], f"jax refuses its key data ({data.dtype}, shape {list(data.shape)}) as "
                                         f"{impl!r} PRNG keys: {e}") from None


def refused_keys(meta: dict) -> str | None:
    """Why jax, where it is installed, refuses the saved PRNG keys ``meta`` (a ``jax_key`` leaf) as a load restores
    them (an implementation it does not know, key data not of its shape), checked on one key's data; else None."""
    jax = _import_or_none("jax")
    try:
        if jax is not None:
            _wrap_key(jax, meta, np.zeros(meta["shape"][len(meta["key_shape"]):], np.uint32), meta["impl"])
    except LeafDataError as e:
        return e.why
    return None


def _import_or_none(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def _restore_python(meta: dict, read: Reader, abstract: Any, to_device: transfers.ToDevice) -> Any:
    """The leaf as an abstract leaf that is no array asks (a Python value or type; anything else: as saved). A
    jax array becomes a Python number from its host bytes: restored where it was saved, it would be a
    :class:`ckpt.transfers.Pending` until the load's transfers run, which no cast can take."""
    if meta["type"] in ("jax", "torch") and (abstract if isinstance(abstract, type) else type(abstract)) in (
            int, float, bool, str):
        return _cast_python(read(None), abstract)
    return _cast_python(_restore_as_saved(meta, read, to_device), abstract)


def _cast_python(value: Any, abstract: Any) -> Any:
    if abstract is None or abstract is PLACEHOLDER:
        return value
    target = abstract if isinstance(abstract, type) else type(abstract)
    if target in (int, float, bool):
        return _python_number(value, target)
    if issubclass(target, _NUMPY_NUMBERS):  # a numpy scalar type (np.int32) as the abstract leaf, as Orbax takes one
        return target(casts.cast(np.asarray(value), np.dtype(target))[()])
    if target is str:
        return str(value[()] if isinstance(value, np.ndarray) and value.ndim == 0 else value)
    if target is bytes and isinstance(value, (bytes, np.ndarray)):
        return bytes(value)
    return value


def _python_number(value: Any, target: type) -> int | float | bool:
    """``value`` (a saved Python number, or a numpy scalar or 0-d array) as the Python number type ``target``, cast
    as :func:`ckpt.casts.cast` casts arrays: rounded as numpy rounds (a float's fraction dropped into an int), but a
    value ``target`` cannot hold raises :class:`ckpt.casts.OutOfRangeError`: into a bool, a value outside 0 to 1
    (``3``, ``2.0``; ``0.5`` is True, as in a bool array), into an int, a NaN or infinity; an imaginary part; an int
    past a float's range. An int is exact of any size (a Python int, or one made of a finite float)."""
    if isinstance(value, int):  # (a Python int or bool: no numpy dtype holds every one)
        if target is bool and value not in (0, 1):
            raise casts.OutOfRangeError(f"its int value {value} does not fit bool (from 0 to 1)")
        try:
            return target(value)
        except OverflowError:
            raise casts.OutOfRangeError(f"its int value ({value.bit_length()} bits) does not fit float") from None
    array = np.asarray(value)
    if target is not int:
        return target(casts.cast(array, np.float64 if target is float else np.bool_)[()])
    if array.dtype.kind in "biu":
        return int(array[()])
    real = casts.cast(array, np.float64)  # (an imaginary part refused; bfloat16, float8 read as float64)
    if not np.isfinite(real):
        raise casts.OutOfRangeError(f"its {array.dtype} value {array[()].item()} does not fit int")
    return int(real[()])


def _restore_jax(meta: dict, read: Reader, abstract: Any, jax: Any, to_device: transfers.ToDevice) -> Any:
    sharding = None if isinstance(abstract, type) else shardings.on_devices(getattr(abstract, "sharding", None))
    if type(abstract) is jax.ShapeDtypeStruct and meta["type"] == "jax" and isinstance(abstract.dtype, np.dtype):
        dtype = abstract.dtype  # the usual leaf (eval_shape's), a few checks fewer
    else:
        want_dtype = None if isinstance(abstract, type) else abstract.dtype
        is_key = meta["type"] == "jax_key" or (  # a key's dtype is a jax type, never a numpy dtype
            want_dtype is not None and not isinstance(want_dtype, np.dtype)
            and jax.dtypes.issubdtype(want_dtype, jax.dtypes.prng_key))
        if is_key:
            return _restore_keys(jax, meta, read, meta.get("impl") or _key_impl(abstract), sharding)
        dtype = parse_dtype(meta["dtype"]) if want_dtype is None else np.dtype(want_dtype)
    weak = not isinstance(abstract, type) and getattr(abstract, "weak_type", False)  # (a jax.Ref has none)
    if not weak and (sharding is None or (sharding.is_fully_addressable and sharding.is_fully_replicated)):
        return to_device.jax(casts.for_jax(read(None), dtype), sharding)
    if sharding is None:
        array = jax.device_put(casts.for_jax(read(None), dtype))
    else:
        array = _from_callback(jax, meta, sharding, lambda index: casts.for_jax(read(index), dtype), dtype)
    return _weakly_typed(array) if weak else array


def _from_callback(jax: Any, meta: dict, sharding: Any, read: Callable[[Any], Any], dtype: np.dtype) -> Any:
    """``jax.make_array_from_callback`` of a saved leaf (``meta``) for ``sharding``, given ``dtype`` where this
    process holds no device of it (jax cannot take it from a shard then; older jax, which the flax extra
    allows, has no such argument, and needs none elsewhere)."""
    if sharding.addressable_devices:
        return jax.make_array_from_callback(tuple(meta["shape"]), sharding, read)
    return jax.make_array_from_callback(tuple(meta["shape"]), sharding, read, dtype=dtype)


def _weakly_typed(array: Any) -> Any:
    """``array``, placed where it is, with the weak type jax gives a Python scalar (which takes the dtype of
    the arrays it meets: a bf16 array times it stays bf16). jax has no public way to make one."""
    import jax
    from jax._src.lax import lax

    # (a copy of saved values, not a computation: jax.debug_nans' checks, which would refuse a NaN, do not apply)
    with shardings.outside_context_mesh(jax), jax.debug_nans(False), jax.debug_infs(False):
        weak = lax._convert_element_type(array, weak_type=True)
    # (the conversion's result is in device memory: an array placed in host memory is put back there)
    return weak if weak.sharding == array.sharding else jax.device_put(weak, array.sharding)
