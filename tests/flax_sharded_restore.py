"""Restores Linen and NNX states onto a 1-D mesh of 4 CPU devices, for test_flax's sharding test.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/flax_sharded_restore.py DIRECTORY

Saves an unsharded TrainState and NNX model, restores them into abstract targets whose leaves carry
a NamedSharding (split along the first axis where it divides, replicated elsewhere), and checks that
every restored leaf has exactly that sharding and the saved values, that leaves ``nnx.eval_shape`` shards
over an ``AbstractMesh`` under ``jax.set_mesh`` are restored over that mesh, and that a large leaf placed
on all four devices is read from disk once. Prints ``ok`` and exits 0, or
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


def restore_under_mesh(directory: Path, mesh: jax.sharding.Mesh) -> None:
    """``nnx.eval_shape`` under ``jax.set_mesh`` shards its leaves over an ``AbstractMesh``: they are restored
    over the context's mesh, by a load in the background too; outside the context, an error names the leaf."""
    with jax.set_mesh(mesh):
        model, optimizer = nnx_train.create()
        saved = nnx.state((model, optimizer))
    with Checkpointer(directory / "abstract_mesh") as ckptr:
        ckptr.save(0, saved, force=True)
        with jax.set_mesh(mesh):
            abstract = nnx.eval_shape(nnx_train.create)
            loaded_in_background = ckptr.load_async(0, nnx.state(nnx.eval_shape(nnx_train.create)))
            outside = nnx.eval_shape(nnx_train.create)
        abstract_leaves = jax.tree.leaves(nnx.state(abstract))
        assert all(isinstance(a.sharding.mesh, jax.sharding.AbstractMesh) for a in abstract_leaves), abstract_leaves
        on_mesh = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, a.sharding.spec))  # noqa: E731
        expected = jax.tree.map(on_mesh, nnx.state(abstract))
        with jax.set_mesh(mesh):
            restored = restore_train_state(ckptr, abstract)
        check_placed(nnx.state(restored), expected, saved)
        check_placed(loaded_in_background.result(timeout=60), expected, saved)
        try:
            restore_train_state(ckptr, outside)
        except ValueError as e:
            assert "state[0]['" in str(e) and "jax.set_mesh" in str(e), e
        else:
            raise AssertionError("restored an abstract mesh's leaves outside jax.set_mesh")


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

    restore_under_mesh(Path(directory), mesh)

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
