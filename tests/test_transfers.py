"""A load's device transfers run together (ckpt.transfers), and give what one jax.device_put or
tensor.to per leaf gave: values, dtypes, shardings, commitment. On CPU, as CI runs them."""
from __future__ import annotations

import numpy as np
import pytest

import ckpt
from ckpt import chunks, host_memory, transfers
from tests import procs

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402


def put_all(arrays: list[np.ndarray], shardings: list, batched: bool = True) -> list:
    to_device = transfers.ToDevice(batched=batched)
    values = [to_device.jax(array, sharding) for array, sharding in zip(arrays, shardings)]
    return to_device.run()(values)


def test_batched_and_plain_device_put_give_the_same_arrays():
    device = jax.devices()[0]
    one_device_mesh = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), jax.sharding.PartitionSpec())
    arrays = [np.arange(5, dtype=np.float32), np.float64(2.5) * np.ones((2, 3)), np.array(7, np.int64),
              np.zeros(0, np.uint8), np.arange(4, dtype=np.int16), np.array(1.5, jnp.bfloat16),
              np.arange(6, dtype=jnp.bfloat16).reshape(2, 3), np.arange(5, dtype=np.float32), np.array(True)]
    shardings = [None, None, jax.sharding.SingleDeviceSharding(device), None, jax.sharding.SingleDeviceSharding(device),
                 None, one_device_mesh, one_device_mesh, jax.sharding.SingleDeviceSharding(device)]
    for batched, plain in zip(put_all(arrays, shardings), put_all(arrays, shardings, batched=False)):
        assert isinstance(batched, jax.Array)
        assert (batched.dtype, batched.shape, batched.committed) == (plain.dtype, plain.shape, plain.committed)
        assert batched.sharding == plain.sharding
        np.testing.assert_array_equal(np.asarray(batched), np.asarray(plain))
    assert put_all(arrays[1:2], [None])[0].dtype == jax.dtypes.canonicalize_dtype(np.float64)


def test_an_array_bound_for_one_device_is_made_at_once_and_run_leaves_other_values_alone():
    to_device = transfers.ToDevice()
    array = to_device.jax(np.arange(3, dtype=np.float32), None)
    assert isinstance(array, jax.Array) and not array.committed
    values = [array, 7, "x", None]
    assert to_device.run()(values) == values


@pytest.mark.parametrize("nbytes", [64 * 4, 5 << 20])  # a small buffer, and one cut on a 2 MiB boundary
def test_an_aligned_host_array_is_adopted_by_jax_on_cpu_without_a_copy(nbytes):
    host = host_memory.empty(nbytes).view(np.float32)
    host[:] = 1
    (array,) = put_all([host], [None])
    host[0] = 5  # the load never writes into its buffers again; this shows that no copy was made
    assert float(array[0]) == 5.0


def test_thousands_of_jax_leaves_load_as_jax_arrays_with_the_abstract_sharding(tmp_path):
    state = {f"w{i}": jnp.full((i % 7,), i, jnp.float32) for i in range(2000)}
    state["big"] = jnp.arange((1 << 18) + 3, dtype=jnp.float32)
    ckpt.save(tmp_path / "c", state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device if k.endswith("1") else None)
                for k, v in state.items()}
    restored = ckpt.load(tmp_path / "c", abstract)
    for key, value in state.items():
        assert isinstance(restored[key], jax.Array) and restored[key].dtype == value.dtype, key
        assert restored[key].committed == key.endswith("1"), key
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value), err_msg=key)


