"""Damaged and hostile checkpoints: detected on load and by ``verify``, named by step and key path.

Damage: flipped bytes, truncated or missing files, a malformed manifest; each is caught by a checksum
(the manifest's own, tree.json's, each chunk's word sum on load, each leaf's or chunk's CRC32 in
``verify``) or by a missing-file check. Hostile manifests (consistent checksums, paths that reach outside the step, object
dtypes) are refused, and loading never runs pickle or eval.
"""
from __future__ import annotations

import builtins
import logging
import marshal
import os
import pickle
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import ckpt
from ckpt import errors
from ckpt import format as fmt
from ckpt import schema
from ckpt.training import Checkpointer
from ckpt.verify import verify_step
from tests import fsutil
from tests.fsutil import flip, rewrite_tree, tree_doc, without_word_sums

STATE = {"big": np.arange(140_000, dtype=np.float64), "s": np.arange(3.0), "t": np.arange(5), "n": 7}
BIG, SMALL_LEAVES = "state['big']", ("state['s']", "state['t']")


@pytest.fixture
def root(tmp_path) -> Path:
    """A root with steps 0 and 1 of STATE: ``big`` has its own array, ``s`` and ``t`` are packed, ``n`` inline."""
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, STATE, force=True)
        ckptr.save(1, STATE, force=True)
    return tmp_path


def packed_offset(step_dir: Path, key_path: str) -> int:
    leaves = tree_doc(step_dir)["checkpointables"]["state"]["leaves"]
    return next(leaf["packed"][0] for leaf in leaves if leaf["path"] == key_path.removeprefix("state"))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def remove(path: Path) -> None:
    path.unlink()


def garbage(path: Path) -> None:
    path.write_text("{not json")


DATA_DAMAGE: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    # name: (file in the step, how it is damaged, the key paths the error must name)
    "array chunk flipped": ("arrays/0/c/0", flip, (BIG,)),
    "array chunk truncated": ("arrays/0/c/0", truncate, (BIG,)),
    "array chunk missing": ("arrays/0/c/0", remove, (BIG,)),
    "packed leaf flipped": ("packed/c/0", lambda p: flip(p, packed_offset(p.parents[2], "state['s']")), ("state['s']",)),
    "packed chunk truncated": ("packed/c/0", truncate, SMALL_LEAVES),
    "packed chunk missing": ("packed/c/0", remove, SMALL_LEAVES),
}

# zarr.json is what other readers (plain tensorstore, zarr) need; a load reads the chunks from tree.json.
METADATA_DAMAGE: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    "array zarr.json flipped": ("arrays/0/zarr.json", flip, (BIG,)),
    "array zarr.json missing": ("arrays/0/zarr.json", remove, (BIG,)),
    "packed zarr.json garbage": ("packed/zarr.json", garbage, SMALL_LEAVES),
}


@pytest.mark.parametrize("case", list(DATA_DAMAGE))
def test_damaged_data_fails_the_load_naming_the_step_and_key_path_and_verify_finds_it(root, case):
    rel, damage, key_paths = DATA_DAMAGE[case]
    step_dir = root / "1"
    damage(step_dir / rel)
    with Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1]  # the manifest is fine: listed, and then
        with pytest.raises(errors.CheckpointCorruptedError) as info:
            ckptr.load(1)
        np.testing.assert_array_equal(ckptr.load(0)["big"], STATE["big"])
    error = info.value
    assert error.path == step_dir and str(step_dir) in str(error)
    assert set(key_paths) <= set(error.key_paths) and all(k in str(error) for k in key_paths)
    result = verify_step(step_dir)
    assert not result.ok and {d.where for d in result.damaged} == set(key_paths)
    assert verify_step(root / "0").ok


def test_a_damaged_packed_chunk_names_the_leaves_it_holds_and_leaves_elsewhere_still_load(tmp_path):
    # Six leaves just under the small-leaf limit: the packed array spans two 4 MiB chunks.
    state = {f"l{i}": np.full(250_000, i, np.float32) for i in range(6)}
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, state, force=True)
    leaves = tree_doc(tmp_path / "0")["checkpointables"]["state"]["leaves"]
    ranges = {leaf["path"]: leaf["packed"] for leaf in leaves}
    chunk = fmt.PACKED_CHUNK_BYTES
    in_second = {p for p, (offset, nbytes) in ranges.items() if offset + nbytes > chunk}
    only_first = set(ranges) - in_second
    assert in_second and only_first
    flip(tmp_path / "0" / fmt.PACKED / "c" / "1", 10)
    with pytest.raises(errors.CheckpointCorruptedError) as info:
        ckpt.load(tmp_path / "0")
    assert {f"state{p}" for p in in_second} == set(info.value.key_paths)
    first = sorted(only_first)[0].strip("[']")
    partial = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
    with Checkpointer(tmp_path, context=partial) as ckptr:
        loaded = ckptr.load(0, abstract_state={first: state[first]})
    np.testing.assert_array_equal(loaded[first], state[first])


