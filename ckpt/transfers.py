"""Transfers between devices and host memory: a load's (:class:`ToDevice`), and a snapshot's
(:class:`ToHost`).

A load reads each leaf into host memory of its own (aligned: jax on CPU adopts it without a copy).
``jax.device_put`` costs 50-200 us of Python per array, which at thousands of small leaves is most of
a load. :class:`ToDevice` calls jax's own per-array transfer instead (what ``jax.device_put`` ends in,
asynchronous), with each target's devices and each (shape, dtype)'s abstract value looked up once per
load: 8-12 us an array on CPU, nearly all of it inside jaxlib, which makes and later frees a buffer and
an array object for each. jax has no cheaper way to make many arrays: ``jax.device_put`` of a list
loops over them in Python (about 90 us each), and slicing one transferred buffer on the device
compiles for seconds per layout. Torch tensors bound for a CUDA device go over together when small
(one host buffer, one transfer, one batched copy), and each large one on a thread of its own while
the next leaves are read; the load synchronizes once, at the end. On CPU nothing is copied.

A snapshot copies small torch tensors of one device together too (:class:`TorchRun`), and large ones
with non-blocking copies on a side stream into page-locked buffers (:class:`ToHost`). A large jax array
sharded over CPU devices is copied from its shards a chunk of rows at a time (:class:`DeviceRows`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import operator
import os
import sys
import weakref
from typing import Any, Callable, TypeVar

import numpy as np

from ckpt import casts, chunks, dtensor, host_memory, packing, shardings, storage
from ckpt import format as fmt

T = TypeVar("T")

_PINNED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a page-locked buffer


class Pending:
    """Where a value goes in the results of :meth:`ToDevice.run`."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class ToDevice:
    """The device transfers of one load. A jax array bound for one device is made at once, through
    jax's own per-array transfer (:meth:`jax`; asynchronous, and on CPU it adopts an aligned host
    array without a copy), with each target's devices and each (shape, dtype)'s abstract value looked
    up once per load; the others (several devices, or a jax without that transfer) wait for
    :meth:`run`, which puts them with one ``jax.device_put`` of a list. Torch tensors bound for a CUDA
    device wait for :meth:`run` too: small ones go over together (:func:`_put_together`), and a large
    one is copied on a thread of its own as soon as it is read, while the next leaves are read (from
    pageable memory, a transfer blocks the thread that asks for it).

    Example::

        to_device = ToDevice()
        values = [to_device.jax(np.ones(3, np.float32), None), 7]
        values = to_device.run()(values)                 # [a jax.Array, 7]
    """

    def __init__(self, *, batched: bool = True):
        self._batched = batched
        self._put: tuple[Callable, Callable] | None = None  # jax's per-array transfer, from the first jax array on
        self._targets: dict[Any, tuple[Any, list[Any]] | None] = {}  # sharding -> (sharding, [its device]) or None
        self._avals: dict[tuple, tuple[Any, Any, bool]] = {}  # (shape, dtype) -> (jax's dtype, aval, cast)
        self._forget_pending()

    def _forget_pending(self) -> None:
        self._slots = 0  # the Pending values handed out
        self._arrays: list[np.ndarray] = []  # the jax arrays left for run(), their shardings and slots
        self._shardings: list[Any] = []
        self._array_slots: list[int] = []
        self._small: list[tuple[int, Any, Any]] = []  # (slot, host tensor, like) of small tensors for CUDA
        self._aside: list[tuple[int, concurrent.futures.Future]] = []  # (slot, the copy) of large ones
        self._torch_devices: set[Any] = set()
        self._templates: list[tuple[int, Any]] = []  # (slot, like) of tensors made as a Parameter, or needing grads

    def _pending(self) -> Pending:
        self._slots += 1
        return Pending(self._slots - 1)

    def jax(self, array: np.ndarray, sharding: Any) -> Any:
        """A jax array of ``array`` with ``sharding`` (fully replicated over devices of this process, or
        None: the default device, uncommitted, as ``jax.device_put(array)`` makes it), or a
        :class:`Pending` that :meth:`run` replaces by one."""
        target = self._targets.get(sharding, _UNKNOWN)
        if target is _UNKNOWN:
            target = self._targets[sharding] = self._target(sharding)
        if target is None:
            self._arrays.append(casts.for_jax(array))
            self._shardings.append(sharding)
            pending = self._pending()
            self._array_slots.append(pending.index)
            return pending
        key = (array.shape, array.dtype)
        found = self._avals.get(key)
        if found is None:  # jax's dtype (without x64, float64 becomes float32) and abstract value
            dtype = sys.modules["jax"].dtypes.canonicalize_dtype(array.dtype)
            found = self._avals[key] = (dtype, self._put[1](array.shape, dtype), dtype != array.dtype)
        dtype, aval, cast = found
        return self._put[0](aval, target[0], [casts.for_jax(array) if cast else array], target[1], sharding is not None)

    def _target(self, sharding: Any) -> tuple[Any, list[Any]] | None:
        """What jax's per-array transfer takes for ``sharding`` (None: the default device's), or None
        where it cannot (several devices, or no such transfer in this jax)."""
        self._put = _batched_put() if self._batched else None
        if self._put is None:
            return None
        jax = sys.modules["jax"]
        if sharding is None:
            device = _default_device(jax)
            return jax.sharding.SingleDeviceSharding(device), [device]
        devices = list(sharding.device_set)
        return (sharding, devices) if len(devices) == 1 else None

    def torch(self, tensor: Any, like: Any) -> Any:
        """``tensor`` (on the CPU) with ``like``'s dtype and device, made as ``like`` is (see
        :func:`as_template`): on a CUDA device, a :class:`Pending` that :meth:`run` replaces by it. A ``like``
        on the meta device asks only for a shape and dtype: the tensor stays on the CPU."""
        if like.device.type not in TORCH_BATCHED_DEVICES:
            device = None if like.device.type == "meta" else like.device
            return as_template(tensor.to(device=device, dtype=like.dtype, non_blocking=True), like)
        pending = self._pending()
        self._torch_devices.add(like.device)
        if _made_as_template(like):
            self._templates.append((pending.index, like))
        if tensor.nbytes < TORCH_ASIDE_BYTES:
            self._small.append((pending.index, tensor, like))
        else:
            self._aside.append((pending.index, _transfer_thread().submit(
                tensor.to, device=like.device, dtype=like.dtype, non_blocking=True)))
        return pending

    def run(self) -> Callable[[list], list]:
        """Makes the jax arrays and torch tensors left for it; returns what replaces each
        :class:`Pending` in a list of values by its array."""
        made: list[Any] = [None] * self._slots
        for given in (False, True):  # without a sharding, uncommitted, as jax.device_put(x) makes it
            indices = [k for k, sharding in enumerate(self._shardings) if (sharding is not None) == given]
            if indices:
                done = sys.modules["jax"].device_put([self._arrays[k] for k in indices],
                                                     [self._shardings[k] for k in indices] if given else None)
                for k, array in zip(indices, done):
                    made[self._array_slots[k]] = array
        if self._small:
            slots, tensors, likes = zip(*self._small)
            for slot, tensor in zip(slots, _put_together(list(tensors), list(likes))):
                made[slot] = tensor
        for slot, copy in self._aside:
            made[slot] = copy.result()
        for device in self._torch_devices:
            if device.type == "cuda":
                sys.modules["torch"].cuda.synchronize(device)
        for slot, like in self._templates:
            made[slot] = as_template(made[slot], like)
        slots = self._slots
        self._forget_pending()
        if not slots:
            return lambda values: values
        return lambda values: [made[v.index] if type(v) is Pending else v for v in values]