def test_a_load_is_an_explicit_transfer_that_a_transfer_guard_against_implicit_ones_lets_through(tmp_path):
    """Under jax.transfer_guard("disallow") (implicit transfers only), a load raised jax's 'Disallowed
    host-to-device transfer': ToDevice calls jax's per-array transfer itself, outside jax.device_put's
    explicit scope. Orbax's load goes through; "disallow_explicit" stops both."""
    state = {"w": jnp.arange(4.0), "scale": jnp.asarray(0.5), "keys": jax.random.split(jax.random.key(0), 2),
             "n": np.ones(3, np.float32)}
    ckpt.save(tmp_path / "c", state)
    abstract = jax.eval_shape(lambda: state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    loaded = []
    with jax.transfer_guard("disallow"):
        for target in (None, abstract, placed):
            loaded.append(ckpt.load(tmp_path / "c", target))
    for restored in loaded:
        assert isinstance(restored["w"], jax.Array)
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
        np.testing.assert_array_equal(jax.random.key_data(restored["keys"]), jax.random.key_data(state["keys"]))
    with jax.transfer_guard("disallow_explicit"), pytest.raises(Exception, match="Disallowed host-to-device"):
        ckpt.load(tmp_path / "c")


def test_torch_abstract_tensors_receive_their_dtype_and_device_in_one_pass(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16)}
    ckpt.save(tmp_path / "c", state)
    restored = ckpt.load(tmp_path / "c", {"a": torch.empty(6, dtype=torch.float64), "b": torch.empty(3, dtype=torch.bfloat16)})
    assert restored["a"].dtype == torch.float64 and restored["a"].device.type == "cpu"
    assert torch.equal(restored["a"], torch.arange(6, dtype=torch.float64))
    assert restored["b"].dtype == torch.bfloat16 and torch.equal(restored["b"], state["b"])


@pytest.mark.parametrize("storage_dtype", [None, "bfloat16"])
def test_a_large_numpy_leaf_is_copied_in_parts_before_save_async_returns(tmp_path, storage_dtype):
    """A steady-state snapshot copies a numpy leaf of 8 MiB or more in parts on the reading
    threads, cast to the storage dtype when one is set; save_async returns only once every part is
    copied, so that changing the array afterwards does not reach the checkpoint."""
    import ml_dtypes

    ctx = ckpt.Context()
    if storage_dtype:
        ctx.array.saving.storage_options.dtype = ml_dtypes.bfloat16
    n = (8 << 20) // 4 * 3 + 17  # three parts' worth of float32, and an uneven end
    state = {"w": np.arange(n, dtype=np.float32) % 251, "small": np.ones(3, np.float32)}
    with ckpt.Checkpointer(tmp_path, context=ctx) as ckptr:
        ckptr.save_async(0, state)
        for step in (1, 2):
            state["w"] += 1
            expected = state["w"].copy()
            ckptr.save_async(step, state, force=True)
            assert ckptr._staging.layout.buffer is not None, "the save reused the layout"
            state["w"][:] = -1  # after the call: not in the checkpoint
            ckptr.wait()
            loaded = ckptr.load(step)["w"]
            want = expected.astype(ml_dtypes.bfloat16) if storage_dtype else expected
            np.testing.assert_array_equal(loaded, want)
            assert loaded.dtype == want.dtype


