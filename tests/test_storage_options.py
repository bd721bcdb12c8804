"""ctx.array.saving.storage_options: a storage dtype is the dtype on disk and loads as in Orbax (the stored
dtype, or the abstract leaf's); chunk_byte_size sets the chunks of each large leaf's array; a save with
other options than the last one never reuses its plan; bad options are refused before anything is written."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

import ckpt
from ckpt import format as fmt
from ckpt import saving, storage_options
from ckpt.verify import verify_step
from tests.fsutil import tree_doc

ROWS = 1280  # rows of 512 float32: 2.5 MiB, a leaf stored as its own array (in bfloat16 as well)


def state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"big": rng.standard_normal((ROWS, 512)).astype(np.float32),
            "small": rng.standard_normal(5).astype(np.float32),
            "ints": np.arange(4, dtype=np.int32) + seed,
            "step": 1001 + seed, "lr": 0.1, "np_step": np.int64(2 ** 40 + seed), "name": "run"}


def context(dtype=None, chunk_byte_size=None) -> ckpt.Context:
    ctx = ckpt.Context()
    ctx.array.saving.storage_options.dtype = dtype
    ctx.array.saving.storage_options.chunk_byte_size = chunk_byte_size
    return ctx


def leaf_entry(step_dir, path: str) -> dict:
    tree = tree_doc(step_dir)
    return next(leaf for leaf in tree["checkpointables"]["state"]["leaves"] if leaf["path"] == path)


def on_disk(step_dir, path: str = "['big']") -> ts.TensorStore:
    """The large leaf's array, opened with tensorstore alone from the spec in tree.json."""
    spec = leaf_entry(step_dir, path)["array"]
    kvstore = {"driver": "file", "path": str(step_dir / spec["kvstore"]["path"])}
    return ts.open({**spec, "kvstore": kvstore}, open=True).result()


def chunk_files(step_dir) -> int:
    return len(list((step_dir / fmt.ARRAYS / "0" / "c").iterdir()))


def assert_stored_as(step_dir, values: dict, dtype) -> None:
    """The array leaves are ``dtype`` on disk (tree.json and tensorstore) and hold the cast values;
    the scalars are as saved; every checksum holds."""
    assert on_disk(step_dir).dtype.numpy_dtype == dtype
    np.testing.assert_array_equal(on_disk(step_dir).read().result(), values["big"].astype(dtype))
    for path in ("['big']", "['small']", "['ints']"):
        assert leaf_entry(step_dir, path)["dtype"] == np.dtype(dtype).name
    assert leaf_entry(step_dir, "['np_step']")["dtype"] == "int64"
    assert verify_step(step_dir).ok


def assert_loads_as_orbax(loaded_as_saved: dict, loaded_into_target: dict, values: dict, dtype) -> None:
    for key in ("big", "small", "ints"):
        assert loaded_as_saved[key].dtype == dtype                 # no target: the stored dtype
        np.testing.assert_array_equal(loaded_as_saved[key], values[key].astype(dtype))
        assert loaded_into_target[key].dtype == values[key].dtype  # a target: its dtype
        np.testing.assert_array_equal(loaded_into_target[key], values[key].astype(dtype).astype(values[key].dtype))
    for key in ("step", "lr", "np_step", "name"):                  # scalars are not cast
        assert loaded_as_saved[key] == values[key] and type(loaded_as_saved[key]) is type(values[key])


@pytest.mark.parametrize("how", ["save", "save_async", "free function"])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_a_storage_dtype_is_the_dtype_on_disk_and_loads_as_orbax_does(tmp_path, how, dtype):
    values = state()
    with context(dtype):
        if how == "free function":
            ckpt.save(tmp_path / "0", values)
        else:
            with ckpt.Checkpointer(tmp_path) as ckptr:
                assert getattr(ckptr, how)(0, values)
    assert_stored_as(tmp_path / "0", values, dtype)
    assert_loads_as_orbax(ckpt.load(tmp_path / "0"), ckpt.load(tmp_path / "0", state(1)), values, dtype)


