"""Transfers between devices and host memory: a load's, done together once every leaf is read
(:class:`ToDevice`), and a snapshot's (:class:`ToHost`).

A load reads each leaf into host memory of its own (aligned: jax on CPU adopts it without a copy).
Handing each array to jax one ``jax.device_put`` at a time costs 50-200 us of Python per leaf, which
at thousands of small leaves is most of a load. :class:`ToDevice` collects them instead and puts them
in one pass through jax's batched transfer, one call per array, with each (shape, dtype)'s abstract
value built once. Torch tensors bound for an accelerator are copied without blocking, and the load
synchronizes once, at the end. On CPU nothing is copied.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Callable

import numpy as np

_PINNED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a page-locked buffer


class Pending:
    """Where a value goes in the results of :meth:`ToDevice.run`."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class ToDevice:
    """The device transfers of one load, run together by :meth:`run`.

    Example::

        to_device = ToDevice()
        values = [to_device.jax(np.ones(3, np.float32), None), 7]
        values = to_device.run()(values)                 # [a jax.Array, 7]
    """

    def __init__(self):
        self._arrays: list[np.ndarray] = []
        self._shardings: list[Any] = []
        self._torch_devices: set[Any] = set()

    def jax(self, array: np.ndarray, sharding: Any) -> Pending:
        """Where :meth:`run` puts a jax array of ``array`` with ``sharding``: fully replicated over
        devices of this process, or None (the default device, uncommitted, as ``jax.device_put(array)``)."""
        self._arrays.append(array)
        self._shardings.append(sharding)
        return Pending(len(self._arrays) - 1)

    def torch(self, tensor: Any, like: Any) -> Any:
        """``tensor`` (on the CPU) with ``like``'s dtype and device; a copy to an accelerator does not
        block (:meth:`run` waits for all of them at once)."""
        if like.device.type == "cuda":
            self._torch_devices.add(like.device)
        return tensor.to(device=like.device, dtype=like.dtype, non_blocking=True)

    def run(self) -> Callable[[list], list]:
        """Makes the jax arrays and waits for the torch copies; returns what replaces each
        :class:`Pending` in a list of values by its array."""
        arrays = device_put(self._arrays, self._shardings) if self._arrays else []
        for device in self._torch_devices:
            sys.modules["torch"].cuda.synchronize(device)
        self._arrays, self._shardings, self._torch_devices = [], [], set()
        return lambda values: [arrays[v.index] if type(v) is Pending else v for v in values]


def device_put(arrays: list[np.ndarray], shardings: list[Any], *, batched: bool = True) -> list[Any]:
    """``jax.device_put`` of each array with its sharding (fully replicated, or None for the default
    device): arrays bound for one device through jax's batched transfer when ``batched`` and this jax
    has it (about 10x less Python per array), the rest through one ``jax.device_put`` of a list."""
    jax = sys.modules["jax"]
    put = _batched_put() if batched else None
    default = _default_device(jax)
    default_sharding = jax.sharding.SingleDeviceSharding(default)
    out: list[Any] = [None] * len(arrays)
    rest: dict[bool, list[int]] = {False: [], True: []}  # by whether a sharding was given
    avals: dict[tuple, Any] = {}
    targets: dict[Any, tuple[Any, list[Any]]] = {None: (default_sharding, [default])}  # sharding -> its devices
    for i, (array, sharding) in enumerate(zip(arrays, shardings)):
        target = targets.get(sharding)
        if target is None:
            target = targets[sharding] = (sharding, list(sharding.device_set))
        if put is None or len(target[1]) != 1:
            rest[sharding is not None].append(i)
            continue
        key = (array.shape, array.dtype)
        found = avals.get(key)
        if found is None:  # jax's dtype (without x64, float64 becomes float32) and abstract value
            dtype = jax.dtypes.canonicalize_dtype(array.dtype)
            found = avals[key] = (dtype, put[1](array.shape, dtype), dtype != array.dtype)
        dtype, aval, cast = found
        out[i] = put[0](aval, target[0], [array.astype(dtype) if cast else array], target[1], sharding is not None)
    for given, indices in rest.items():  # without a sharding, uncommitted, as jax.device_put(x) makes it
        if not indices:
            continue
        done = jax.device_put([arrays[i] for i in indices], [shardings[i] for i in indices] if given else None)
        for i, array in zip(indices, done):
            out[i] = array
    return out


def _default_device(jax: Any) -> Any:
    device = jax.config.jax_default_device
    if device is None or isinstance(device, str):
        return jax.devices(device)[0]
    return device


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
    and :meth:`wait` synchronizes once. CPU tensors and arrays are plain copies.

    Example::

        values = [np.arange(3.0)]
        to_host = ToHost(values, device_leaves=[])
        view = to_host.copy(0, np.empty(3))
        to_host.wait()
    """

    def __init__(self, values: list[Any], device_leaves: list[int]):
        self.values = values
        self._streams: dict[Any, Any] = {}
        jax = sys.modules.get("jax")
        for i in device_leaves:
            if jax is not None and isinstance(values[i], jax.Array):
                values[i].copy_to_host_async()

    def copy(self, i: int, view: np.ndarray) -> np.ndarray:
        """Copies leaf ``i`` into ``view`` (its shape; cast to its dtype, which a storage dtype may
        make another than the leaf's); returns ``view``."""
        x = self.values[i]
        if type(x) is np.ndarray:
            np.copyto(view, x, casting="unsafe")
            return view
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            from ckpt.leaves import numpy_to_torch

            if x.device.type == "cuda":
                with torch.cuda.stream(self._stream(x.device)):
                    numpy_to_torch(view).copy_(x.detach(), non_blocking=True)
            else:
                numpy_to_torch(view).copy_(x.detach())
            return view
        np.copyto(view, np.frombuffer(x, np.uint8) if type(x) is bytes else np.asarray(x), casting="unsafe")
        return view

    def _stream(self, device: Any) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            torch = sys.modules["torch"]
            stream = self._streams[device] = _side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the work that made the values
        return stream

    def wait(self) -> None:
        """Waits for the copies from accelerators (one synchronization per device)."""
        for stream in self._streams.values():
            stream.synchronize()


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