def test_a_partial_load_ignores_a_damaged_packed_chunk_between_the_leaves_it_loads(tmp_path):
    # Twelve leaves of 1 MB: the packed array spans three chunks; the first and last leaf sit in the
    # outer chunks, and the middle chunk (read with them, holding none of them) is damaged.
    state = {f"l{i:02d}": np.full(250_000, i, np.float32) for i in range(12)}
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, state, force=True)
    leaves = tree_doc(tmp_path / "0")["checkpointables"]["state"]["leaves"]
    chunk = fmt.PACKED_CHUNK_BYTES
    ranges = {leaf["path"].strip("[']"): leaf["packed"] for leaf in leaves}
    assert ranges["l00"][0] + ranges["l00"][1] <= chunk and ranges["l11"][0] >= 2 * chunk
    flip(tmp_path / "0" / fmt.PACKED / "c" / "1", 10)
    partial = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
    with Checkpointer(tmp_path, context=partial) as ckptr:
        loaded = ckptr.load(0, abstract_state={"l00": state["l00"], "l11": state["l11"]})
        with pytest.raises(errors.CheckpointCorruptedError) as info:
            ckptr.load(0, abstract_state={"l00": state["l00"], "l05": state["l05"]})
    np.testing.assert_array_equal(loaded["l00"], state["l00"])
    np.testing.assert_array_equal(loaded["l11"], state["l11"])
    assert info.value.key_paths == ("state['l05']",)


@pytest.mark.parametrize("case", list(METADATA_DAMAGE))
def test_a_damaged_zarr_json_is_found_by_verify_and_the_load_still_returns_the_saved_data(root, case):
    rel, damage, key_paths = METADATA_DAMAGE[case]
    damage(root / "1" / rel)
    with Checkpointer(root) as ckptr:
        loaded = ckptr.load(1)
    assert set(loaded) == set(STATE) and all(np.array_equal(loaded[k], v) for k, v in STATE.items())
    result = verify_step(root / "1")
    assert not result.ok and {d.where for d in result.damaged} == set(key_paths)


STRUCTURE_DAMAGE = {
    "tree.json flipped": (fmt.TREE, flip),
    "tree.json truncated": (fmt.TREE, truncate),
    "tree.json missing": (fmt.TREE, remove),
    "manifest flipped": (fmt.MANIFEST, flip),
    "manifest truncated": (fmt.MANIFEST, truncate),
    "manifest garbage": (fmt.MANIFEST, garbage),
    "manifest missing": (fmt.MANIFEST, remove),
}


@pytest.mark.parametrize("case", list(STRUCTURE_DAMAGE))
def test_a_damaged_manifest_or_tree_fails_the_load_naming_the_file_and_verify_finds_it(root, case):
    name, damage = STRUCTURE_DAMAGE[case]
    step_dir = root / "1"
    with Checkpointer(root) as ckptr:  # listed before the damage
        damage(step_dir / name)
        with pytest.raises(errors.CheckpointCorruptedError) as info:
            ckptr.load(1)
    assert info.value.path == step_dir and str(step_dir / name) in str(info.value)
    result = verify_step(step_dir)
    assert not result.ok and [d.where for d in result.damaged] == [name]


@pytest.mark.parametrize("case", [c for c in STRUCTURE_DAMAGE if c.startswith("manifest")])
def test_a_step_with_a_damaged_manifest_is_not_listed_and_latest_is_the_step_before(root, case, caplog):
    name, damage = STRUCTURE_DAMAGE[case]
    damage(root / "1" / name)
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
        assert ckptr.latest.step == 0
        np.testing.assert_array_equal(ckptr.load()["big"], STATE["big"])
    assert any("step 1" in r.getMessage() and fmt.MANIFEST in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["manifest truncated", "manifest missing"])
