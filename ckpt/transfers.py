"""Transfers between devices and host memory: a load's (:class:`ToDevice`), and a snapshot's
(:class:`ToHost`).

A load reads each leaf into host memory of its own (aligned: jax on CPU adopts it without a copy).
``jax.device_put`` costs 50-200 us of Python per array, which at thousands of small leaves is most of
a load. :class:`ToDevice` calls jax's own per-array transfer instead (what ``jax.device_put`` ends in,
asynchronous), with each target's devices and each (shape, dtype)'s abstract value looked up once per
load: 8-12 us an array on CPU, nearly all of it inside jaxlib, which makes and later frees a buffer and
an array object for each. jax has no cheaper way to make many arrays: ``jax.device_put`` of a list
loops over them in Python (about 90 us each), and slicing one transferred buffer on the device
compiles for seconds per layout. Torch tensors bound for an accelerator are copied without
blocking, and the load synchronizes once, at the end. On CPU nothing is copied.
"""
from __future__ import annotations

import functools
import sys
import weakref
from typing import Any, Callable

import numpy as np

from ckpt import chunks

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
    :meth:`run`, which puts them with one ``jax.device_put`` of a list.

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
        self._arrays: list[np.ndarray] = []
        self._shardings: list[Any] = []
        self._torch_devices: set[Any] = set()

    def jax(self, array: np.ndarray, sharding: Any) -> Any:
        """A jax array of ``array`` with ``sharding`` (fully replicated over devices of this process, or
        None: the default device, uncommitted, as ``jax.device_put(array)`` makes it), or a
        :class:`Pending` that :meth:`run` replaces by one."""
        target = self._targets.get(sharding, _UNKNOWN)
        if target is _UNKNOWN:
            target = self._targets[sharding] = self._target(sharding)
        if target is None:
            self._arrays.append(array)
            self._shardings.append(sharding)
            return Pending(len(self._arrays) - 1)
        key = (array.shape, array.dtype)
        found = self._avals.get(key)
        if found is None:  # jax's dtype (without x64, float64 becomes float32) and abstract value
            dtype = sys.modules["jax"].dtypes.canonicalize_dtype(array.dtype)
            found = self._avals[key] = (dtype, self._put[1](array.shape, dtype), dtype != array.dtype)
        dtype, aval, cast = found
        return self._put[0](aval, target[0], [array.astype(dtype) if cast else array], target[1], sharding is not None)

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
        """``tensor`` (on the CPU) with ``like``'s dtype and device; a copy to an accelerator does not
        block (:meth:`run` waits for all of them at once)."""
        if like.device.type == "cuda":
            self._torch_devices.add(like.device)
        return tensor.to(device=like.device, dtype=like.dtype, non_blocking=True)

    def run(self) -> Callable[[list], list]:
        """Makes the jax arrays left for it and waits for the torch copies; returns what replaces each
        :class:`Pending` in a list of values by its array."""
        arrays: list[Any] = [None] * len(self._arrays)
        for given in (False, True):  # without a sharding, uncommitted, as jax.device_put(x) makes it
            indices = [i for i, sharding in enumerate(self._shardings) if (sharding is not None) == given]
            if indices:
                done = sys.modules["jax"].device_put([self._arrays[i] for i in indices],
                                                     [self._shardings[i] for i in indices] if given else None)
                for i, array in zip(indices, done):
                    arrays[i] = array
        for device in self._torch_devices:
            sys.modules["torch"].cuda.synchronize(device)
        self._arrays, self._shardings, self._torch_devices = [], [], set()
        if not arrays:
            return lambda values: values
        return lambda values: [arrays[v.index] if type(v) is Pending else v for v in values]


_UNKNOWN = object()


def _default_device(jax: Any) -> Any:
    device = jax.config.jax_default_device
    if device is None or isinstance(device, str):
        return jax.devices(device)[0]
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
    :meth:`wait` waits for.

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
        jax = sys.modules.get("jax")
        for i in device_leaves:
            if jax is not None and isinstance(values[i], jax.Array):
                values[i].copy_to_host_async()

    def copy(self, i: int, view: np.ndarray) -> np.ndarray:
        """Copies leaf ``i`` into ``view`` (its shape; cast to its dtype, which a storage dtype may
        make another than the leaf's); returns ``view``."""
        x = self.values[i]
        if type(x) is np.ndarray:
            return self._copy_array(view, x)
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
