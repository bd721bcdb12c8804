"""A save of the same tree as the last one reuses its layout (ckpt.layout), and saves exactly what a
fresh plan would: the values at the call, for every kind of leaf, packed or in its own array."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import ckpt
from ckpt import format as fmt
from ckpt import entries, packing, saving, verify
from ckpt import tree as tree_lib
from ckpt.leaf_table import LeafTable
from ckpt.schema import read_manifest, read_tree

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

BIG = (1 << 20) // 4 + 5  # float32 elements over the packing threshold


def mixed_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "numpy": {f"a{i}": rng.standard_normal(i + 1).astype(np.float32) for i in range(20)},
        "zero_d": [np.array(rng.standard_normal(), np.float64) for _ in range(5)],
        "big": rng.standard_normal(BIG).astype(np.float32),
        "big_endian": rng.standard_normal(7).astype(">f8"),
        "torch": {"w": torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32)),
                  "bf16": torch.ones(5, dtype=torch.bfloat16) * seed, "t": torch.arange(6).reshape(2, 3).T},
        "jax": {"x": jnp.asarray(rng.standard_normal(9).astype(np.float32)), "big": jnp.full((BIG,), seed, jnp.float32)},
        "scalars": {"step": seed, "lr": 0.5 * seed, "name": f"run-{seed}", "flag": seed % 2 == 0, "none": None,
                    "np": np.float32(seed), "bytes": bytes([seed] * 3)},
    }


def assert_same(loaded, state):
    flat_loaded, flat_state = jax.tree.leaves(loaded, is_leaf=lambda x: x is None), jax.tree.leaves(state, is_leaf=lambda x: x is None)
    assert len(flat_loaded) == len(flat_state)
    for got, want in zip(flat_loaded, flat_state):
        if isinstance(want, (torch.Tensor, jax.Array, np.ndarray, np.generic)):
            want = want.float().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
            got = got.float().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want and type(got) is type(want)


def test_a_second_save_of_the_same_tree_reuses_the_layout_and_saves_the_new_values(tmp_path):
    with ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save_async(0, mixed_state(0))
        first = ckptr._staging.layout
        assert first is not None
        state = mixed_state(0)
        for step in (1, 2, 3):
            new = mixed_state(step)
            state["numpy"]["a3"][:] = new["numpy"]["a3"]      # changed in place
            state["big"][:] = new["big"]
            state["torch"]["w"].copy_(new["torch"]["w"])
            state["jax"], state["scalars"], state["zero_d"] = new["jax"], new["scalars"], new["zero_d"]
            plan = saving.plan({"state": state}, previous=first)
            assert plan.values is not None, "the same structure, shapes and dtypes reuse the layout"
            ckptr.save_async(step, state, force=True)
            assert ckptr._staging.layout is first
            expected = {k: v for k, v in mixed_state(step).items()}
            expected["numpy"] = {**mixed_state(0)["numpy"], "a3": new["numpy"]["a3"]}
            expected["torch"] = {**mixed_state(0)["torch"], "w": new["torch"]["w"]}
            expected["big_endian"] = mixed_state(0)["big_endian"]
            state["big"][:] = 0                               # after the call: not in the checkpoint
            state["torch"]["w"].zero_()
            ckptr.wait()
            assert_same(ckptr.load(step), expected)
            state["big"][:] = new["big"]
            state["torch"]["w"].copy_(new["torch"]["w"])


def test_a_reused_layout_writes_the_same_tree_json_as_a_fresh_plan(tmp_path):
    state = mixed_state(4)
    with ckpt.Checkpointer(tmp_path / "reused") as ckptr:
        ckptr.save_async(0, mixed_state(1))
        ckptr.save_async(1, state, force=True)
        assert ckptr.save(2, state, force=True)  # a sync save reuses it as well
    with ckpt.Checkpointer(tmp_path / "fresh") as ckptr:
        ckptr.save(1, state)
    fresh = json.loads((tmp_path / "fresh" / "1" / fmt.TREE).read_text())
    nbytes = json.loads((tmp_path / "fresh" / "1" / fmt.MANIFEST).read_text())["nbytes"]
    for step in ("1", "2"):
        assert json.loads((tmp_path / "reused" / step / fmt.TREE).read_text()) == fresh, step
        assert json.loads((tmp_path / "reused" / step / fmt.MANIFEST).read_text())["nbytes"] == nbytes, step


def packable_state(seed: int) -> dict:
    """Small numpy leaves of every sort that runs copy together (ckpt.packing), among others."""
    rng = np.random.default_rng(seed)
    return {
        "zero_d": [np.array(rng.standard_normal(), (np.float32, np.int64, np.bool_)[i % 3]) for i in range(30)],
        "vectors": {f"v{i}": rng.standard_normal(i * 7 % 50).astype(np.float32) for i in range(30)},
        "tiny_2d": [rng.integers(0, 9, (2, 3)).astype(np.int16) for _ in range(5)],
        "strings": [np.array([f"s{seed}", "ab"]), np.array(["xyz"])] * 3,
        "bf16": [np.full(i + 1, seed, ml_dtypes.bfloat16) for i in range(4)],
        "big_endian": [rng.standard_normal(i + 3).astype(">f8") for i in range(4)],
        "strided": [rng.standard_normal((6, 4)).astype(np.float32)[::2, ::3] for _ in range(3)],
        "empty": [np.zeros(0, np.float32), np.zeros((0, 3), np.float32)],
        "torch": torch.arange(5, dtype=torch.float32) * seed,
        "scalar": np.float32(seed),
    }


def test_packed_numpy_leaves_are_copied_in_runs_and_saved_as_a_fresh_plan_saves_them(tmp_path):
    with ckpt.Checkpointer(tmp_path / "reused") as ckptr:
        ckptr.save_async(0, packable_state(0))
        layout = ckptr._staging.layout
        runs, _ = layout.copy_groups(fmt.PACKED_CHUNK_BYTES)
        assert len(runs) >= 8 and sum(len(run.indices) for run in runs) >= 60
        state = packable_state(1)
        ckptr.save_async(1, state, force=True)
        assert ckptr._staging.layout is layout
        for leaf in state["vectors"].values():  # after the call: not in the checkpoint
            leaf += 1
        ckptr.wait()
        assert_same(ckptr.load(1), packable_state(1))
    with ckpt.Checkpointer(tmp_path / "fresh") as ckptr:
        ckptr.save(1, packable_state(1))
    fresh = json.loads((tmp_path / "fresh" / "1" / fmt.TREE).read_text())
    assert json.loads((tmp_path / "reused" / "1" / fmt.TREE).read_text()) == fresh
    assert verify.verify_step(tmp_path / "reused" / "1").ok


def test_runs_under_a_storage_dtype_store_what_a_fresh_plan_stores(tmp_path):
    """Runs of float32, int64, bool and float64 leaves, stored as bfloat16 (cast as astype casts)."""
    ctx = ckpt.Context()
    ctx.array.saving.storage_options.dtype = ml_dtypes.bfloat16
    states = [{k: v for k, v in packable_state(seed).items() if k != "strings"} for seed in (0, 1)]
    with ckpt.Checkpointer(tmp_path / "reused", context=ctx) as ckptr:
        ckptr.save_async(0, states[0])
        ckptr.save_async(1, states[1], force=True)
        assert ckptr._staging.layout.buffer is not None, "the second save reused the layout"
        ckptr.wait()
    with ckpt.Checkpointer(tmp_path / "fresh", context=ctx) as ckptr:
        ckptr.save(1, states[1])
    fresh = json.loads((tmp_path / "fresh" / "1" / fmt.TREE).read_text())
    assert json.loads((tmp_path / "reused" / "1" / fmt.TREE).read_text()) == fresh


@pytest.mark.parametrize("change", ["shape", "torch_shape", "dtype", "numpy_dtype", "key", "type", "sharding"])
def test_a_changed_tree_is_planned_afresh_and_saved_as_it_is(tmp_path, change):
    state = mixed_state(0)
    previous = saving.plan({"state": state}).layout
    changed = mixed_state(0)
    if change == "shape":
        changed["numpy"]["a0"] = np.zeros(2, np.float32)
    elif change == "torch_shape":
        changed["torch"]["w"] = changed["torch"]["w"].reshape(4, 3)
    elif change == "dtype":
        changed["torch"]["w"] = changed["torch"]["w"].double()
    elif change == "numpy_dtype":
        changed["numpy"]["a5"] = changed["numpy"]["a5"].astype(np.int32)
    elif change == "key":
        changed["scalars"]["renamed"] = changed["scalars"].pop("step")
    elif change == "type":
        changed["scalars"]["step"] = 1.5
    else:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
        changed["jax"]["x"] = jax.device_put(changed["jax"]["x"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert saving.plan({"state": changed}, previous=previous).layout is not previous
    with ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save_async(0, state)
        ckptr.save_async(1, changed, force=True)
        ckptr.wait()
        assert_same(ckptr.load(1), changed)


def test_sync_saves_of_a_reused_layout_fill_each_chunk_as_a_fresh_plan_does(tmp_path, monkeypatch):
    """A sync save keeps no copy of the state: it makes the packed array one chunk at a time, each
    chunk filled by the runs and lone leaves that start in it. With chunks of 1 KiB, runs are split
    at chunk edges and leaves span chunks; every step's tree.json (each leaf's CRC32 taken from the
    chunks) is the one a fresh plan writes, and every step reads back and verifies."""
    monkeypatch.setattr(fmt, "PACKED_CHUNK_BYTES", 1024)

    def state(seed: int) -> dict:
        return {"packable": packable_state(seed), "mixed": mixed_state(seed),
                "long": [np.full(700 + i, seed + i, np.float32) for i in range(3)]}  # each over two chunks

    with ckpt.Checkpointer(tmp_path / "reused") as ckptr:
        ckptr.save(0, state(0))
        layout = ckptr._staging.layout
        for step in (1, 2):
            assert ckptr.save(step, state(step), force=True)
            assert ckptr._staging.layout is layout
        ckptr.save_async(3, state(3), force=True)  # from the snapshot's buffer, for comparison
        ckptr.wait()
        windows = layout.windows(packing.piece_bytes())
        assert len(windows) > 10 and all(0 <= run.start < 1024 for runs, _ in windows for run in runs)
        runs = layout.copy_groups(packing.piece_bytes())[0]
        assert len(runs) == sum(len(runs) for runs, _ in windows)
        assert all(len({layout.offset[i] // 1024 for i in run.indices}) == 1 for run in runs), "runs split at chunk edges"
        for step in (1, 2, 3):
            assert_same(ckptr.load(step), state(step))
            assert verify.verify_step(tmp_path / "reused" / str(step)).ok
    for step in (1, 2, 3):
        with ckpt.Checkpointer(tmp_path / f"fresh{step}") as ckptr:
            ckptr.save(step, state(step))
        fresh = (tmp_path / f"fresh{step}" / str(step) / fmt.TREE).read_bytes()
        assert (tmp_path / "reused" / str(step) / fmt.TREE).read_bytes() == fresh, step
        assert fresh == json.dumps(json.loads(fresh), separators=(",", ":")).encode(), "what json.dumps writes"


def test_a_sync_save_holds_a_piece_of_the_packed_array_at_a_time_not_a_chunk(tmp_path):
    """A sync save to local files fills and writes the packed array by pieces (packing.piece_bytes), each
    chunk file the pieces one after another: 8 MiB of small leaves (two chunks) save with less than 0.6x
    their size in new memory, a fresh plan and a reused layout alike (1.27-1.35x when it filled a buffer
    of a whole chunk and more for each: issue 23's small leaves took 1.5x their 3.8 MiB)."""
    import tracemalloc

    state = {"w": [np.full(2048, i, np.float32) for i in range(1024)]}
    with ckpt.Checkpointer(tmp_path) as checkpointer:
        for step in (0, 1):
            tracemalloc.start()
            try:
                checkpointer.save(step, state, force=True)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 0.6 * (8 << 20), f"step {step}: {peak / (8 << 20):.2f}x the state"
            assert_same(checkpointer.load(step), state)


def test_a_sync_save_fills_pieces_sized_for_its_largest_packed_leaf(tmp_path, monkeypatch):
    """A sync save of leaves of 16 KiB at most fills pieces of 128 KiB (two alive at once before they shared one: issue 23's
    2,000 small leaves peaked 0.05x their 3.8 MiB higher with pieces of 256 KiB); one with a packed leaf over
    128 KiB fills pieces of 256 KiB, so that such a leaf is not copied again into each next piece."""
    sizes = []
    windows = packing.windows
    monkeypatch.setattr(packing, "windows", lambda fill, total, size: sizes.append(size) or windows(fill, total, size))
    small = {f"s{i}": np.full(i * 40 + 1, i, np.float32) for i in range(100)}
    larger = {**small, "x": np.ones(50_000, np.float32)}
    for step, (state, piece) in enumerate([(small, 128 << 10), (larger, 256 << 10)]):
        sizes.clear()
        with ckpt.Checkpointer(tmp_path / str(step)) as ckptr:
            ckptr.save(0, state, force=True)
            assert sizes == [piece], step
            assert_same(ckptr.load(0), state)
    assert packing.piece_bytes(0) == packing.piece_bytes(128 << 10) == 128 << 10
    assert packing.piece_bytes((128 << 10) + 1) == packing.piece_bytes(1 << 20) == 256 << 10


def test_a_sync_save_fills_every_piece_in_one_buffer(tmp_path, monkeypatch):
    """A sync save lets go of each piece of the packed array once written, so that the next is filled in the same
    buffer, a fresh plan and a reused layout alike (it filled two in turn: issue 23's 2,000 small leaves peaked
    0.04x their 3.8 MiB higher), and the files hold the leaves."""
    pools = []
    unreferenced = packing._unreferenced
    monkeypatch.setattr(packing, "_unreferenced", lambda pool, width: pools.append(pool) or unreferenced(pool, width))
    state = {f"s{i}": np.full(i * 40 + 1, i, np.float32) for i in range(200)}  # 3.2 MiB: 25 pieces
    with ckpt.Checkpointer(tmp_path) as ckptr:
        for step in (0, 1):
            pools.clear()
            ckptr.save(step, state, force=True)
            assert len(pools) > 20 and max(map(len, pools)) == 1, step
            assert_same(ckptr.load(step), state)
            assert verify.verify_step(tmp_path / str(step)).ok


def test_pieces_of_the_packed_array_make_the_files_and_checksums_a_snapshot_makes(tmp_path, monkeypatch):
    """With pieces of 1 KiB in chunks of 4 KiB (leaves across pieces and chunks, an edge chunk), sync
    saves (a fresh plan, a reused layout) write the tree.json (each leaf's CRC32, each chunk's word sum)
    and chunk files that async saves write from their snapshots' buffers, chunk by chunk."""
    monkeypatch.setattr(fmt, "PACKED_CHUNK_BYTES", 4096)
    monkeypatch.setattr(packing, "PIECE_BYTES", 1024)

    def state(seed: int) -> dict:
        return {"packable": packable_state(seed), "mixed": mixed_state(seed),
                "long": [np.full(700 + i, seed + i, np.float32) for i in range(3)]}

    for name, save in (("sync", ckpt.Checkpointer.save), ("async", ckpt.Checkpointer.save_async)):
        with ckpt.Checkpointer(tmp_path / name) as checkpointer:
            for step in (0, 1):
                save(checkpointer, step, state(step), force=True)
    for step in (0, 1):
        sync, snapshot = tmp_path / "sync" / str(step), tmp_path / "async" / str(step)
        assert (sync / fmt.TREE).read_bytes() == (snapshot / fmt.TREE).read_bytes()
        files, theirs = (sorted(p.relative_to(d) for p in (d / fmt.PACKED).rglob("*") if p.is_file()) for d in (sync, snapshot))
        assert len(files) > 4 and files == theirs
        assert all((sync / f).read_bytes() == (snapshot / f).read_bytes() for f in files)
        assert_same(ckpt.load(sync), state(step))
        assert verify.verify_step(sync).ok


@pytest.mark.parametrize("path, meta", [
    ("['a'][0].w", {"type": "numpy", "dtype": "float32", "shape": [3, 4]}),
    ("['\u00e9\"\\x\u2028']", {"type": "np_scalar", "dtype": "int64", "shape": []}),
    ("[1]", {"type": "float", "value": "nan"}), ("[2]", {"type": "bool", "value": True}),
    ("[3]", {"type": "str", "value": "\x00\u00e9\U0001f600"}), ("[4]", {"type": "none", "value": None}),
    ("[5]", {"type": "jax", "dtype": "float32", "shape": [1], "sharding": {"mesh": [["d", 1]], "spec": [None]}}),
    ("[6]", {"type": "numpy", "dtype": "float32", "shape": [True, 2]}),
])
def test_leaf_tables_are_what_json_dumps_writes_and_each_row_is_the_entry(path, meta):
    """A leaf's row, packed or not, is written as json.dumps writes the table, and reads back as its entry."""
    for span, crc, entry in (((64, 12), "7", {"path": path, **meta, "packed": [64, 12], "crc32": 7}),
                             (None, entries.NULL, {"path": path, **meta})):
        text = entries.table(entries.rows([path], [meta], [span]), [crc])
        columns = json.loads(text)
        assert text == json.dumps(columns, separators=(",", ":"))
        assert LeafTable(columns)[0] == entry
        twice = json.loads(entries.table(entries.rows([path, path], [meta, meta], [span, span]), [crc, crc]))
        assert LeafTable(twice)[1] == entry


def test_tree_json_is_written_from_the_table_text_a_layout_keeps(tmp_path):
    """A save's tree.json is written from its parts, with no copy of the whole document in memory (it took four:
    each table, the checkpointables' part, the whole text, its bytes), and a kept layout holds the columns of
    its leaf table that do not change as a few parts per checkpointable, the same tree.json as a fresh plan's."""
    import tracemalloc

    state = {"a": {f"leaf_{i}": np.full(i % 50 + 1, i, np.float32) for i in range(2000)}, "b": [np.int64(3)]}
    with ckpt.Checkpointer(tmp_path / "reused") as ckptr:
        ckptr.save(0, state, force=True)
        ckptr.save(1, state, force=True)
        layout = ckptr._staging.layout
        heads, more = layout.table_texts
        assert [type(part) for head in heads for part in head] == [bytes] * 15 and len(more) == 2001
    with ckpt.Checkpointer(tmp_path / "fresh") as ckptr:
        ckptr.save(1, state, force=True)
    document = (tmp_path / "fresh" / "1" / fmt.TREE).read_bytes()
    assert (tmp_path / "reused" / "1" / fmt.TREE).read_bytes() == document
    texts = entries.rows([f"['leaf_{i}']" for i in range(2000)], layout.meta[:2000], [(64 * i, 4) for i in range(2000)])
    tables = {"a": entries.table_parts(entries.head(texts), ["123456789"] * 2000, texts["more"])}
    tracemalloc.start()
    try:
        made = entries.tree_json({"a": layout.structures["state"]}, tables, None, {"nbytes": 1})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = sum(map(len, made))
    assert peak < 0.5 * size, f"{peak / size:.2f}x the document"
    assert json.loads(b"".join(made))["checkpointables"]["a"]["leaves"]["crc32"] == [123456789] * 2000


def test_a_layout_makes_its_table_text_with_few_of_its_leaves_texts_alive_at_once():
    """A layout's first tree.json makes the text of its tables' columns that do not change one column at a time,
    the texts of 256 leaves (a key path's, a span's) at a time: the peak stays under 2x the text kept (1.65x; it
    kept the texts of every field of every leaf, and each key path's text twice: 5.2x for these 5,000 leaves),
    and the text is the one the rows of every leaf make."""
    import tracemalloc

    state = {"a": {f"leaf_{i}": np.full(i % 50 + 1, i, np.float32) for i in range(4000)},
             "b": [np.int64(i) for i in range(1000)]}
    layout = saving.plan({"state": state, "other": {"x": np.ones(3)}}).layout
    tracemalloc.start()
    try:
        heads, more = layout.table_texts
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = sum(len(part) for head in heads for part in head) + 8 * len(more)
    assert peak < 2 * kept, f"{peak / kept:.2f}x the text kept"
    spans = [(offset, nbytes) if where == "packed" else None
             for where, offset, nbytes in zip(layout.location, layout.offset, layout.nbytes)]
    texts = entries.rows(tree_lib.keystrs(layout.paths), layout.meta, spans)
    assert heads == [entries.head({name: column[:5000] for name, column in texts.items()}),
                     entries.head({name: column[5000:] for name, column in texts.items()})]
    assert more == texts["more"]


@pytest.mark.parametrize("chunk", [64, 100, 4096])
def test_checksums_from_chunks_are_each_packed_leafs_crc32(chunk):
    """packing.Checksums takes each leaf's CRC32 from the chunks that hold it, whether it lies in one,
    spans several, is empty, or ends on a chunk's edge."""
    rng = np.random.default_rng(chunk)
    sizes = [int(n) for n in rng.choice([0, 1, 63, 64, 65, 200, 1000], 60)]
    spans, offset = [], 0
    for n in sizes:
        spans.append((offset, n))
        offset += packing.slot(n)
    data = rng.integers(0, 256, offset, dtype=np.uint8)
    crcs = packing.Checksums([a for a, _ in spans], [n for _, n in spans])
    for start in range(0, max(offset, 1), chunk):
        crcs.feed(start, data[start: start + chunk])
    assert crcs.values == [fmt.crc32(data[a: a + n].tobytes()) for a, n in spans]


def test_an_empty_leaf_listed_after_a_leaf_at_its_offset_leaves_that_leafs_bytes_and_crc32_whole(tmp_path):
    """packing.place puts a group of empty leaves where the next group begins: 'c', empty, lies at the offset
    of 'b', which runs over two pieces of a sync save. Was: the packed leaves were taken in offset order with 'c'
    after 'b' (their ends decreasing), so the fill of a plan's own (a tree holding a jax array) ended the first
    piece at 'c' and carried none of 'b' into the next: 'b' was saved with wrong bytes from its 262,144th on, which
    the load returned without a word (the chunk sums were taken from those bytes); and Checksums gave 'b' the CRC32
    of its first piece alone, so ckpt verify called the step damaged, with a reused layout too."""
    state = {"a": np.zeros(0, np.complex64), "b": jnp.arange(100_000, dtype=jnp.float32),
             "c": np.zeros(0, np.complex64), "d": np.ones(10, np.float32)}
    with ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save(1, state)
        ckptr.save(2, {**state, "b": np.asarray(state["b"])}, force=True)  # (a tree of numpy leaves: its layout)
        ckptr.save(3, state, force=True)
        for step in (1, 2, 3):
            np.testing.assert_array_equal(ckptr.load(step)["b"], np.arange(100_000, dtype=np.float32))
            result = verify.verify_step(tmp_path / str(step))
            assert result.ok, (step, [d.where for d in result.damaged])
    assert packing.in_order([0, 1, 2, 3], [0, 0, 0, 400_000], [0, 400_000, 0, 40]) == [0, 2, 1, 3]


def test_rows_keep_apart_shapes_that_compare_equal():
    """Shapes are encoded once per distinct shape: [1], [True] and [1.0] compare equal in Python but
    are three texts."""
    metas = [{"type": "numpy", "dtype": "float32", "shape": shape} for shape in ([1], [True], [1.0], [1])]
    assert entries.rows(["a", "b", "c", "d"], metas, [None] * 4)["shape"] == ["[1]", "[true]", "[1.0]", "[1]"]


def test_windows_fill_a_buffer_again_only_once_nothing_references_it():
    """packing.windows hands out each chunk in a buffer that no earlier chunk still held by the caller
    (or by a write in flight) shares, so chunks kept alive keep their bytes; a leaf that runs past a
    chunk begins the next one."""
    size, leaf = 64, np.arange(100, dtype=np.uint8)  # each leaf spans two chunks

    def fill(buffer: np.ndarray, lo: int, hi: int) -> int:  # a leaf starts in every other chunk
        if lo % 128:
            return 0
        buffer[: leaf.size] = leaf
        return leaf.size

    kept = [(start, chunk, chunk.copy()) for start, chunk in packing.windows(fill, 1024, size)]
    assert [start for start, _, _ in kept] == list(range(0, 1024, size))
    assert all(np.array_equal(chunk, copy) for _, chunk, copy in kept), "a kept chunk was overwritten"
    whole = np.concatenate([copy for _, _, copy in kept])
    assert np.array_equal(whole[:100], leaf) and np.array_equal(whole[128:228], leaf)
    dropped = [chunk.ctypes.data for _, chunk in packing.windows(fill, 1024, size)]  # each dropped at once
    assert len(set(dropped)) <= 3, "buffers nothing references are filled again"


def test_windows_carry_a_leaf_longer_than_a_chunk_within_one_buffer():
    """A leaf that runs past several chunks begins each next one from the same buffer (the carry moved to its
    start, over bytes it overlaps) when the caller lets go of each chunk before the next."""
    size, leaf = 64, np.arange(200, dtype=np.uint8)

    def fill(buffer: np.ndarray, lo: int, hi: int) -> int:  # a leaf starts at 0 and at 256
        if lo % 256:
            return 0
        buffer[: leaf.size] = leaf
        return leaf.size

    copies, addresses = [], set()
    for _, chunk in packing.windows(fill, 512, size):
        copies.append(chunk.copy())
        addresses.add(chunk.ctypes.data)
        del chunk
    whole = np.concatenate(copies)
    assert len(addresses) == 1
    assert np.array_equal(whole[:200], leaf) and np.array_equal(whole[256:456], leaf)


def test_place_lays_each_group_together_in_order_of_first_appearance():
    """packing.place: leaves of one type and dtype (and, when they fit one slot, shape) next to each
    other, groups in the order their first leaf comes, leaves in flatten order within a group."""
    def meta(dtype: str, shape: list[int]) -> dict:
        return {"type": "numpy", "dtype": dtype, "shape": shape}
    metas = [meta("float32", [100]), meta("int32", [100]), meta("float32", [200]), meta("float32", [2]),
             meta("int32", [100]), meta("float32", [2]), None]
    nbytes = [400, 400, 800, 8, 400, 8, 0]
    offset = [0] * len(metas)
    total = packing.place([0, 1, 2, 3, 4, 5], metas, nbytes, offset)
    order = sorted(range(6), key=offset.__getitem__)
    assert order == [0, 2, 1, 4, 3, 5]
    assert offset[:6] == [0, 1280, 448, 2176, 1728, 2240] and total == 2304  # slots of 448, 832 and 64 bytes
    assert all(o % fmt.ALIGN == 0 for o in offset)


def test_structure_text_is_what_json_dumps_writes_of_its_json():
    """ckpt.tree.to_text writes a structure as json.dumps writes {"t", "c", "k", "n"} objects."""
    import collections
    from ckpt import tree as tree_lib
    point = collections.namedtuple("Point", "x y")
    node, _ = tree_lib.flatten({"a": [1, (2.0, None)], 3: collections.OrderedDict(b=np.ones(2)), "p": point(1, [2]),
                                "e": {}, "l": []})
    leaf = {"t": "leaf"}
    expected = {"t": "dict", "c": [
        {"t": "list", "c": [leaf, {"t": "tuple", "c": [leaf, leaf]}]},
        {"t": "dict", "c": [leaf], "k": [["key", "b"]]},
        {"t": "namedtuple", "c": [leaf, {"t": "list", "c": [leaf]}], "k": [["attr", "x"], ["attr", "y"]], "n": "Point"},
        {"t": "dict", "c": [], "k": []}, {"t": "list", "c": []}],
        "k": [["key", "a"], ["key", 3], ["key", "p"], ["key", "e"], ["key", "l"]]}
    assert tree_lib.to_text(node) == json.dumps(expected, separators=(",", ":"))
    assert tree_lib.to_json(node) == expected


def test_the_packed_array_holds_zeros_between_its_leaves_whatever_its_buffers_held_before(tmp_path):
    """Every byte of the packed array that no leaf owns (each slot's padding) is zero, in a fresh plan's
    save, a reused layout's and an async one's, over chunks whose buffers held other leaves' bytes; and
    in a fresh plan's save of a tree with leaves on a device (jax), which copies each leaf for itself."""
    import tensorstore as ts

    rng = np.random.default_rng(3)
    state = {"arrays": [rng.integers(1, 255, int(n), np.uint8) for n in rng.integers(100_000, 900_000, 40)],
             "zero_d": [np.array(rng.integers(1, 99), np.int32) for _ in range(300)],
             "alone": [np.full(int(n), 7, np.int8) for n in rng.integers(1, 200, 30)],
             "scalars": [float(i) + 0.5 for i in range(50)], "odd": np.full(3, -1, np.int16)}
    state["arrays"][5::7] = [np.full(int(n), -3.0, np.float64) for n in rng.integers(1, 70_000, 5)]
    with ckpt.Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(0, state)
        checkpointer.save(1, state)
        checkpointer.save_async(2, state).result()
        checkpointer.save(3, {**state, "jax": [jnp.full(int(n), 9, jnp.int8) for n in rng.integers(1, 200, 30)]})
    for step in (0, 1, 2, 3):
        step_dir = tmp_path / str(step)
        table = read_tree(step_dir, read_manifest(step_dir))["checkpointables"]["state"]["leaves"]
        spans = [span for span in table.packed if span is not None]
        data = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / str(step) / fmt.PACKED)}},
                       open=True).result().read().result()
        assert data.size > 3 * fmt.PACKED_CHUNK_BYTES
        owned = np.zeros(data.size, bool)
        for offset, nbytes in spans:
            owned[offset: offset + nbytes] = True
        assert not data[~owned].any(), f"step {step}: stray bytes at {np.flatnonzero(data * ~owned)[:5]}"