def test_a_deletion_of_a_step_with_a_damaged_manifest_is_refused_saying_how_to_remove_it(root, case, caplog):
    """ckpt keeps a damaged step; its refusals said only 'it was not deleted' and 'no checkpoint at step 1'."""
    name, damage = STRUCTURE_DAMAGE[case]
    damage(root / "1" / name)
    remove_it = f"; to remove it, delete it yourself (`rm -r {root / '1'}`; `ckpt verify` says what is damaged)"
    with pytest.raises(errors.NotACheckpointError, match=re.escape(f"it was not deleted{remove_it}")):
        ckpt.delete(root / "1")
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(root) as ckptr:
        with pytest.raises(errors.StepNotFoundError) as info:
            ckptr.delete(1)
    assert str(info.value).startswith(f"no checkpoint at step 1 in {root} (steps: [0]); {root / '1'} holds a ")
    assert str(info.value).endswith(remove_it) and any(remove_it in r.getMessage() for r in caplog.records)
    assert (root / "1").is_dir()


@pytest.mark.parametrize("case", ["manifest truncated", "manifest missing"])
def test_a_save_over_a_step_with_a_damaged_manifest_is_refused_as_damaged_not_as_a_users(root, case):
    """Was: '... which ckpt did not write', of a step ckpt wrote, and nothing on how to remove it."""
    name, damage = STRUCTURE_DAMAGE[case]
    damage(root / "1" / name)
    with Checkpointer(root) as ckptr, pytest.raises(errors.ForeignEntryError) as info:
        ckptr.save(1, STATE, force=True, overwrite=True)
    assert "; a damaged checkpoint, which ckpt never overwrites, renames or deletes, even with overwrite=True" in \
        str(info.value) and "did not write" not in str(info.value)
    assert str(info.value).endswith(f"; to remove it, delete it yourself (`rm -r {root / '1'}`; `ckpt verify` says "
                                    "what is damaged).")


def test_a_step_a_newer_ckpt_wrote_is_never_said_to_be_removed(root, caplog):
    """A healthy step of a newer format version was called damaged, and every refusal said to `rm -r` it."""
    manifest = schema.read_manifest(root / "1")
    (root / "1" / fmt.MANIFEST).write_bytes(fmt.sealed_manifest({**manifest, "version": max(fmt.READ_VERSIONS) + 1}))
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
        with pytest.raises(errors.StepNotFoundError) as deleted:
            ckptr.delete(1)
        with pytest.raises(errors.ForeignEntryError) as saved:
            ckptr.save(1, STATE, force=True, overwrite=True)
    with pytest.raises(errors.NotACheckpointError) as freed:
        ckpt.delete(root / "1")
    said = caplog.text + str(deleted.value) + str(saved.value) + str(freed.value)
    assert "a newer ckpt wrote it, upgrade ckpt to read it" in caplog.text and "rm -r" not in said
    assert "; ckpt never overwrites, renames or deletes a checkpoint it cannot read, even with overwrite=True" in \
        str(saved.value) and "damaged" not in str(saved.value)
    assert (root / "1" / fmt.MANIFEST).is_file()



def test_a_step_whose_manifest_this_process_may_not_read_is_never_said_to_be_removed(caplog):
    """Another user's healthy step whose manifest.json this process may not read (mode 0600, in a shared root) was
    called damaged, and the warning at open, load's StepNotFoundError and ckpt.delete's refusal said to `rm -r` it."""
    with fsutil.shared_directory() as base:
        run = base / "run"
        with Checkpointer(run) as ckptr:
            for step in (0, 1):
                ckptr.save(step, STATE, force=True)
        os.chmod(run / "1" / fmt.MANIFEST, 0o600)
        with fsutil.without_root():
            with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(run) as ckptr:
                assert [c.step for c in ckptr.checkpoints] == [0]
                with pytest.raises(errors.StepNotFoundError) as loaded:
                    ckptr.load(1)
            with pytest.raises(errors.NotACheckpointError) as freed:
                ckpt.delete(run / "1")
        said = caplog.text + str(loaded.value) + str(freed.value)
        assert f"Permission denied: '{run / '1' / fmt.MANIFEST}'" in str(loaded.value) and "rm -r" not in said
        assert (run / "1" / fmt.MANIFEST).is_file()

# ---------------------------------------------------------------------------------- hostile manifests
@pytest.mark.parametrize("damaged, key_paths", [(None, ()), ("arrays/0/c/0", (BIG,)), ("packed/c/0", ("state['s']",))])
def test_a_step_saved_without_word_sums_is_checked_against_its_crc32s(root, damaged, key_paths):
    rewrite_tree(root / "1", without_word_sums)
    if damaged:
        flip(root / "1" / damaged, 8)
    with Checkpointer(root) as ckptr:
        if not damaged:
            loaded = ckptr.load(1)
            assert all(np.array_equal(loaded[k], v) for k, v in STATE.items())
            return
        with pytest.raises(errors.CheckpointCorruptedError, match="CRC32") as info:
            ckptr.load(1)
    assert info.value.key_paths == key_paths