def test_a_storage_dtype_casts_jax_and_torch_arrays_which_load_into_their_targets(tmp_path):
    jax, torch = pytest.importorskip("jax"), pytest.importorskip("torch")
    values = {"jax": jax.numpy.arange(6, dtype=jax.numpy.float32), "torch": torch.linspace(0, 1, 7)}
    with context(ml_dtypes.bfloat16), ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save_async(0, values).result()
        as_saved = ckptr.load(0)
        into = ckptr.load(0, {"jax": jax.ShapeDtypeStruct((6,), jax.numpy.float32), "torch": torch.zeros(7)})
    assert as_saved["jax"].dtype == jax.numpy.bfloat16 and as_saved["torch"].dtype == torch.bfloat16
    assert into["jax"].dtype == jax.numpy.float32 and into["torch"].dtype == torch.float32
    np.testing.assert_array_equal(np.asarray(into["jax"]), np.arange(6, dtype=np.float32))
    want = values["torch"].to(torch.bfloat16).float()
    assert torch.equal(into["torch"], want)


def test_chunk_byte_size_sets_the_chunks_of_each_large_leafs_array(tmp_path):
    with ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, state())
        with context(chunk_byte_size=256 << 10):                   # 128 rows of 2 KiB
            ckptr.save(1, state(), force=True)
        with context(ml_dtypes.bfloat16, chunk_byte_size=256 << 10):  # 256 rows of 1 KiB
            ckptr.save(2, state(), force=True)
    assert on_disk(tmp_path / "0").chunk_layout.write_chunk.shape == (ROWS, 512) and chunk_files(tmp_path / "0") == 1
    assert on_disk(tmp_path / "1").chunk_layout.write_chunk.shape == (128, 512) and chunk_files(tmp_path / "1") == 10
    assert on_disk(tmp_path / "2").chunk_layout.write_chunk.shape == (256, 512) and chunk_files(tmp_path / "2") == 5
    for step in ("1", "2"):
        assert len(leaf_entry(tmp_path / step, "['big']")["chunk_crc32"]) == chunk_files(tmp_path / step)
        assert verify_step(tmp_path / step).ok
        np.testing.assert_array_equal(ckpt.load(tmp_path / step, state(1))["big"],
                                      state()["big"].astype(on_disk(tmp_path / step).dtype.numpy_dtype).astype(np.float32))


@pytest.mark.parametrize("budget", [None, 1 << 10], ids=["copied", "written by the caller"])
def test_a_save_with_the_same_options_reuses_the_plan_and_one_with_others_plans_anew(tmp_path, budget):
    bf16, chunked = context(ml_dtypes.bfloat16), context(ml_dtypes.bfloat16, chunk_byte_size=256 << 10)
    ctx = ckpt.Context(memory_options=ckpt.MemoryOptions(max_inflight_bytes=budget))
    with ckpt.Checkpointer(tmp_path, context=ctx) as ckptr:
        with bf16:
            ckptr.save_async(0, state(0))
            first = ckptr._staging.layout
            ckptr.save_async(1, state(1), force=True)              # reused: copied and cast into its places
            assert ckptr._staging.layout is first
            assert ckptr.save(2, state(2), force=True)             # a sync save reuses it as well
            assert ckptr._staging.layout is first
        assert saving.plan({"state": state(3)}, previous=first, storage=context().array.saving).layout is not first
        ckptr.save_async(3, state(3), force=True)                  # no storage dtype: planned anew
        assert ckptr._staging.layout is not first
        with chunked:
            ckptr.save_async(4, state(4), force=True)              # another chunk size: planned anew
            fifth = ckptr._staging.layout
            ckptr.save_async(5, state(5), force=True)
            assert ckptr._staging.layout is fifth is not first
        ckptr.wait()
    for step in (0, 1, 2, 4, 5):
        assert_stored_as(tmp_path / str(step), state(step), ml_dtypes.bfloat16)
        assert_loads_as_orbax(ckpt.load(tmp_path / str(step)), ckpt.load(tmp_path / str(step), state(9)), state(step),
                              ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ckpt.load(tmp_path / "3")["big"], state(3)["big"])
    assert ckpt.load(tmp_path / "3")["big"].dtype == np.float32
    assert chunk_files(tmp_path / "1") == 1 and chunk_files(tmp_path / "5") == 5
    with context(ml_dtypes.bfloat16):                              # a reused plan writes what a fresh one does
        ckpt.save(tmp_path / "fresh", state(1))
    assert json.loads((tmp_path / "1" / fmt.TREE).read_text()) == json.loads((tmp_path / "fresh" / fmt.TREE).read_text())


@pytest.mark.parametrize("option, value, message", [
    ("dtype", "not a dtype", "storage_options.dtype"), ("dtype", object, "storage_options.dtype"),
    ("dtype", np.str_, "storage_options.dtype"), ("chunk_byte_size", 0, "chunk_byte_size"),
    ("chunk_byte_size", -4096, "chunk_byte_size"), ("chunk_byte_size", 1.5e6, "chunk_byte_size"),
    ("chunk_byte_size", True, "chunk_byte_size")])