def as_template(tensor: Any, like: Any) -> Any:
    """``tensor`` (contiguous) as the template ``like`` holds its values: laid out with ``like``'s strides where
    those are not the default (``channels_last``, a transposed tensor), as DCP, which loads into the template,
    keeps them; an ``nn.Parameter`` for a Parameter, as ``torch.load`` gives one back (a module's attribute takes
    nothing else), and requiring gradients where ``like`` does; else ``tensor`` itself."""
    if not _made_as_template(like):
        return tensor
    torch = sys.modules["torch"]
    if _strided_otherwise(like):
        tensor = torch.empty_like(like, dtype=tensor.dtype, device=tensor.device).copy_(tensor)
    if isinstance(like, torch.nn.Parameter):
        return torch.nn.Parameter(tensor, requires_grad=like.requires_grad)
    return tensor.requires_grad_() if like.requires_grad else tensor


def tie_as_templates(templates: list[Any], made: list[Any]) -> None:
    """Makes the loaded tensors of ``made`` (one per abstract leaf of ``templates``, in place) one tensor again
    where their templates are one view of one storage (the same storage, offset, shape, strides and dtype; of a
    DTensor, its local shard and layout): a module's tied weights (an embedding and the LM head), which
    ``state_dict()`` gives at two keys sharing their storage, come back tied, as ``torch.load`` keeps tensors
    that shared storage, and as a load into the template's own tensors would leave them. Only where the values
    loaded at those keys are the same bits: a checkpoint of an untied model, whose two keys hold other values,
    comes back as saved, untied (one tensor cannot hold both); of three keys saved ``a != b == c``, ``b`` and
    ``c`` come back as one tensor, ``a`` apart. A DTensor split over ranks comes back untied: each rank holds only
    its own shard, so the ranks could tell its keys' values alike or not differently and return different tensors.
    About 0.3 us a tensor where none share storage."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    # a storage as torch names it (its StorageImpl's address); torch.save's storage._cdata costs ~50 us a tensor
    storage_id = getattr(torch._C, "_storage_id", None) or (lambda t: t.untyped_storage()._cdata)
    tensor, plain, first, again = torch.Tensor, (torch.Tensor, torch.nn.Parameter), {}, []
    for j, like in enumerate(templates):
        if isinstance(like, tensor):
            try:
                if type(like) in plain or not dtensor.is_dtensor(like):
                    storage = storage_id(like)
                elif dtensor.held_whole(like):
                    storage = storage_id(like.to_local())
                else:  # (split over ranks: this rank sees its own rows only)
                    continue
            except (RuntimeError, NotImplementedError, TypeError):  # (a wrapper subclass: no storage)
                continue
            if first.setdefault(storage, j) != j:
                again.append((storage, j))
    alike: dict[tuple, list[int]] = {}  # (a storage held at several keys: its keys by the view of it they hold)
    for storage, j in again:
        i = first.pop(storage, None)  # (the storage's first key, with its second)
        for k in (j,) if i is None else (i, j):
            if isinstance(made[k], tensor):
                alike.setdefault((storage, _view_of(templates[k])), []).append(k)
    for keys in alike.values():  # each key tied to the first of them with the same bits
        for j, i in zip(keys, _first_alike([made[k] for k in keys])):
            made[j] = made[keys[i]]


def _view_of(like: Any) -> tuple:
    """What tells the view of its storage that the template tensor ``like`` is (of a DTensor, with its layout), and
    what :func:`as_template` makes of it (a Parameter or not, requiring gradients or not): a Parameter and its
    ``detach()`` share a storage, but one tensor cannot come back as both."""
    is_dtensor = dtensor.is_dtensor(like)
    local = like.to_local() if is_dtensor else like
    layout = (tuple(like.shape), like.placements, like.device_mesh) if is_dtensor else ()
    made_as = (isinstance(like, sys.modules["torch"].nn.Parameter), like.requires_grad)
    return local.storage_offset(), tuple(local.shape), local.stride(), local.dtype, local.device, layout, made_as


def _first_alike(tensors: list[Any]) -> list[int]:
    """For each of ``tensors`` (or DTensors' local shards), the index of the first of them holding the same bits:
    each compared with the distinct values found before it where they are few, else all grouped by one
    ``torch.unique`` of their bytes, so that a template tensor reused at many keys whose saved values all differ
    costs no comparison of every pair."""
    torch = sys.modules["torch"]
    local = [t.to_local() if dtensor.is_dtensor(t) else t for t in tensors]
    if len(local) > _FEW_ALIKE and len({(t.dtype, t.shape, t.device) for t in local}) == 1:
        try:
            rows = torch.stack([t.detach().reshape(-1).view(torch.uint8) for t in local])
            inverse = torch.unique(rows, dim=0, return_inverse=True)[1].tolist()
        except RuntimeError:  # (a dtype without a byte view, no bytes at all: compared below)
            pass
        else:
            first: dict[int, int] = {}
            return [first.setdefault(value, k) for k, value in enumerate(inverse)]
    distinct: list[int] = []
    out = []
    for k, t in enumerate(local):
        i = next((i for i in distinct if _same_bits(local[i], t)), None)
        out.append(k if i is None else i)
        if i is None:
            distinct.append(k)
    return out


_FEW_ALIKE = 8  # keys of one template tensor compared value by value; more are grouped by torch.unique


def _same_bits(a: Any, b: Any) -> bool:
    """Whether the tensors (or DTensors' local shards) ``a`` and ``b`` hold the same bits (NaNs alike)."""
    torch = sys.modules["torch"]
    a, b = (x.to_local() if dtensor.is_dtensor(x) else x for x in (a, b))
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    try:
        return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
    except RuntimeError:  # (a dtype without a byte view)
        return False


def _made_as_template(like: Any) -> bool:
    """Whether :func:`as_template` gives more than the tensor itself for the template ``like`` (the one place
    that decides it: a load on a CUDA device leaves to its end only the tensors it changes)."""
    return like.requires_grad or isinstance(like, sys.modules["torch"].nn.Parameter) or _strided_otherwise(like)


def _strided_otherwise(like: Any) -> bool:
    """Whether the template ``like`` (not a DTensor, whose local shard its own load lays out) has strides other
    than a contiguous tensor's."""
    return like.layout is sys.modules["torch"].strided and not like.is_contiguous() and not dtensor.is_dtensor(like)


TORCH_BATCHED_DEVICES = ("cuda",)  # the devices whose tensors wait for run(); from the CPU, on the CPU, no copy
TORCH_ASIDE_BYTES = 1 << 20  # a torch tensor of this size or more goes to its CUDA device on a thread of its own


def _put_together(tensors: list[Any], likes: list[Any]) -> list[Any]:
    """``tensors`` (small, on the CPU) with the dtypes and CUDA devices of ``likes``, in a few operations
    per device instead of a transfer each: their bytes gathered into one host buffer, one transfer, and
    one ``torch._foreach_copy_`` from their places there into new tensors (which casts)."""
    torch = sys.modules["torch"]
    made: list[Any] = [None] * len(tensors)
    by_device: dict[Any, list[int]] = {}
    for k, like in enumerate(likes):
        by_device.setdefault(like.device, []).append(k)
    for device, ks in by_device.items():
        sizes = [tensors[k].nbytes for k in ks]
        ends = np.cumsum(packing.slot(np.array(sizes, np.int64))).tolist()  # aligned: any dtype views its place
        starts = [0] + ends[:-1]
        host = torch.from_numpy(host_memory.empty(ends[-1]))
        with torch.no_grad():
            torch._foreach_copy_([host[a: a + n] for a, n in zip(starts, sizes)],
                                 [tensors[k].reshape(-1).view(torch.uint8) for k in ks])
            moved = host.to(device, non_blocking=True)
            sources = _typed_views(moved, [(a, n, tensors[k].dtype, tensors[k].shape)
                                           for k, a, n in zip(ks, starts, sizes)])
            targets = [torch.empty(likes[k].shape, dtype=likes[k].dtype, device=device) for k in ks]
            torch._foreach_copy_(targets, sources)
        for k, target in zip(ks, targets):
            made[k] = target
    return made


def _typed_views(raw: Any, places: list[tuple[int, int, Any, Any]]) -> list[Any]:
    """Views of a uint8 tensor's bytes ``[start, start + nbytes)`` as (torch dtype, shape), for each
    place; each start a multiple of its dtype's size."""
    return [raw[start: start + nbytes].view(dtype).view(shape) for start, nbytes, dtype, shape in places]


@functools.cache
def _transfer_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that copies large tensors to CUDA devices during loads (made once per process)."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-to-device")


os.register_at_fork(after_in_child=_transfer_thread.cache_clear)  # (a forked child has none of its parent's threads)


_UNKNOWN = object()


def with_callers_placement(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn``, to run in another thread where jax places arrays as it does in this one: under this thread's
    ``jax.default_device``, ``jax.set_mesh`` mesh and 64-bit types (``with jax.enable_x64(True)``: a new
    thread has none of them), so that a load in the background puts its arrays where the same load here
    would, of the same dtypes."""
    jax = sys.modules.get("jax")
    if jax is None:
        return fn
    device, mesh, x64 = jax.config.jax_default_device, shardings.context_mesh(jax), jax.config.jax_enable_x64

    def run() -> T:
        with contextlib.ExitStack() as placement:
            if device is not None:
                placement.enter_context(jax.default_device(device))
            if mesh is not None:
                placement.enter_context(jax.set_mesh(mesh))
            if jax.config.jax_enable_x64 != x64:  # (a with-block's setting holds in its own thread alone)
                enable_x64 = getattr(jax, "enable_x64", None)
                if enable_x64 is None:  # (older jax)
                    from jax.experimental import enable_x64
                placement.enter_context(enable_x64(x64))
            return fn()

    return run


def explicit() -> contextlib.AbstractContextManager:
    """A scope in which jax counts this thread's transfers to devices as explicit ones, as it counts
    ``jax.device_put``'s: a load is one (:class:`ToDevice` calls jax's per-array transfer itself), which
    ``jax.transfer_guard("disallow")`` lets through, as it lets Orbax's, and ``"disallow_explicit"`` stops."""
    jax_config = sys.modules.get("jax._src.config")
    scope = getattr(jax_config, "explicit_device_put_scope", None)  # (absent from older jax)
    return contextlib.nullcontext() if scope is None else scope()


def _default_device(jax: Any) -> Any:
    """Where jax puts an array it is given no place for: the configured default device, else this
    process's first one (as jax does: ``jax.devices()[0]`` is process 0's in a multi-process job)."""
    device = jax.config.jax_default_device
    if device is None or isinstance(device, str):
        return jax.local_devices(backend=device)[0]
    return device


@functools.cache
def _batched_put() -> tuple[Callable, Callable] | None:
    """jax's own per-array transfer (what ``jax.device_put`` calls for each array after its Python
    checks) and its abstract-value type, or None where this jax version lacks them."""
    try:
        from jax._src.core import ShapedArray
        from jax._src.lib import xla_client
    except ImportError:
        return None
    put = getattr(xla_client, "batched_device_put", None)
    return None if put is None else (put, ShapedArray)


class ToHost:
    """The copies of a snapshot's leaves into host buffers. Transfers from jax devices all start
    first (``copy_to_host_async``), and each array is copied as it lands; torch tensors on an
    accelerator are copied without blocking, on a side stream per device, into page-locked buffers,
    and :meth:`wait` synchronizes once. CPU tensors and arrays are plain copies; a numpy (or jax on
    the host) array of ``ASIDE_COPY_BYTES`` or more is copied on the reading threads, large ones in
    parts (the caller blocks anyway, and one core's copy leaves the memory bus half idle), which
    :meth:`wait` waits for; a jax array sharded over CPU devices is copied so from its shards
    (:class:`DeviceRows`), never gathered.

    Example::

        values = [np.arange(3.0)]
        to_host = ToHost(values, device_leaves=[])
        view = to_host.copy(0, np.empty(3))
        to_host.wait()
    """

    def __init__(self, values: list[Any], device_leaves: list[int]):
        self.values = values
        self._streams: dict[Any, Any] = {}
        self._aside: list[Any] = []  # the futures of the copies on the reading threads
        self._rows: dict[int, DeviceRows] = {}  # the leaves copied from their shards (no gathered copy)
        jax = sys.modules.get("jax")
        for i in device_leaves:
            if jax is not None and isinstance(values[i], jax.Array):
                rows = device_rows(values[i])
                if rows is None:
                    values[i].copy_to_host_async()
                else:
                    self._rows[i] = rows

    def copy(self, i: int, view: np.ndarray) -> np.ndarray:
        """Copies leaf ``i`` into ``view`` (its shape; cast to its dtype, which a storage dtype may
        make another than the leaf's); returns ``view``."""
        x = self.values[i]
        if type(x) is np.ndarray:
            return self._copy_array(view, x)
        if i in self._rows:
            return self._copy_rows(view, self._rows[i])
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            from ckpt.leaves import numpy_to_torch

            if x.device.type == "cuda":
                with torch.cuda.stream(self._stream(x.device)):
                    numpy_to_torch(view).copy_(x.detach(), non_blocking=True)
            else:
                numpy_to_torch(view).copy_(x.detach())
            return view
        return self._copy_array(view, np.frombuffer(x, np.uint8) if type(x) is bytes else np.asarray(x))

    def _copy_array(self, view: np.ndarray, x: np.ndarray) -> np.ndarray:
        if x.nbytes >= ASIDE_COPY_BYTES:
            self._aside.extend(_copy_aside(view, x))
        else:
            np.copyto(view, x, casting="unsafe")
        return view

    def _copy_rows(self, view: np.ndarray, rows: DeviceRows) -> np.ndarray:
        """Copies a sharded leaf from its shards on the reading threads, in one part of rows per thread but one."""
        threads, count = chunks.pool()
        step = -(-rows.shape[0] // max(1, min(count - 1, rows.nbytes // (4 << 20))))
        self._aside.extend(threads.submit(rows.copy_rows, view[start: start + step], start)
                           for start in range(0, rows.shape[0], step))
        return view

    def copy_run(self, run: TorchRun, target: Any) -> None:
        """Copies the leaves of ``run`` into ``target`` (``run.target(buffer)``; see :class:`TorchRun`)."""
        torch = sys.modules["torch"]
        sources = [self.values[i] for i in run.indices]
        with torch.no_grad():
            if run.mirror is None:
                torch._foreach_copy_(target, sources)
                return
            with torch.cuda.stream(self._stream(run.device)):
                torch._foreach_copy_(run.views, sources)
                target.copy_(run.mirror, non_blocking=True)

    def _stream(self, device: Any) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            torch = sys.modules["torch"]
            stream = self._streams[device] = _side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the work that made the values
        return stream

    def wait(self) -> None:
        """Waits for the copies on the reading threads and those from accelerators (one synchronization
        per device)."""
        aside, self._aside = self._aside, []
        for copy in aside:
            copy.result()
        for stream in self._streams.values():
            stream.synchronize()


ASIDE_COPY_BYTES = 1 << 20


class DeviceRows:
    """A large jax array sharded over several CPU devices, whose host copy would be a gather, kept as
    its shards: a save copies it to host memory a chunk of rows at a time (:meth:`copy_rows`), so that a
    sync save holds one chunk of it, never the whole array. It has the array's ``shape``, ``dtype``,
    ``ndim`` and ``nbytes``; ``np.asarray`` gives it whole.

    Example::

        rows = DeviceRows(x)                      # x: a (1024, 512) jax array over a (4, 2) mesh
        part = np.empty((256, 512), rows.dtype)
        rows.copy_rows(part, 512)                 # rows 512 to 767
    """

    def __init__(self, x: Any):
        self.array, self.shape, self.ndim, self.nbytes = x, x.shape, x.ndim, x.nbytes
        self.dtype = np.dtype(x.dtype)
        self._shards = [(s.index, s.data) for s in x.addressable_shards if s.replica_id == 0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.array, dtype)

    def copy_rows(self, out: np.ndarray, start: int) -> np.ndarray:
        """Copies rows ``start`` to ``start + len(out)`` into ``out`` (that shape, this dtype) from the
        shards that hold them (each a view of its buffer in host memory); returns ``out``."""
        stop = start + out.shape[0]
        for index, data in self._shards:
            first, last, _ = index[0].indices(self.shape[0])
            low, high = max(start, first), min(stop, last)
            if low < high:
                out[(slice(low - start, high - start), *index[1:])] = np.asarray(data)[low - first: high - first]
        return out


def device_rows(x: Any) -> DeviceRows | None:
    """``x`` (a fully addressable jax array) as :class:`DeviceRows` when it is large (an array of its own
    on disk, stored as its dtype) and split over several CPU devices; else None. (On an accelerator a
    chunk's copy would be a slice on the device, compiled for each shape: a leaf there is copied whole.)"""
    if x.ndim == 0 or x.nbytes < fmt.SMALL_LEAF_BYTES or not storage.zarr_stores(np.dtype(x.dtype)):
        return None
    devices = x.sharding.device_set
    if len(devices) == 1 or x.sharding.is_fully_replicated or any(device.platform != "cpu" for device in devices):
        return None
    return DeviceRows(x)


def _copy_aside(target: np.ndarray, source: np.ndarray) -> list[Any]:
    """Starts the copy of ``source`` into ``target`` (cast as astype casts) on the reading threads: whole,
    or in one part per thread but one when it is contiguous and each part gets 4 MiB or more; returns
    the futures."""
    threads, count = chunks.pool()
    parts = min(count - 1, source.nbytes // (4 << 20)) if source.flags.c_contiguous else 1
    if parts < 2:
        return [threads.submit(np.copyto, target, source, casting="unsafe")]
    target, source = target.reshape(-1), source.reshape(-1)
    step = -(-source.size // parts)
    return [threads.submit(np.copyto, target[a: a + step], source[a: a + step], casting="unsafe")
            for a in range(0, source.size, step)]


class TorchRun:
    """Packed torch leaves of one device, next to each other in the packed buffer, that a snapshot
    copies with one ``torch._foreach_copy_`` instead of one ``copy_`` each (Python's cost per leaf is
    most of a small leaf's). From the CPU, straight into their places in the packed buffer; from a CUDA
    device, in two operations instead of one transfer per leaf: the batched copy (a few kernels) into
    ``mirror``, a buffer on the device laid out as their span of the packed buffer (zeroed once and kept
    with the layout, so the padding between them stays zero), then one transfer of the whole span.
    ``leaves`` are (index, offset, nbytes, torch dtype, shape), in offset order.

    Example::

        run = TorchRun([(0, 0, 4, torch.float32, ()), (1, 64, 8, torch.int64, (1,))], torch.device("cpu"))
        to_host.copy_run(run, run.target(packed_buffer))
    """

    def __init__(self, leaves: list[tuple[int, int, int, Any, tuple]], device: Any):
        torch = sys.modules["torch"]
        self.device = device
        self.indices = [i for i, *_ in leaves]
        self.start, self.stop = leaves[0][1], leaves[-1][1] + leaves[-1][2]
        self._leaves = leaves
        self.mirror = None
        if device.type == "cuda":
            self.mirror = torch.zeros(self.stop - self.start, dtype=torch.uint8, device=device)
            self.views = self._views(self.mirror)

    def target(self, buffer: np.ndarray) -> Any:
        """What :meth:`ToHost.copy_run` copies into in the packed buffer ``buffer``: the run's span, or
        from the CPU, each leaf's place there."""
        from ckpt.leaves import numpy_to_torch

        span = numpy_to_torch(buffer[self.start: self.stop])
        return span if self.mirror is not None else self._views(span)

    def _views(self, span: Any) -> list[Any]:
        return _typed_views(span, [(offset - self.start, nbytes, dtype, shape)
                                   for _, offset, nbytes, dtype, shape in self._leaves])


TORCH_RUNS_DEVICE_BYTES = 64 << 20  # the device memory a layout's TorchRuns may take in all


def torch_runs(packed: list[tuple[int, int, int]], signature: dict[int, Any], dtypes: list[str]) -> list[TorchRun]:
    """The :class:`TorchRun` of each stretch of adjacent packed leaves (``packed``: (index, offset,
    nbytes) in offset order) that are torch tensors of one device, the CPU or a CUDA device
    (``signature[i]``: type, shape, dtype, device), stored as they are (``dtypes[i]``: the stored
    dtype's name) and not complex. Of those on CUDA devices, the smallest, while their places take
    :data:`TORCH_RUNS_DEVICE_BYTES` in all (a leaf's cost is the same at any size: the most leaves
    for the memory). The other leaves are copied one by one."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    chosen = {}  # index -> (device, torch dtype, shape)
    for i, _, nbytes in packed:
        found = signature.get(i)
        if (type(found) is tuple and found[0] is torch.Tensor and found[3].type in ("cpu", "cuda")
                and not found[2].is_complex and str(found[2]).removeprefix("torch.") == dtypes[i]):
            chosen[i] = (found[3], found[2], tuple(found[1]))
    room = TORCH_RUNS_DEVICE_BYTES
    for i, nbytes in sorted(((i, n) for i, _, n in packed if i in chosen and chosen[i][0].type == "cuda"),
                            key=operator.itemgetter(1)):
        if packing.slot(nbytes) > room:
            del chosen[i]
        else:
            room -= packing.slot(nbytes)
    stretches: list[list[tuple[int, int, int, Any, tuple]]] = []
    devices: list[Any] = []
    joined = False  # whether the leaf before joined the last stretch
    for i, offset, nbytes in packed:
        if i not in chosen:
            joined = False
            continue
        device, dtype, shape = chosen[i]
        if not joined or device != devices[-1]:
            stretches.append([])
            devices.append(device)
        stretches[-1].append((i, offset, nbytes, dtype, shape))
        joined = True
    return [TorchRun(leaves, device) for leaves, device in zip(stretches, devices)]


_SIDE_STREAMS: dict[Any, Any] = {}


def _side_stream(device: Any) -> Any:
    """A CUDA stream of ``device`` for snapshot copies, made once per process and device."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = sys.modules["torch"].cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def pinned_zeros(nbytes: int) -> np.ndarray:
    """A new uint8 buffer of ``nbytes`` zeros in page-locked memory (torch's), for copies from CUDA."""
    torch = sys.modules["torch"]
    buffer = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    _PINNED[id(buffer)] = buffer
    return buffer


def is_pinned(buffer: np.ndarray) -> bool:
    """Whether ``buffer`` came from :func:`pinned_zeros`."""
    return _PINNED.get(id(buffer)) is buffer
