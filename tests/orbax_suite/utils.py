"""Small local equivalents of the Orbax test utilities that Orbax's v1 tests import (see port.IMPORTS).

Each namespace below stands for one Orbax module and holds only what the ported tests use, written
for ckpt: the same trees (8 CPU devices, the same meshes and values), the same equality (dtype, type,
shard count and every shard's data), the same toy checkpointables and handlers.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import types
from typing import Any, Generic, TypeVar

import jax
import numpy as np
from etils import epath

from ckpt import LeafMetadata


T = TypeVar("T")


# ----------------------------------------------------------------------------- test_utils
def assert_array_equal(testclass, expected, actual) -> None:
    """Equal dtype and type; for a jax array, the same number of shards, each with the same data."""
    if hasattr(expected, "dtype"):
        testclass.assertEqual(expected.dtype, actual.dtype)
    testclass.assertIsInstance(actual, type(expected))
    if isinstance(expected, jax.Array):
        if jax.dtypes.issubdtype(expected.dtype, jax.dtypes.prng_key):
            testclass.assertTrue(jax.dtypes.issubdtype(actual.dtype, jax.dtypes.prng_key))
            assert_array_equal(testclass, jax.random.key_data(expected), jax.random.key_data(actual))
            testclass.assertEqual(str(jax.random.key_impl(expected)), str(jax.random.key_impl(actual)))
            return
        testclass.assertEqual(len(expected.addressable_shards), len(actual.addressable_shards))
        for want, got in zip(expected.addressable_shards, actual.addressable_shards):
            np.testing.assert_array_equal(got.data, want.data)
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(actual, expected)
    else:
        testclass.assertEqual(expected, actual)


def assert_tree_equal(testclass, expected, actual) -> None:
    """The same key paths, and every leaf equal (:func:`assert_array_equal`); None leaves are skipped."""
    def flat(tree):
        return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    testclass.assertSameElements(flat(expected).keys(), flat(actual).keys())
    jax.tree.map(lambda x, y: None if x is None else assert_array_equal(testclass, x, y), expected, actual,
                 is_leaf=lambda x: x is None)


test_utils = types.SimpleNamespace(
    assert_tree_equal=assert_tree_equal,
    set_tensorstore_driver_for_test=lambda: None,  # Orbax picks a tensorstore driver; ckpt always uses 'file'
    sync_global_processes=lambda name: None,       # one process
)


# ------------------------------------------------------------------------------ array_utils
@dataclasses.dataclass(frozen=True)
class NumpyShapeDtype:
    """The abstract leaf of a numpy array (Orbax's ``NumpyShapeDtype``): loads as an np.ndarray."""

    shape: tuple[int, ...]
    dtype: np.dtype


def as_abstract_type(value: Any) -> Any:
    if isinstance(value, jax.Array):
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
    if isinstance(value, np.ndarray):
        return NumpyShapeDtype(value.shape, value.dtype)
    if isinstance(value, (int, float, str)):
        return type(value)
    raise ValueError(f"Unsupported type: {type(value)}")


def create_numpy_pytree(*, add: int = 0, include_scalars: bool = True):
    pytree = {
        "a": np.arange(8) + add,
        "b": np.arange(16) * 2 + add,
        "c": {"a": np.arange(8).reshape((2, 4)) * 3 + add, "e": np.arange(16).reshape((4, 4)) * 4 + add},
    }
    if include_scalars:
        pytree.update({"x": 4.5, "y": 3})
    return pytree, jax.tree.map(as_abstract_type, pytree)


def create_sharded_pytree(*, add: int = 0, include_scalars: bool = True):
    devices = np.asarray(jax.devices())
    mesh_2d = jax.sharding.Mesh(devices.reshape((2, len(devices) // 2)), ("x", "y"))
    mesh_1d = jax.sharding.Mesh(devices, ("x",))
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    shardings = {"a": NS(mesh_1d, P(None)), "b": NS(mesh_1d, P("x")),
                 "c": {"a": NS(mesh_2d, P("x", "y")), "e": NS(mesh_2d, P("x", "y"))}}
    if include_scalars:
        shardings.update({"x": NS(mesh_1d, P()), "y": NS(mesh_1d, P())})
    pytree, _ = create_numpy_pytree(add=add, include_scalars=include_scalars)
    pytree = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), pytree, shardings)
    return pytree, jax.tree.map(as_abstract_type, pytree)


array_test_utils = types.SimpleNamespace(create_numpy_pytree=create_numpy_pytree,
                                         create_sharded_pytree=create_sharded_pytree)


# ------------------------------------------------------------- the rest of the imported modules
checkpoint_layout = types.SimpleNamespace(STATE_CHECKPOINTABLE_KEY="state")
multihost = types.SimpleNamespace(
    is_pathways_backend=lambda: False,
    is_primary_host=lambda primary_host: jax.process_index() == (primary_host or 0),
    broadcast_one_to_all=lambda value, is_source=None: value,  # one process
)


class PyTreeOf(Generic[T]):
    """Only for the annotations of the ported helpers."""


tree_types = types.SimpleNamespace(PyTreeOf=PyTreeOf, Leaf=Any, JsonType=Any)
# Orbax internals that only the skipped test_save_async touches (see SKIPPED in the test module).
serialization = tree_test_utils = types.SimpleNamespace()


# ---------------------------------------------------------------------------- handler_utils
def _dataclass_handler(cls: type, abstract: type) -> type:
    """A CheckpointableHandler of the dataclass ``cls``: its fields as JSON in foo.txt."""

    class Handler:
        async def save(self, directory, checkpointable):
            path = await directory.await_creation()
            (path / "foo.txt").write_text(json.dumps(dataclasses.asdict(checkpointable)))

            async def done():
                return None
            return done()

        async def load(self, directory, abstract_checkpointable=None):
            async def read():
                return cls(*json.loads((directory / "foo.txt").read_text()).values())
            return read()

        async def metadata(self, directory):
            return abstract()

        def is_handleable(self, checkpointable):
            return isinstance(checkpointable, cls)

        def is_abstract_handleable(self, abstract_checkpointable):
            return isinstance(abstract_checkpointable, abstract)

    Handler.__name__ = Handler.__qualname__ = f"{cls.__name__}Handler"
    Handler.__module__ = __name__
    return Handler


@dataclasses.dataclass
class Foo:
    x: int
    y: str


@dataclasses.dataclass
class Bar:
    a: int
    b: str


@dataclasses.dataclass
class Baz:
    int_val: int
    str_val: str


class AbstractFoo:
    pass


class AbstractBar:
    pass


class AbstractBaz:
    pass


FooHandler = _dataclass_handler(Foo, AbstractFoo)
BarHandler = _dataclass_handler(Bar, AbstractBar)
BazHandler = _dataclass_handler(Baz, AbstractBaz)

handler_utils = types.SimpleNamespace(
    Foo=Foo, Bar=Bar, Baz=Baz, AbstractFoo=AbstractFoo, AbstractBar=AbstractBar, AbstractBaz=AbstractBaz,
    FooHandler=FooHandler, BarHandler=BarHandler, BazHandler=BazHandler)


# ------------------------------------------------------------------ compatibility/test_utils
def make_single_device_sharding(device: Any) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(device)


def _checkpoint_path(version: str, metadata_present: bool, is_direct_checkpoint: bool, is_pytree: bool):
    """One of the steps Orbax's wheel ships under testing/compatibility/checkpoints (written by its v0
    CheckpointManager and v1 Checkpointer), read in place; v1 wrote no direct checkpoints (None)."""
    if version == "v1" and is_direct_checkpoint:
        return None
    parts = (f"{version}_checkpoints", "direct_checkpoint" if is_direct_checkpoint else "composite_checkpoint",
             "checkpoint_metadata_present" if metadata_present else "checkpoint_metadata_missing",
             "pytree_checkpointable_has_metadata" if is_pytree else "pytree_checkpointable_missing_metadata")
    shipped = importlib.metadata.distribution("orbax-checkpoint").locate_file(
        "orbax/checkpoint/experimental/v1/_src/testing/compatibility/checkpoints")
    return epath.Path(shipped, *parts)


def _value_metadata(value: Any) -> Any:
    """ckpt's metadata of a saved leaf: a jax array's LeafMetadata (type, shape, dtype, bytes); ckpt's
    LeafMetadata carries no sharding or chunk layout, so those of Orbax's ArrayMetadata are not compared."""
    if isinstance(value, jax.Array):
        return LeafMetadata("jax", value.shape, np.dtype(value.dtype), value.nbytes)
    raise TypeError(f"Unsupported type: {type(value)}")


compatibility_test_utils = types.SimpleNamespace(
    get_checkpoint_path=_checkpoint_path, create_value_metadata=_value_metadata,
    strip_sharding_metadata=lambda tree: tree)  # no sharding in ckpt's LeafMetadata to strip; one process, so
                                                # replicate_on_mesh (multi-process only) is never called
