"""Restores Linen and NNX states onto a 1-D mesh of 4 CPU devices, for test_flax's sharding test.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/flax_sharded_restore.py DIRECTORY

Saves an unsharded TrainState and NNX model, restores them into abstract targets whose leaves carry
a NamedSharding (split along the first axis where it divides, replicated elsewhere), and checks that
every restored leaf has exactly that sharding and the saved values, and that a large leaf placed on
all four devices is read from disk once. Prints ``ok`` and exits 0, or
fails with an AssertionError naming the leaf.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import flax_train  # noqa: E402
import nnx_train  # noqa: E402

from ckpt import chunks  # noqa: E402
from ckpt.integrations.flax import restore_train_state  # noqa: E402
from ckpt.training import Checkpointer  # noqa: E402


def sharding_for(mesh: jax.sharding.Mesh, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
    """Split along the first axis when the mesh size divides it, else replicate."""
    if leaf.ndim and leaf.shape[0] % mesh.size == 0:
        return NamedSharding(mesh, PartitionSpec("data"))
    return NamedSharding(mesh, PartitionSpec())


def with_shardings(mesh: jax.sharding.Mesh, abstract):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_for(mesh, a)), abstract)


def check_placed(restored, expected, saved) -> None:
    restored_leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    assert len(restored_leaves) == len(jax.tree.leaves(expected)) == len(jax.tree.leaves(saved))
    for (path, leaf), want, value in zip(restored_leaves, jax.tree.leaves(expected), jax.tree.leaves(saved)):
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, jax.Array), f"{name}: {type(leaf)}"
        assert leaf.sharding == want.sharding, f"{name}: {leaf.sharding} != {want.sharding}"
        assert leaf.dtype == want.dtype, f"{name}: {leaf.dtype} != {want.dtype}"
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf, value = jax.random.key_data(leaf), jax.random.key_data(value)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(value), err_msg=name)


def main(directory: str) -> None:
    assert jax.device_count() == 4, f"expected 4 CPU devices, got {jax.devices()}"
    mesh = jax.make_mesh((4,), ("data",))

    state = flax_train.create_state()
    with Checkpointer(Path(directory) / "linen") as ckptr:
        ckptr.save(0, state, force=True)
        abstract = with_shardings(mesh, jax.eval_shape(flax_train.create_state))
        restored = restore_train_state(ckptr, abstract)
    check_placed(restored, abstract, state)
    restored.apply_gradients(grads=restored.params)  # sharded leaves work together

    model, _ = nnx_train.create()
    with Checkpointer(Path(directory) / "nnx") as ckptr:
        ckptr.save(0, nnx.state(model), force=True)
        abstract_model = nnx.eval_shape(lambda: nnx_train.create()[0])
        expected = with_shardings(mesh, nnx.state(abstract_model))
        nnx.update(abstract_model, expected)
        restored_model = restore_train_state(ckptr, abstract_model)
    assert restored_model is abstract_model
    check_placed(nnx.state(restored_model), expected, nnx.state(model))

    big = {"w": np.arange(64 * 8192, dtype=np.float32).reshape(64, 8192)}  # 2 MiB: its own array, one chunk
    reads = []
    read_chunk = chunks.read_chunk
    chunks.read_chunk = lambda path, *args, **kwargs: reads.append(path) or read_chunk(path, *args, **kwargs)
    with Checkpointer(Path(directory) / "big") as ckptr:
        ckptr.save(0, big, force=True)
        restored = ckptr.load(0, abstract_state=with_shardings(mesh, jax.eval_shape(lambda: big)))
    check_placed(restored, with_shardings(mesh, jax.eval_shape(lambda: big)), big)
    assert len(reads) == 1, f"the chunk was read {len(reads)} times for 4 devices: {reads}"
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
