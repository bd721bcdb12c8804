"""A jax ``NamedSharding`` as JSON in tree.json, and back, so that a load without an abstract tree puts
each array where it was (as Orbax does); an abstract leaf's sharding over an ``AbstractMesh`` put on
the devices of the caller's ``jax.set_mesh`` mesh (:func:`on_devices`); and a scope without that mesh
(:func:`outside_context_mesh`).

The JSON is ``{"mesh_shape": [2, 4], "axis_names": ["x", "y"], "axis_types": ["Explicit", "Explicit"],
"device_ids": [0, ..., 7], "spec": ["x", null, ["x", "y"]]}`` (``axis_types``, the mesh's
``jax.sharding.AxisType`` names, is absent from older steps: jax's default then), with ``"reduced": ["y"]``
for a spec whose ``reduced`` set names mesh axes. The mesh's axis types
are part of it because jax refuses to combine arrays whose meshes differ in them (``jax.make_mesh``
makes Explicit axes, ``Mesh(...)`` Auto ones). It is restored only when every device id is one of this
process's jax devices; otherwise (another topology, or a malformed entry) the array goes to the
default device, with a warning.

Example::

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    assert restore(describe(sharding), (8,)) == sharding
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from typing import Any, Sequence

import numpy as np


@functools.lru_cache(maxsize=256)
def describe(sharding: Any) -> dict | None:
    """The JSON of a ``NamedSharding`` (cached: one per sharding, not per leaf); None for any other sharding."""
    jax = sys.modules["jax"]
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh, spec = sharding.mesh, sharding.spec
    doc = {"mesh_shape": list(mesh.devices.shape), "axis_names": list(mesh.axis_names),
           "axis_types": [t.name for t in mesh.axis_types], "device_ids": [int(d.id) for d in mesh.devices.flat],
           "spec": [p if p is None or isinstance(p, str) else list(p) for p in getattr(spec, "partitions", spec)]}
    if getattr(spec, "reduced", None):  # (older jax has no reduced axes)
        doc["reduced"] = sorted(spec.reduced)
    return doc


def restore(doc: Any, shape: Sequence[int], *, warn: bool = True) -> Any:
    """The ``NamedSharding`` of :func:`describe`'s JSON for an array of ``shape``, or None (with a warning
    unless ``warn`` is False) when these devices cannot hold it, or it cannot shard such an array."""
    try:
        # (jax makes a sharding of another rank, or that does not divide the shape, and refuses it only when
        # the array is put on it)
        if len(doc["spec"]) > len(shape):
            raise ValueError(f"its spec has {len(doc['spec'])} entries, for an array of {len(shape)} dimensions")
        types = doc.get("axis_types")
        key = (tuple(doc["mesh_shape"]), tuple(doc["axis_names"]), None if types is None else tuple(types),
               tuple(doc["device_ids"]), tuple(p if p is None or isinstance(p, str) else tuple(p) for p in doc["spec"]),
               tuple(doc.get("reduced", ())))
        sharding = _build(key)
        sharding.shard_shape(tuple(shape))
        return sharding
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        if not warn:
            return None
        warnings.warn(f"ckpt: the saved sharding {doc!r} cannot be restored on these devices ({e}); "
                      "the array is put on the default device", stacklevel=3)
        return None


@functools.lru_cache(maxsize=256)
def _build(key: tuple) -> Any:
    jax = sys.modules["jax"]
    mesh_shape, axis_names, axis_types, device_ids, spec, reduced = key
    in_spec = [axis for p in spec if p is not None for axis in ((p,) if isinstance(p, str) else p)]
    for what, names in (("device id", device_ids), ("axis name", axis_names), ("mesh axis of the spec", in_spec)):
        if len(set(names)) != len(names):  # (jax takes such a mesh, and fails when an array is put on it)
            raise ValueError(f"a {what} is repeated")
    if not device_ids:
        raise ValueError("the mesh has no devices")
    by_id = {d.id: d for d in jax.devices()}
    missing = [i for i in device_ids if i not in by_id]
    if missing:
        raise ValueError(f"devices {missing[:8]} are not among this job's {len(by_id)} devices")
    devices = np.empty(len(device_ids), dtype=object)
    devices[:] = [by_id[i] for i in device_ids]
    types = None if axis_types is None else tuple(jax.sharding.AxisType[name] for name in axis_types)
    mesh = jax.sharding.Mesh(devices.reshape(mesh_shape), axis_names, axis_types=types)
    partition_spec = jax.sharding.PartitionSpec(*spec, reduced=frozenset(reduced)) if reduced else (
        jax.sharding.PartitionSpec(*spec))
    return jax.sharding.NamedSharding(mesh, partition_spec)


def on_devices(sharding: Any) -> Any:
    """The sharding an abstract leaf asks for, on devices: a ``NamedSharding`` over an ``AbstractMesh``
    (what ``jax.eval_shape`` and ``nnx.eval_shape`` give under ``jax.set_mesh``) becomes the same spec over
    the mesh of the caller's ``jax.set_mesh`` context, as Orbax resolves it; any other sharding (or None)
    is returned as it is.

    Raises:
      ValueError: no ``jax.set_mesh`` context holds a mesh of that abstract mesh's axes.
    """
    jax = sys.modules["jax"]
    abstract_mesh = getattr(jax.sharding, "AbstractMesh", None)  # (absent from older jax)
    if (abstract_mesh is None or not isinstance(sharding, jax.sharding.NamedSharding)
            or not isinstance(sharding.mesh, abstract_mesh)):
        return sharding
    mesh = context_mesh(jax)
    if mesh is None or mesh.abstract_mesh != sharding.mesh:
        found = "no mesh is set" if mesh is None else f"the mesh set is {mesh}"
        raise ValueError(f"its sharding is over the abstract mesh {sharding.mesh} and {found}: load inside "
                         "`with jax.set_mesh(mesh)` of the mesh the abstract tree was made under")
    return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


def outside_context_mesh(jax: Any) -> contextlib.AbstractContextManager:
    """A scope without the caller's ``jax.set_mesh`` mesh, for what a load computes on arrays it has placed
    (a weak type given, PRNG keys wrapped): under a mesh, jax refuses a computation on arrays placed
    elsewhere (another mesh's devices, one device), and moves one not yet placed onto that mesh."""
    set_mesh = getattr(jax, "set_mesh", None)  # (absent from older jax, whose get_mesh may be there: as before)
    return contextlib.nullcontext() if set_mesh is None or context_mesh(jax) is None else set_mesh(None)


def context_mesh(jax: Any) -> Any:
    """The concrete mesh of this thread's ``jax.set_mesh`` context, or None."""
    get_mesh = getattr(jax.sharding, "get_mesh", None)  # (absent from older jax)
    mesh = None if get_mesh is None else get_mesh()
    return None if mesh is None or mesh.empty else mesh
