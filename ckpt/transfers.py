"""Host-to-device transfers of a load, done together once every leaf is read.

A load reads each leaf into host memory of its own (aligned: jax on CPU adopts it without a copy).
Handing each array to jax one ``jax.device_put`` at a time costs 50-200 us of Python per leaf, which
at thousands of small leaves is most of a load. :class:`ToDevice` collects them instead and puts them
in one pass through jax's batched transfer, one call per array, with each (shape, dtype)'s abstract
value built once. Torch tensors bound for an accelerator are copied without blocking, and the load
synchronizes once, at the end. On CPU nothing is copied.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np


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
    for i, (array, sharding) in enumerate(zip(arrays, shardings)):
        devices = [default] if sharding is None else list(sharding.device_set)
        if put is None or len(devices) != 1:
            rest[sharding is not None].append(i)
            continue
        key = (array.shape, array.dtype)
        found = avals.get(key)
        if found is None:  # jax's dtype (without x64, float64 becomes float32) and abstract value
            dtype = jax.dtypes.canonicalize_dtype(array.dtype)
            found = avals[key] = (dtype, put[1](array.shape, dtype))
        dtype, aval = found
        if dtype != array.dtype:
            array = array.astype(dtype)
        out[i] = put[0](aval, sharding or default_sharding, [array], devices, sharding is not None)
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