def test_bad_storage_options_are_refused_before_anything_is_written(tmp_path, option, value, message):
    ctx = ckpt.Context()
    setattr(ctx.array.saving.storage_options, option, value)
    with ckpt.Checkpointer(tmp_path / "root", context=ctx) as ckptr:
        with pytest.raises(ValueError, match=message):
            ckptr.save(0, state())
        with pytest.raises(ValueError, match=message):
            ckptr.save_async(0, state())
        assert ckptr.checkpoints == []
    with ctx, pytest.raises(ValueError, match=message):
        ckpt.save(tmp_path / "m", state())
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in (tmp_path / "root").iterdir() if not p.name.startswith(".")) == []


def test_the_checked_options_name_the_stored_dtype_and_the_chunk_size():
    options = context(ml_dtypes.bfloat16, 1 << 20).array.saving
    assert storage_options.of(options) == storage_options.Storage(np.dtype(ml_dtypes.bfloat16), 1 << 20)
    assert storage_options.of(ckpt.Context().array.saving) == storage_options.DEFAULT


def test_both_tiers_of_a_two_tier_checkpointer_follow_its_context_changed_after_it_was_made(tmp_path):
    ctx = ckpt.Context()
    local = ckpt.LocalCheckpointOptions(tmp_path / "local")
    with ckpt.Checkpointer(tmp_path / "durable", context=ctx, local=local) as ckptr:
        ctx.array.saving.storage_options.dtype = ml_dtypes.bfloat16
        ckptr.save_async(0, state(0))
        ckptr.wait()
        assert sorted(ckptr.latest.locations) == ["durable", "local"]
    for tier in ("local", "durable"):
        assert_stored_as(tmp_path / tier / "0", state(0), ml_dtypes.bfloat16)


def test_a_scoped_creator_sets_the_options_of_each_leaf_over_the_global_ones_and_plans_every_save_anew(tmp_path):
    import jax  # noqa: F401  (Orbax's creators get jax's key entries)
    asked = []

    def creator(keypath, value):
        asked.append(jax.tree_util.keystr(keypath))
        if keypath == (jax.tree_util.DictKey("big"),):
            return ckpt.ArrayOptions.Saving.StorageOptions(chunk_byte_size=256 << 10)  # 256 rows of 1 KiB (bfloat16)
        if keypath == (jax.tree_util.DictKey("small"),):
            return ckpt.ArrayOptions.Saving.StorageOptions(dtype=np.float16)
        return None

    ctx = context(ml_dtypes.bfloat16)
    ctx.array.saving.scoped_storage_options_creator = creator
    with ckpt.Checkpointer(tmp_path, context=ctx) as ckptr:
        ckptr.save_async(0, state()).result()
        ckptr.save_async(1, state(1)).result()   # the same structure: planned again, the creator asked again
    assert asked == [jax.tree_util.keystr((jax.tree_util.DictKey(k),)) for k in state()] * 2
    for step, seed in (("0", 0), ("1", 1)):
        big = on_disk(tmp_path / step)
        assert big.dtype.numpy_dtype == ml_dtypes.bfloat16 and big.chunk_layout.write_chunk.shape == (256, 512)
        assert leaf_entry(tmp_path / step, "['small']")["dtype"] == "float16"
        assert leaf_entry(tmp_path / step, "['ints']")["dtype"] == "bfloat16"
        loaded = ckpt.load_checkpointables(tmp_path / step)["state"]
        np.testing.assert_array_equal(loaded["small"], state(seed)["small"].astype(np.float16))
        assert verify_step(tmp_path / step).ok


def test_a_scoped_creator_returning_a_bad_option_is_refused_naming_the_leaf_before_anything_is_written(tmp_path):
    ctx = ckpt.Context()
    ctx.array.saving.scoped_storage_options_creator = lambda keypath, value: ckpt.ArrayOptions.Saving.StorageOptions(
        chunk_byte_size=-1)
    with ctx, pytest.raises(ValueError, match=r"scoped_storage_options_creator at \['big'\]: .*chunk_byte_size"):
        ckpt.save(tmp_path / "m", state())
    assert not (tmp_path / "m").exists()