def big_leaf(tree: dict) -> dict:
    return next(leaf for leaf in tree["checkpointables"]["state"]["leaves"] if leaf["path"] == "['big']")


def small_leaf(tree: dict) -> dict:
    return next(leaf for leaf in tree["checkpointables"]["state"]["leaves"] if leaf["path"] == "['s']")


HOSTILE = {
    "absolute path": lambda root: lambda t: big_leaf(t)["array"]["kvstore"].update(path=f"{root}/0/arrays/0/"),
    "parent path": lambda root: lambda t: big_leaf(t)["array"]["kvstore"].update(path="../0/arrays/0/"),
    "memory driver": lambda root: lambda t: big_leaf(t)["array"]["kvstore"].update(driver="memory"),
    "http driver": lambda root: lambda t: big_leaf(t)["array"].update(
        kvstore={"driver": "http", "base_url": "http://127.0.0.1:9/"}),
    "extra kvstore option": lambda root: lambda t: big_leaf(t)["array"]["kvstore"].update(file_io_sync=False),
    "another tensorstore driver": lambda root: lambda t: big_leaf(t)["array"].update(driver="json"),
    "packed array outside": lambda root: lambda t: t["packed"]["spec"]["kvstore"].update(path=f"{root}/0/packed/"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_manifest_cannot_point_outside_its_step_directory(root, case):
    step_dir = root / "1"
    rewrite_tree(step_dir, HOSTILE[case](root))
    with pytest.raises(errors.CheckpointCorruptedError, match="not a relative path inside the step directory") as info:
        with Checkpointer(root) as ckptr:
            ckptr.load(1)
    assert info.value.path == step_dir and info.value.key_paths
    result = verify_step(step_dir)
    assert not result.ok and all("not a relative path inside the step directory" in d.why for d in result.damaged)


FORGED_CHUNKS = {  # tree.json that ckpt's save never writes, every checksum agreeing
    "a CRC32 missing": (BIG, "lists 0 chunk checksums for 1 chunks",
                        lambda t: big_leaf(t)["chunk_crc32"].pop()),
    "a word sum missing": (BIG, "lists 0 chunk checksums for 1 chunks",
                           lambda t: big_leaf(t)["chunk_sum64"].pop()),
    "a compressing codec": (BIG, "not plain slabs", lambda t: big_leaf(t)["array"]["metadata"]["codecs"].append(
        {"name": "zstd", "configuration": {"level": 1}})),
    "packed word sums cut": (SMALL_LEAVES[0], "lists 0 chunk checksums for 1 chunks",
                             lambda t: t["packed"].update(chunk_sum64=[])),
    "packed codecs reordered": (SMALL_LEAVES[0], "not plain slabs",
                                lambda t: t["packed"]["spec"]["metadata"]["codecs"].insert(0, {"name": "transpose"})),
}


@pytest.mark.parametrize("case", list(FORGED_CHUNKS))
def test_chunk_checksums_that_do_not_fit_the_array_fail_the_load_naming_the_leaf(root, case):
    where, why, mutate = FORGED_CHUNKS[case]
    rewrite_tree(root / "1", mutate)
    with Checkpointer(root) as ckptr:
        with pytest.raises(errors.CheckpointCorruptedError, match=why) as info:
            ckptr.load(1)
        assert where in info.value.key_paths
        np.testing.assert_array_equal(ckptr.load(0)["big"], STATE["big"])


@pytest.mark.parametrize("dtype", ["O", "i4,O", "finfo"])
def test_a_manifest_naming_an_object_dtype_is_refused(root, dtype):
    rewrite_tree(root / "1", lambda t: small_leaf(t).update(dtype=dtype))
    with pytest.raises(ValueError, match="not a dtype ckpt stores"):
        with Checkpointer(root) as ckptr:
            ckptr.load(1)


def test_loading_never_unpickles_or_evaluates(root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading a checkpoint ran pickle, marshal or eval")

    every_leaf = {"array": np.arange(3), "scalar": np.float32(2), "bytes": b"\x00\x01", "str": "s", "int": 3,
                  "float": float("nan"), "bool": True, "none": None, "tuple": (1, [2.0])}
    with Checkpointer(root / "leaves") as ckptr:
        ckptr.save(0, every_leaf, force=True)
        for module, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (marshal, "loads"),
                             (builtins, "eval"), (builtins, "exec")]:
            monkeypatch.setattr(module, name, refuse)
        loaded = ckptr.load()
    monkeypatch.undo()
    assert loaded["bytes"] == b"\x00\x01" and loaded["tuple"] == (1, [2.0]) and np.isnan(loaded["float"])