def test_a_copy_aside_runs_in_one_part_per_reading_thread_but_one_and_casts():
    source = np.arange((8 << 20) // 4 + 5, dtype=np.float32) % 1000
    for src in (source, source[::2]):  # contiguous: in parts; strided: whole
        target = np.zeros(src.size, np.float16)
        parts = transfers._copy_aside(target, src)
        assert len(parts) == (max(1, min(chunks.pool()[1] - 1, src.nbytes // (4 << 20))) if src is source else 1)
        for part in parts:
            part.result()
        np.testing.assert_array_equal(target, src.astype(np.float16))


def test_jax_leaves_of_a_mib_or_more_are_copied_aside_in_a_reused_snapshot(tmp_path):
    """A steady-state async save copies jax arrays on the host (4 MiB leaves, as a Flax MLP's) on the
    reading threads and returns only once they are copied."""
    state = {"w": [jnp.full((1024, 1024), float(i), jnp.float32) for i in range(3)], "b": jnp.ones(3)}
    with ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save_async(0, state)
        state["w"] = [w + 1 for w in state["w"]]
        ckptr.save_async(1, state, force=True)
        assert ckptr._staging.layout.buffer is not None, "the save reused the layout"
        ckptr.wait()
        loaded = ckptr.load(1)
        for i, w in enumerate(loaded["w"]):
            np.testing.assert_array_equal(np.asarray(w), np.full((1024, 1024), i + 1.0, np.float32))


@pytest.mark.timeout(60)
def test_the_thread_that_copies_to_devices_works_in_a_forked_child():
    assert transfers._transfer_thread().submit(abs, -1).result() == 1  # the parent's thread now exists
    assert procs.in_fork(lambda: str(transfers._transfer_thread().submit(abs, -2).result()).encode()) == b"2"



SHARDED_SAVE = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
import ckpt
from ckpt import leaves, transfers, verify
from tests.test_storage_options import context, tree_doc

tmp = Path(sys.argv[1])
mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
on = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
values = np.arange(1000 * 600, dtype=np.float32).reshape(1000, 600)
state = {"rows": jax.device_put(values, on("x")), "cols": jax.device_put(-values, on(None, "x")),
         "bf16": jax.device_put(values.astype(jnp.bfloat16), on("x")),
         "replicated": jax.device_put(values, on()), "one_device": jnp.asarray(values),
         "small": jax.device_put(values[:100], on("x"))}
kinds = {k: type(leaves.to_host((), x).array).__name__ for k, x in state.items()}
assert kinds == {"rows": "DeviceRows", "cols": "DeviceRows", "bf16": "DeviceRows", "replicated": "ndarray",
                 "one_device": "ndarray", "small": "ndarray"}, kinds
as_numpy = {k: np.asarray(x) for k, x in state.items()}
with context(chunk_byte_size=150 * 2400):  # 150 rows a chunk: chunk 3 spans both row shards, chunk 6 is an edge
    ckpt.save(tmp / "numpy", as_numpy)
    ckpt.save(tmp / "sync", state)
    with ckpt.Checkpointer(tmp / "async") as ckptr:
        ckptr.save_async(0, state)
        again = {k: x + 1 for k, x in state.items()}  # the next save of the same tree: a reused layout
        ckptr.save_async(1, again, force=True)
        assert ckptr._staging.layout.buffer is not None, "the save reused the layout"
        ckptr.wait()
        np.testing.assert_array_equal(ckptr.load(1)["cols"], 1 - values)
gathered = [k for k, x in {**state, **again}.items() if k in ("rows", "cols", "bf16") and x._npy_value is not None]
assert not gathered, f"a gathered host copy of {gathered} was made (jax keeps it on the array)"
entries = lambda step: {leaf["path"]: leaf for leaf in tree_doc(step)["checkpointables"]["state"]["leaves"]}
for name, step in (("sync", tmp / "sync"), ("async", tmp / "async" / "0")):
    assert verify.verify_step(step).ok, name
    for path in ("['rows']", "['cols']", "['bf16']"):
        want, got = entries(tmp / "numpy")[path], entries(step)[path]
        assert len(got["chunk_crc32"]) == (7 if path != "['bf16']" else 4), got
        assert (got["chunk_crc32"], got["chunk_sum64"]) == (want["chunk_crc32"], want["chunk_sum64"]), (name, path)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    loaded = ckpt.load(step, abstract_state=abstract)
    for key, x in state.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), as_numpy[key], err_msg=f"{name} {key}")
        assert loaded[key].sharding == x.sharding, (name, key)
with context(dtype=np.float16):  # a storage dtype casts the leaf whole, and refuses values it cannot hold
    ckpt.save(tmp / "f16", {"rows": jax.device_put(values / 16, on("x"))})
    try:
        ckpt.save(tmp / "inf", {"rows": state["rows"]})
        raise AssertionError("599999.0 was stored as float16 (inf)")
    except ValueError as e:
        assert "the array at ['rows'] cannot be stored as float16" in str(e) and not (tmp / "inf").exists(), e
np.testing.assert_array_equal(ckpt.load(tmp / "f16")["rows"], (values / 16).astype(np.float16))
print("ok")
"""


def test_a_jax_leaf_split_over_cpu_devices_is_saved_a_chunk_at_a_time_from_its_shards(tmp_path):
    """A large jax array sharded over CPU devices is written from its shards a chunk of rows at a time
    (no gathered host copy: a sync save's extra memory is a chunk), sync or async, with the bytes and
    chunk checksums its numpy copy gets; the chunks here cross the shards' boundaries and end on an edge.
    (Two CPU devices need a process of their own.)"""
    result = procs.run_script(SHARDED_SAVE, str(tmp_path), timeout=300,
                              XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-2000:] + result.stderr[-4000:]