def test_leaves_alike_stored_differently_each_keep_their_own_entry(tmp_path):
    """Arrays of one dtype and shape share one manifest entry while planned (ckpt.leaves.describe): a
    creator that casts one of them, or sets one large leaf's chunk size, changes that leaf's entry
    alone, and each large leaf keeps its own array."""
    import jax  # noqa: F401  (Orbax's creators get jax's key entries)
    rng = np.random.default_rng(3)
    tree = {"a": rng.standard_normal(5).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
            "big1": rng.standard_normal((ROWS, 512)).astype(np.float32),
            "big2": rng.standard_normal((ROWS, 512)).astype(np.float32)}

    def creator(keypath, value):
        if keypath == (jax.tree_util.DictKey("a"),):
            return ckpt.ArrayOptions.Saving.StorageOptions(dtype=np.float16)
        if keypath == (jax.tree_util.DictKey("big1"),):
            return ckpt.ArrayOptions.Saving.StorageOptions(chunk_byte_size=256 << 11)  # 256 rows of 2 KiB
        return None

    ctx = ckpt.Context()
    ctx.array.saving.scoped_storage_options_creator = creator
    with ckpt.Checkpointer(tmp_path, context=ctx) as ckptr:
        ckptr.save(0, tree)
    step = tmp_path / "0"
    assert leaf_entry(step, "['a']")["dtype"] == "float16" and leaf_entry(step, "['b']")["dtype"] == "float32"
    assert on_disk(step, "['big1']").chunk_layout.write_chunk.shape == (256, 512)
    assert on_disk(step, "['big2']").chunk_layout.write_chunk.shape == (ROWS, 512)
    assert leaf_entry(step, "['big1']")["array"]["kvstore"] != leaf_entry(step, "['big2']")["array"]["kvstore"]
    loaded = ckpt.load_checkpointables(step)["state"]
    np.testing.assert_array_equal(loaded["a"], tree["a"].astype(np.float16))
    for name in ("b", "big1", "big2"):
        np.testing.assert_array_equal(loaded[name], tree[name])
    assert verify_step(step).ok


def test_a_value_the_storage_dtype_cannot_hold_is_refused_naming_the_leaf_before_anything_is_written(tmp_path):
    """(A storage dtype's cast stored 1e10 as inf in float16 and 300 as 44 in int8, as Orbax does, without a word:
    the step was committed holding other values than those saved.)"""
    torch = pytest.importorskip("torch")
    cases = [(np.float16, {"ok": np.ones(3, np.float32), "w": np.array([1.0, 1e10], np.float32)},
              r"the array at \['w'\] cannot be stored as float16 \(the storage options' dtype\): its float32 value "
              r"10000000000.0 does not fit float16 \(it would become inf"),
             (np.int8, {"w": torch.tensor([1, 300])}, r"\['w'\] cannot be stored as int8 .*from 1 to 300, do not fit int8"),
             (ml_dtypes.bfloat16, {"w": np.array([1.0, np.inf, np.nan, 3e38], np.float32)}, None),  # (all kept)
             # (numpy's refusal of text came out bare, naming no leaf)
             (np.float16, {"ok": np.ones(2), "t": np.array(["a"])}, r"\['t'\] cannot be stored as float16 .*: could not "
                                                                    "convert string to float")]
    for k, (dtype, tree, refused) in enumerate(cases):
        with context(dtype):
            if refused is None:
                ckpt.save(tmp_path / str(k), tree)
                continue
            with pytest.raises(ValueError, match=refused):
                ckpt.save(tmp_path / str(k), tree)
        assert not (tmp_path / str(k)).exists()
    assert np.array_equal(ckpt.load(tmp_path / "2")["w"], cases[2][1]["w"].astype(ml_dtypes.bfloat16), equal_nan=True)
    # saves after the first reuse its plan: async ones cast as they copy (a packed leaf, a large one), sync ones as they
    # write the packed leaves (one was stored as inf): checked there
    good = {"small": np.ones(4, np.float32), "big": np.ones((ROWS, 512), np.float32)}
    for name in ("async", "sync"):
        with context(np.float16), ckpt.Checkpointer(tmp_path / name) as ckptr:
            save = ckptr.save_async if name == "async" else ckptr.save
            save(1, good, force=True)
            for step, key in ((2, "small"), (3, "big")):
                bad = {k: v.copy() for k, v in good.items()}
                bad[key].flat[-1] = 1e10
                with pytest.raises(ValueError, match=rf"\['{key}'\] cannot be stored as float16 .* value 10000000000.0"):
                    save(step, bad, force=True)
            save(4, good, force=True)
            ckptr.wait()
            assert [c.step for c in ckptr.checkpoints] == [1, 4]
        assert sorted(p.name for p in (tmp_path / name).iterdir() if not p.name.startswith((".", "ckpt-"))) == ["1", "4"]
