"""Nothing ckpt did not write is ever overwritten, renamed or deleted: not by a save (even with
force and overwrite), the writer's sweep of leftovers, cleanup_tmp_directories or garbage collection.
Each kind of foreign entry is put in a root, every writing path is run, and the root's names and file
bytes are compared before and after."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import traceback
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import cli, errors, root, storage
from ckpt import format as fmt
from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp
from tests import fsutil, procs

ALWAYS = sdp.FixedIntervalPolicy(1)
STATE = {"w": np.arange(4.0)}


def _elsewhere(tmp_path: Path) -> Path:
    """A directory outside the root with data in it (what a symbolic link may point at)."""
    other = tmp_path / "elsewhere"
    other.mkdir(exist_ok=True)
    (other / "data.bin").write_bytes(b"precious" * 100)
    return other


def _orbax_step(path: Path) -> None:
    path.mkdir()
    (path / "_CHECKPOINT_METADATA").write_text('{"item_handlers": {"state": "PyTreeCheckpointHandler"}}')
    (path / "state").mkdir()
    (path / "state" / "_METADATA").write_text('{"tree_metadata": {}}')


def _ckpt_step_of_another_root(tmp_path: Path) -> Path:
    other = tmp_path / "other-root"
    with Checkpointer(other) as ckptr:
        ckptr.save(0, {"other": np.ones(3)})
    return other / "0"


def _make(kind: str, path: Path, tmp_path: Path) -> str:
    """Puts a foreign entry of ``kind`` at ``path``; returns a word its description must contain."""
    if kind == "directory":
        path.mkdir()
        (path / "notes.txt").write_text("the user's own notes")
        return "notes.txt"
    if kind == "empty-directory":
        path.mkdir()
        return "empty directory"
    if kind == "orbax-step":
        _orbax_step(path)
        return "Orbax"
    if kind == "unreadable-orbax-step":
        _orbax_step(path)
        (path / "_CHECKPOINT_METADATA").write_text("{not json")
        return "Orbax"
    if kind == "file":
        path.write_bytes(b"a file of the user's")
        return "regular file"
    if kind == "fifo":
        os.mkfifo(path)
        return "special file"
    if kind == "symlink-to-directory":
        path.symlink_to(_elsewhere(tmp_path), target_is_directory=True)
        return "symbolic link"
    if kind == "symlink-to-another-root's-step":
        path.symlink_to(_ckpt_step_of_another_root(tmp_path), target_is_directory=True)
        return "symbolic link"
    if kind == "manifest-is-a-directory":
        path.mkdir()
        (path / fmt.MANIFEST).mkdir()
        (path / fmt.MANIFEST / "x").write_text("x")
        return "not a regular file"
    if kind == "unreadable-manifest":
        path.mkdir()
        (path / fmt.MANIFEST).write_text('{"format": "something else"}')
        return "cannot read"
    if kind == "tensorflow-model":  # TensorFlow's text file named checkpoint is no Orbax item's
        (path / "tf_model").mkdir(parents=True)
        (path / "tf_model" / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
        return "tf_model"
    if kind == "directory-named-checkpoint":
        (path / "model" / "checkpoint").mkdir(parents=True)
        (path / "model" / "checkpoint" / "notes.txt").write_text("the user's own notes")
        return "model"
    raise AssertionError(kind)


KINDS = ["directory", "empty-directory", "unreadable-orbax-step", "file", "fifo", "symlink-to-directory",
         "symlink-to-another-root's-step", "manifest-is-a-directory", "unreadable-manifest", "tensorflow-model",
         "directory-named-checkpoint"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_foreign_entry_at_a_step_name_is_skipped_refused_and_never_touched(tmp_path, kind, caplog):
    root = tmp_path / "root"
    with Checkpointer(root, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(5, STATE)
        ckptr.save(6, STATE)
    word = _make(kind, root / "7", tmp_path)
    whole = fsutil.snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        ckptr = Checkpointer(root, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1),
                             cleanup_tmp_directories=True)
    with ckptr:
        assert [c.step for c in ckptr.checkpoints] == [5, 6]
        assert f"skipping {root / '7'}" in caplog.text and word in caplog.text
        for how in ("save", "save_async"):
            with pytest.raises(errors.ForeignEntryError) as info:
                getattr(ckptr, how)(7, STATE, force=True, overwrite=True)
            assert str(root / "7") in str(info.value) and word in str(info.value)
            assert info.value.path == root / "7"
            assert fsutil.snapshot(tmp_path) == whole
        ckptr.save(8, STATE)  # garbage collection deletes 5 and 6, never 7
        ckptr.save(9, STATE)
        assert [c.step for c in ckptr.checkpoints] == [9]
    after = fsutil.snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("root/") or k.startswith("root/7")} == \
           {k: v for k, v in whole.items() if not k.startswith("root/") or k.startswith("root/7")}
    assert sorted(os.listdir(root)) == [fmt.LOCK, "7", "9"]


@pytest.mark.parametrize("kind", ["directory", "file", "symlink-to-directory", "fifo"])
@pytest.mark.parametrize("suffix", [fmt.TMP_SUFFIX, fmt.DELETING_SUFFIX])
def test_a_foreign_entry_named_like_a_temporary_is_never_removed_and_other_saves_go_on(tmp_path, kind, suffix):
    root = tmp_path / "root"
    root.mkdir()
    _make(kind, root / f"3{suffix}", tmp_path)
    whole = fsutil.snapshot(tmp_path)
    with Checkpointer(root, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1),
                      cleanup_tmp_directories=True) as ckptr:
        for step in (0, 1, 2, 4):
            assert ckptr.save(step, STATE)
        if suffix == fmt.TMP_SUFFIX:  # step 3's temporary name is taken: that one save is refused
            with pytest.raises(errors.ForeignEntryError) as info:
                ckptr.save(3, STATE, force=True)
            assert str(root / f"3{suffix}") in str(info.value) and fmt.MARKER in str(info.value)
        assert [c.step for c in ckptr.checkpoints] == [4]
    with Checkpointer(root, cleanup_tmp_directories=True):
        pass
    after = fsutil.snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("root/4")} == \
           {k: v for k, v in whole.items()} | {"root/" + fmt.LOCK: after["root/" + fmt.LOCK]}


def test_an_empty_directory_named_like_a_step_set_aside_is_never_put_back_as_the_step(tmp_path, caplog):
    """A step a crash left set aside (``<step>.ckpt-replaced``) holds ckpt's marker, as the commit marks it
    before it sets it aside: an empty directory of that name is no such step, and renaming it to the step's
    name made an empty directory there (a foreign entry a save of the step refuses)."""
    root = tmp_path / "root"
    root.mkdir()
    for name in ("7", "data"):
        (root / f"{name}{fmt.REPLACED_SUFFIX}").mkdir()
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(root) as ckptr:
        assert ckptr.checkpoints == []
        assert not os.path.lexists(root / "7") and not os.path.lexists(root / "data")
        assert "put back" not in caplog.text
        assert ckptr.save(7, STATE, force=True)
        assert ckptr.load(7)["w"].tolist() == STATE["w"].tolist()


@pytest.mark.parametrize("lightweight", [False, True])
def test_a_step_whose_manifest_is_a_link_a_fifo_or_a_directory_is_never_listed(tmp_path, lightweight, caplog):
    """Each is a complete copy of a committed step but for its manifest.json; the listing, which takes a
    directory with a regular manifest.json for a step at once, skips them with or without reading manifests."""
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(0, STATE)
    for step in (1, 2, 3):
        shutil.copytree(root / "0", root / str(step), copy_function=os.link)
        (root / str(step) / fmt.MANIFEST).unlink()
    (root / "1" / fmt.MANIFEST).symlink_to(root / "0" / fmt.MANIFEST)
    os.mkfifo(root / "2" / fmt.MANIFEST)
    shutil.copytree(root / "0", root / "3" / fmt.MANIFEST)
    (root / "4").symlink_to(root / "0", target_is_directory=True)
    whole = fsutil.snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(root, lightweight_initialize=lightweight) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
    for step in (1, 2, 3, 4):
        assert f"skipping {root / str(step)}" in caplog.text
    assert fsutil.snapshot(tmp_path) == whole


def test_an_orbax_step_is_listed_but_never_overwritten(tmp_path):
    _orbax_step(tmp_path / "7")
    before = fsutil.snapshot(tmp_path)
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [7]
        with pytest.raises(errors.StepAlreadyExistsError):
            ckptr.save(7, STATE, force=True)
        with pytest.raises(errors.ForeignEntryError, match=f"{tmp_path / '7'} holds a step Orbax wrote"):
            ckptr.save(7, STATE, force=True, overwrite=True)
    assert fsutil.snapshot(tmp_path) == before


def test_temporaries_ckpt_made_are_removed_and_empty_ones_too(tmp_path):
    root = tmp_path / "root"
    with Checkpointer(root, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, STATE)
    leftover = root / f"1{fmt.TMP_SUFFIX}"
    (leftover / "arrays").mkdir(parents=True)
    (leftover / fmt.MARKER).write_text("")  # what a crashed save of ckpt's leaves
    (root / f"2{fmt.TMP_SUFFIX}").mkdir()  # a crash between making a temporary and marking it
    with Checkpointer(root, cleanup_tmp_directories=True) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
    assert sorted(os.listdir(root)) == [fmt.LOCK, "0"]


def test_a_committed_step_is_replaced_only_with_overwrite_and_keeps_no_temporary(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, {"w": np.zeros(3)})
        with pytest.raises(errors.StepAlreadyExistsError):
            ckptr.save(0, {"w": np.ones(3)}, force=True)
        ckptr.save(0, {"w": np.ones(3)}, force=True, overwrite=True)
        np.testing.assert_array_equal(ckptr.load(0)["w"], np.ones(3))
    assert sorted(os.listdir(tmp_path)) == [fmt.LOCK, "0"]


def test_a_step_replaced_by_something_foreign_after_listing_is_not_garbage_collected(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1)) as ckptr:
        ckptr.save(0, STATE)
        shutil.rmtree(tmp_path / "0")  # another hand puts something of its own at step 0's name
        _make("directory", tmp_path / "0", tmp_path)
        before = fsutil.snapshot(tmp_path / "0")
        with pytest.raises(OSError, match=r"committed, but garbage collection could not delete: step 0") as info:
            ckptr.save(1, STATE)
        assert "notes.txt" in str(info.value)
        assert ckptr.latest.step == 1
    assert fsutil.snapshot(tmp_path / "0") == before


@pytest.mark.parametrize("kind", ["symlink-to-another-root's-step", "file"])
def test_a_listed_step_replaced_by_a_link_or_a_file_is_not_read_through_it(tmp_path, kind):
    with Checkpointer(tmp_path / "run", save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, STATE)
        ckptr.save(1, STATE)
        (tmp_path / "run" / "1").rename(tmp_path / "moved")  # another hand puts something at step 1's name
        word = _make(kind, tmp_path / "run" / "1", tmp_path)
        with pytest.raises(errors.StepNotFoundError, match=f"step 1 .*{word}"):
            ckptr.load(1)
        assert [c.step for c in ckptr.checkpoints] == [0]
        with pytest.raises(errors.StepNotFoundError):
            ckptr.metadata(1)


@pytest.mark.parametrize("kind", ["directory", "empty-directory", "orbax-step", "file", "symlink-to-directory"])
def test_the_free_save_never_overwrites_a_foreign_path_or_its_temporary_name(tmp_path, kind):
    target = tmp_path / "model"
    word = _make(kind, target, tmp_path)
    whole = fsutil.snapshot(tmp_path)
    for overwrite in (False, True) if kind != "empty-directory" else (False,):  # (see the test below)
        with pytest.raises(errors.ForeignEntryError if kind != "empty-directory" else errors.StepAlreadyExistsError,
                           match="pass overwrite=True" if kind == "empty-directory" else None) as info:
            ckpt.save(target, STATE, overwrite=overwrite)
        assert str(target) in str(info.value) and word in str(info.value)
    assert fsutil.snapshot(tmp_path) == whole

    other = tmp_path / "other"
    _make(kind, tmp_path / f"other{fmt.TMP_SUFFIX}", tmp_path)
    if kind == "empty-directory":  # holds nothing to lose: what a crash right after making a temporary leaves
        ckpt.save(other, STATE)
        assert not (tmp_path / f"other{fmt.TMP_SUFFIX}").exists()
        return
    whole = fsutil.snapshot(tmp_path)
    with pytest.raises(errors.ForeignEntryError, match=f"other{fmt.TMP_SUFFIX}"):
        ckpt.save(other, STATE)
    assert fsutil.snapshot(tmp_path) == whole


@pytest.mark.parametrize("filled", [None, "while written", "after the last check"])
def test_the_free_save_takes_an_empty_directory_with_overwrite_only_while_it_is_empty_keeping_its_mode(
        tmp_path, monkeypatch, filled):
    """As Orbax's save does (ckpt.save(tmp_path, state, overwrite=True) into a directory made for it); it raised
    ForeignEntryError. The commit renames over the directory, which the kernel refuses once anything is in it.
    A private directory (mkdtemp's 0o700) stays so: it became 0o755, the checkpoint readable by every user."""
    target = tmp_path / "model"
    target.mkdir()
    os.chmod(target, 0o700)
    check_target = ckpt.root.check_target

    def fill(*args, **kwargs):
        empty = check_target(*args, **kwargs)
        if filled == "after the last check" and args[0] == args[1]:  # (the commit's check of the name)
            (target / "notes.txt").write_text("the user's own notes")
        return empty

    write_manifest = ckpt.saving.StepWriter.write_manifest

    def meanwhile(writer, *args, **kwargs):  # the last write before the commit
        (target / "notes.txt").write_text("the user's own notes")
        return write_manifest(writer, *args, **kwargs)

    monkeypatch.setattr(ckpt.root, "check_target", fill)
    if filled == "while written":
        monkeypatch.setattr(ckpt.saving.StepWriter, "write_manifest", meanwhile)
    if filled is None:
        ckpt.save(target, {"w": np.ones(2)}, overwrite=True)
        np.testing.assert_array_equal(ckpt.load(target)["w"], np.ones(2))
        assert oct(os.stat(target).st_mode & 0o7777) == oct(0o700)
    else:
        with pytest.raises(errors.ForeignEntryError, match="notes.txt"):
            ckpt.save(target, {"w": np.ones(2)}, overwrite=True)
        assert sorted(os.listdir(target)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # (no temporary left)


@pytest.mark.parametrize("mount", ["tmpfs", "bind mount of its own file system"])
def test_the_free_save_never_takes_an_empty_mount_point_for_an_empty_directory_it_may_replace(tmp_path, mount):
    """A volume mounted where the checkpoint goes (a container's, a tmpfs) cannot be renamed over: the save
    wrote everything, then raised OSError [Errno 16] Device or resource busy at its commit."""
    target = tmp_path / "volume"
    target.mkdir()
    if mount == "tmpfs":
        mounted = fsutil.tmpfs(target)
    else:
        result = subprocess.run(["mount", "--bind", str(target), str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot bind-mount (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounted = contextlib.ExitStack()
        mounted.callback(fsutil.unmount, target)
    with mounted:  # (os.path.ismount misses a bind mount of its own file system: the commit's rename refuses it)
        for overwrite in (False, True) if mount == "tmpfs" else (True,):
            with pytest.raises(errors.ForeignEntryError, match="volume: it is a mount point"):
                ckpt.save(target, STATE, overwrite=overwrite)
            assert os.listdir(target) == [] and os.listdir(tmp_path) == ["volume"]
        ckpt.save(target / "checkpoint", STATE)
        np.testing.assert_array_equal(ckpt.load(target / "checkpoint")["w"], STATE["w"])


def test_the_free_save_replaces_a_checkpoint_of_its_own_with_overwrite(tmp_path):
    ckpt.save(tmp_path / "model", {"w": np.zeros(2)})
    with pytest.raises(errors.StepAlreadyExistsError):
        ckpt.save(tmp_path / "model", {"w": np.ones(2)})
    ckpt.save(tmp_path / "model", {"w": np.ones(2)}, overwrite=True)
    np.testing.assert_array_equal(ckpt.load(tmp_path / "model")["w"], np.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_find_all_leaves_out_foreign_entries(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, STATE)
    _make("directory", tmp_path / "3", tmp_path)
    _make("file", tmp_path / "4", tmp_path)
    assert ckpt.path.step.find_all(tmp_path) == {0: "0"}


def test_on_s3_only_uncommitted_steps_ckpt_began_are_removed_and_foreign_prefixes_stay(bucket):
    from ckpt.objectstore import ObjectPath

    root = ObjectPath(bucket)
    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, STATE)
    (root / "7" / "notes.txt").write_bytes(b"the user's own notes")  # neither a manifest nor ckpt's marker
    (root / "8" / fmt.MARKER).write_bytes(b"")  # a save of ckpt's, killed before its manifest
    (root / "8" / "tree.json").write_bytes(b"{}")
    with Checkpointer(bucket, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1)) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
        with pytest.raises(errors.ForeignEntryError, match=f"{bucket}/7 holds a directory holding 'notes.txt'"):
            ckptr.save(7, STATE, force=True, overwrite=True)
        ckptr.save(9, STATE)
        ckptr.save(10, STATE)
        ckptr.save(10, {"w": np.ones(2)}, force=True, overwrite=True)  # a step of ckpt's is replaced in place
        assert [c.step for c in ckptr.checkpoints] == [10]
        np.testing.assert_array_equal(ckptr.load(10)["w"], np.ones(2))
    assert root.children() == ["10", "7"]
    assert (root / "7" / "notes.txt").read_bytes() == b"the user's own notes"
    assert (root / "7").children() == ["notes.txt"]


def test_with_lightweight_initialize_a_directory_holding_a_manifest_json_of_its_own_is_never_deleted(tmp_path, caplog):
    """lightweight_initialize lists a directory holding a regular manifest.json without reading it; garbage
    collection reads it first, and a user's manifest.json (not ckpt's) keeps the directory out of it."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / fmt.MANIFEST).write_text('{"name": "my dataset", "files": ["a.bin"]}')
    (tmp_path / "1" / "a.bin").write_bytes(b"precious" * 10)
    before = fsutil.snapshot(tmp_path / "1")
    with caplog.at_level(logging.WARNING, logger="ckpt"), \
            Checkpointer(tmp_path, preservation_policy=pp.LatestN(1), lightweight_initialize=True) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [1]  # listed unread, as Orbax's lightweight listing does
        ckptr.save(2, STATE, force=True)
        ckptr.save(3, STATE, force=True)
        assert [c.step for c in ckptr.checkpoints] == [3]
    assert f"skipping {tmp_path / '1'}" in caplog.text
    assert fsutil.snapshot(tmp_path / "1") == before
    with pytest.raises(errors.ForeignEntryError, match="not a committed ckpt step"):
        ckpt.root.delete_step(tmp_path / "1", 1)  # the last check before any deletion reads the manifest
    assert fsutil.snapshot(tmp_path / "1") == before


@pytest.mark.parametrize("kind", ["directory", "symlink-to-directory", "orbax-step"])
def test_a_two_tier_save_never_promotes_over_a_foreign_entry(tmp_path, kind):
    durable, local = tmp_path / "durable", tmp_path / "local"
    durable.mkdir()
    word = _make(kind, durable / "10", tmp_path)
    whole = fsutil.snapshot(tmp_path)
    with Checkpointer(durable, local=ckpt.LocalCheckpointOptions(local)) as ckptr:
        for how in ("save", "save_async"):
            with pytest.raises(errors.ForeignEntryError) as info:
                getattr(ckptr, how)(10, STATE, force=True, overwrite=True)
            assert str(durable / "10") in str(info.value) and word in str(info.value)
        assert 10 not in [c.step for c in ckptr.checkpoints if "local" in c.locations]  # refused before it too
        ckptr.save(11, STATE, force=True)
        ckptr.wait()
        assert [c.step for c in ckptr.checkpoints if "durable" in c.locations] == [10, 11][kind != "orbax-step":]
    after = fsutil.snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith(("durable/10", "elsewhere"))} == \
           {k: v for k, v in whole.items() if k.startswith(("durable/10", "elsewhere"))}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("how", ["save", "save_async", "free save"])
def test_what_appears_at_the_step_name_while_the_step_is_written_is_never_replaced(tmp_path, monkeypatch,
                                                                                  overwrite, how):
    """Another process (an Orbax job, a user) takes the step's name while the save writes: the commit
    checks the name again, refuses, and leaves both what appeared and no temporary behind."""
    root = tmp_path / "root"
    final = root / "model" if how == "free save" else root / "5"
    if overwrite:  # a committed step of ckpt's is there when the save begins: replacing it is allowed
        if how == "free save":
            ckpt.save(final, STATE)
        else:
            with Checkpointer(root) as ckptr:
                ckptr.save(5, STATE)
    write_manifest = ckpt.saving.StepWriter.write_manifest

    def meanwhile(writer, *args, **kwargs):  # the last write before the commit
        if final.exists():
            shutil.rmtree(final)
        _make("directory", final, tmp_path)
        return write_manifest(writer, *args, **kwargs)

    monkeypatch.setattr(ckpt.saving.StepWriter, "write_manifest", meanwhile)
    with pytest.raises(errors.ForeignEntryError, match="notes.txt"):
        if how == "free save":
            ckpt.save(final, {"w": np.ones(2)}, overwrite=overwrite)
        else:
            with Checkpointer(root) as ckptr:
                getattr(ckptr, how)(5, {"w": np.ones(2)}, force=True, overwrite=overwrite)
                ckptr.wait()
    assert sorted(os.listdir(final)) == ["notes.txt"]
    assert not any(name.endswith(fmt.TMP_SUFFIX) for name in os.listdir(final.parent))


def test_the_root_lock_is_never_written_through_a_link(tmp_path):
    """A root made of links (a hub snapshot, ``cp -rs``) may hold one at the lock's name."""
    root = tmp_path / "root"
    root.mkdir()
    (root / fmt.LOCK).symlink_to(_elsewhere(tmp_path) / "data.bin")
    whole = fsutil.snapshot(tmp_path)
    with Checkpointer(root) as ckptr:
        with pytest.raises(errors.ForeignEntryError, match=f"{fmt.LOCK}.*symbolic link"):
            ckptr.save(0, STATE)
    assert fsutil.snapshot(tmp_path) == whole


def _plant(path: Path, kind: str, tmp_path: Path) -> None:
    """A link to a file outside the root, a FIFO, or a second name of such a file, at ``path``."""
    target = _elsewhere(tmp_path) / "data.bin"
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.link(target, path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
@pytest.mark.parametrize("how", ["garbage collection", "overwrite"])
def test_a_step_whose_marker_is_not_a_file_of_its_own_is_neither_written_through_nor_removed(tmp_path, kind, how):
    """A step deleted or replaced is marked as ckpt's first; where its marker's name holds a link (a root
    copied with ``cp -rs``) or a FIFO, nothing is written (the linked file was emptied; the FIFO made the
    save wait forever) and the step stays."""
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(1, STATE)
    (root / "1" / fmt.MARKER).unlink()
    _plant(root / "1" / fmt.MARKER, kind, tmp_path)
    whole = fsutil.snapshot(tmp_path / "elsewhere")
    with Checkpointer(root, preservation_policy=pp.LatestN(1)) as ckptr:
        with pytest.raises((errors.ForeignEntryError, OSError), match=f"{fmt.MARKER} is .*ckpt neither writes"):
            if how == "overwrite":
                ckptr.save(1, {"w": np.zeros(4)}, force=True, overwrite=True)
            else:
                ckptr.save(2, STATE, force=True)
        assert [c.step for c in ckptr.checkpoints] == ([1] if how == "overwrite" else [1, 2])
        np.testing.assert_array_equal(ckptr.load(1)["w"], STATE["w"])
    assert fsutil.snapshot(tmp_path / "elsewhere") == whole
    assert sorted(os.listdir(root)) == sorted([fmt.LOCK, "1"] + (["2"] if how != "overwrite" else []))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink"])
def test_the_root_metadata_is_never_written_through_what_is_at_its_temporary_name(tmp_path, kind):
    root = tmp_path / "root"
    root.mkdir()
    _plant(root / (fmt.ROOT_METADATA + ".tmp"), kind, tmp_path)
    whole = fsutil.snapshot(tmp_path / "elsewhere")
    with pytest.raises(errors.ForeignEntryError, match="ckpt neither writes through it"):
        Checkpointer(root, custom_metadata={"experiment": "a"})
    assert fsutil.snapshot(tmp_path / "elsewhere") == whole
    assert not (root / fmt.ROOT_METADATA).exists()


def test_a_dangling_link_at_the_root_metadatas_name_is_never_replaced(tmp_path):
    """Was: taken for no metadata (exists() followed it), and replaced by a Checkpointer's custom_metadata."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / fmt.ROOT_METADATA).symlink_to(tmp_path / "nowhere" / "meta.json")
    with Checkpointer(tmp_path / "root", custom_metadata={"run": "a"}) as ckptr:
        ckptr.save(0, STATE)
        with pytest.raises(errors.CheckpointCorruptedError, match="symbolic link"):
            ckptr.root_metadata()
    assert os.readlink(tmp_path / "root" / fmt.ROOT_METADATA) == str(tmp_path / "nowhere" / "meta.json")


def test_a_users_directories_that_only_resemble_orbax_steps_are_never_listed_nor_deleted(tmp_path):
    """A pickle called ``checkpoint`` (its first byte is a msgpack map's), a ``commit_success.txt`` and a
    tensorstore OCDBT database (``manifest.ocdbt``, which every Orbax item written with OCDBT holds beside
    its ``_METADATA`` or msgpack ``checkpoint``) of the user's own made directories named like steps
    Orbax steps, which a preservation policy deleted."""
    import pickle

    import tensorstore as ts

    root = tmp_path / "root"
    (root / "0" / "model").mkdir(parents=True)
    (root / "0" / "model" / "checkpoint").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    (root / "1").mkdir()
    (root / "1" / "commit_success.txt").write_text("done\n")
    (root / "1" / "results.csv").write_text("step,loss\n")
    ts.open({"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{root}/2/embeddings/"},
             "metadata": {"shape": [4], "data_type": "float32"}, "create": True}).result().write(np.ones(4, np.float32)).result()
    whole = fsutil.snapshot(root)
    with Checkpointer(root, preservation_policy=pp.LatestN(1)) as ckptr:
        assert ckptr.checkpoints == []
        for step in (3, 4):
            ckptr.save(step, STATE)
        assert [c.step for c in ckptr.checkpoints] == [4]
    assert {k: v for k, v in fsutil.snapshot(root).items() if k.split("/")[0] in ("0", "1", "2")} == whole


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", ["[1, 2]", '"text"', '{"custom_metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                     b"\xff\xfe{", '{"custom_metadata": {"a"', "fifo"])
def test_a_damaged_root_metadata_file_raises_a_ckpt_error_naming_it(tmp_path, content):
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(1, STATE)
    path = root / fmt.ROOT_METADATA
    if content == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with Checkpointer(root) as ckptr:
        with pytest.raises(errors.CheckpointCorruptedError, match=fmt.ROOT_METADATA):
            ckptr.root_metadata()
        np.testing.assert_array_equal(ckptr.load(1)["w"], STATE["w"])  # the steps are another matter


@pytest.mark.parametrize("suffix", [fmt.TMP_SUFFIX, fmt.DELETING_SUFFIX])
def test_a_checkpoint_named_like_a_temporary_is_refused_for_the_next_writer_would_remove_it(tmp_path, suffix):
    with Checkpointer(tmp_path / "root") as ckptr:
        ckptr.save(1, STATE)
    for path in (tmp_path / "root" / f"export{suffix}", tmp_path / "exports" / f"model{suffix}"):
        with pytest.raises(ValueError, match="that of a temporary of ckpt's"):
            ckpt.save(path, STATE)
        assert not path.exists()


def test_a_foreign_entry_at_a_deleted_steps_aside_name_does_not_stop_garbage_collection(tmp_path):
    """A deletion renames the step to ``<step>.ckpt-deleting`` first; something foreign there is left
    alone and the step goes aside under a name of its own."""
    root = tmp_path / "root"
    root.mkdir()
    word = _make("directory", root / f"0{fmt.DELETING_SUFFIX}", tmp_path)
    before = fsutil.snapshot(root / f"0{fmt.DELETING_SUFFIX}")
    with Checkpointer(root, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1)) as ckptr:
        for step in range(4):
            ckptr.save(step, STATE)
        assert [c.step for c in ckptr.checkpoints] == [3]
    assert word == "notes.txt" and fsutil.snapshot(root / f"0{fmt.DELETING_SUFFIX}") == before
    assert sorted(os.listdir(root)) == sorted([f"0{fmt.DELETING_SUFFIX}", fmt.LOCK, "3"])


WRITES_UNTIL_TOLD = """
import sys
import numpy as np
import ckpt

class WaitsToBeTold:  # a checkpointable that writes its file only once the test says so
    async def save(self, directory):
        async def write():
            path = await directory.await_creation()
            print("writing", flush=True)
            sys.stdin.readline()
            (path / "n").write_text("1")
        return write()

    async def load(self, directory):
        pass

ckpt.save_checkpointables(sys.argv[1], {"state": {"w": np.ones(3)}, "told": WaitsToBeTold()})
print("saved", flush=True)
"""


def test_a_sweep_leaves_alone_the_temporary_another_process_is_writing(tmp_path):
    """Another process saves step 7 into the root with ckpt.save while a Checkpointer opens it and sweeps
    the leftovers of crashed saves: the live temporary (its marker locked) is not one of them."""
    root = tmp_path / "root"
    root.mkdir()
    child = procs.start(WRITES_UNTIL_TOLD, str(root / "7"), stdin=True)
    try:
        procs.wait_for_line(child, "writing")
        with Checkpointer(root, cleanup_tmp_directories=True) as ckptr:
            ckptr.save(1, STATE, force=True)
            with pytest.raises(errors.DirectoryLockedError, match="another save of the same step"):
                ckptr.save(7, STATE, force=True)
        assert (root / f"7{fmt.TMP_SUFFIX}" / fmt.MARKER).exists()
        child.stdin.write("go\n")
        child.stdin.flush()
        procs.wait_for_line(child, "saved")
    finally:
        procs.stop(child)
    with Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [1, 7]
        np.testing.assert_array_equal(ckptr.load(7)["w"], np.ones(3))


def test_a_child_forked_while_a_save_writes_does_not_keep_its_temporary_locked(tmp_path):
    """A DataLoader worker forked during a save outlives it (or a crash of its trainer): the temporary is
    then a leftover like any other, which the next writer sweeps."""
    tmp = tmp_path / f"5{fmt.TMP_SUFFIX}"
    marker = ckpt.storage.make_temporary(tmp)
    (ready, started), (go, told) = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: lives on, never touching the save
        os.write(started, b"1")  # (once fork has returned here, its handlers have run)
        os.read(go, 1)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        assert ckpt.storage.in_use(tmp)
        ckpt.storage.release_temporary(marker)
        assert not ckpt.storage.in_use(tmp)
    finally:
        os.write(told, b"1")
        os.waitpid(pid, 0)
        for fd in (ready, started, go, told):
            os.close(fd)
    with Checkpointer(tmp_path, cleanup_tmp_directories=True):
        pass
    assert not tmp.exists()


def _removes_its_manifest(entry: Path) -> None:
    os.unlink(entry / fmt.MANIFEST)


def _becomes_a_file(entry: Path) -> None:
    shutil.rmtree(entry)
    entry.write_text("the user's file now")


def _is_removed(entry: Path) -> None:
    shutil.rmtree(entry)


# (what the user's directory holds, what another process does to it, and when: just before or after ckpt calls
# the function named on it (within the function named last, if one is), so that the race lands between two of
# ckpt's looks at the entry)
_CHANGES = {
    "its manifest removed as ckpt reads it": (fmt.MANIFEST, _removes_its_manifest, "ckpt.loading", "read_manifest",
                                              "before", None),
    "a file once ckpt found it a directory": (fmt.MANIFEST, _becomes_a_file, "ckpt.root", "_is_dir", "after", None),
    "a file once ckpt looked for Orbax's files": (fmt.MANIFEST, _becomes_a_file, "ckpt.formats", "is_orbax", "after",
                                                  None),
    "removed once ckpt found no Orbax item in it": ("notes.txt", _is_removed, "ckpt.orbax.step", "_is_item", "after",
                                                    "is_damaged_step"),  # (the command's question, once listed)
}


@pytest.mark.parametrize("change, name", [
    ("its manifest removed as ckpt reads it", "7"), ("its manifest removed as ckpt reads it", "notes"),
    ("a file once ckpt found it a directory", "7"), ("a file once ckpt found it a directory", f"8{fmt.TMP_SUFFIX}"),
    ("a file once ckpt looked for Orbax's files", "notes"), ("removed once ckpt found no Orbax item in it", "7"),
])
def test_a_listing_goes_on_when_an_entry_ckpt_did_not_write_changes_while_it_is_looked_at(tmp_path, monkeypatch,
                                                                                         capsys, change, name):
    """A user's directory in the root (named like a step, a temporary or otherwise) removed, or replaced by a
    file, by another process while ckpt looked at it made opening a Checkpointer raise InvalidLayoutError
    ("not a checkpoint"), or NotADirectoryError, and ckpt ls and verify fail (exit status 1 or 2) naming the
    user's entry: the listing now goes on, the entry skipped or listed as what it holds now."""
    root = tmp_path / "root"
    ckpt.save(root / "1", STATE)
    entry = root / name
    holds, how, module, function, when, during = _CHANGES[change]
    owner = __import__(module, fromlist=[function])
    real = getattr(owner, function)

    def looked_at(path, *args, **kwargs):
        changes = (Path(path) in (entry, entry / fmt.MANIFEST) and entry.is_dir() and not changed
                   and (during is None or any(frame.name == during for frame in traceback.extract_stack())))
        if changes and when == "before":
            changed.append(how(entry))
        found = real(path, *args, **kwargs)
        if changes and when == "after":
            changed.append(how(entry))
        return found

    runs = [lambda: cli.main(["ls", str(root)]), lambda: cli.main(["verify", str(root)])]
    if name != "notes" and during is None:  # (a Checkpointer never looks at an entry not named like a step)
        runs.append(lambda: Checkpointer(root).close())
    for run in runs:
        if os.path.lexists(entry):
            shutil.rmtree(entry) if entry.is_dir() else os.unlink(entry)
        entry.mkdir()
        (entry / holds).write_text("{}")
        changed: list = []
        with monkeypatch.context() as patched:
            patched.setattr(owner, function, looked_at)
            assert run() in (None, 0), capsys.readouterr().err
        assert changed
    with Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [1]


@pytest.mark.parametrize("tiered", [False, True], ids=["one tier", "two tiers"])
def test_on_s3_the_leftover_of_a_crashed_save_of_a_step_does_not_stop_the_next_save_of_it(bucket, tmp_path, tiered):
    from ckpt.objectstore import ObjectPath

    ckpt.storage.make_temporary(ObjectPath(bucket) / "7")  # a save (or promotion) that died before its manifest
    local = {"local": ckpt.LocalCheckpointOptions(tmp_path / "local")} if tiered else {}
    with Checkpointer(bucket, **local) as ckptr:
        assert ckptr.save(7, STATE, force=True)
        ckptr.wait()
        np.testing.assert_array_equal(ckpt.load(f"{bucket}/7")["w"], STATE["w"])


@pytest.mark.parametrize("way", ["Checkpointer", "ckpt.save", "ckpt.save_async"])
@pytest.mark.parametrize("where", ["the step", "a directory in it", "a link to a directory in it"])
def test_a_root_or_checkpoint_opened_on_a_committed_step_is_refused_before_writing_into_it(tmp_path, way, where):
    """The step's directory passed instead of the root's: its steps, its lock (and a free save's checkpoint)
    would be written into what was committed."""
    with Checkpointer(tmp_path / "root") as ckptr:
        ckptr.save(5, STATE)
    step = tmp_path / "root" / "5"
    path = {"the step": step, "a directory in it": step / "sub" / "dir",
            "a link to a directory in it": tmp_path / "link"}[where]
    if where.startswith("a link"):
        path.symlink_to(next(p for p in step.iterdir() if p.is_dir()), target_is_directory=True)
    target = path if way == "Checkpointer" else path / "model"
    before = fsutil.snapshot(tmp_path)
    with pytest.raises(errors.RootDirectoryError) as info:
        if way == "Checkpointer":
            Checkpointer(path)
        else:
            getattr(ckpt, way.split(".")[1])(target, STATE)
    message = str(info.value)
    assert "a checkpoint (a step directory)" in message and f"({step.parent} for this one)" in message
    assert message.startswith(str(target if way == "Checkpointer" else target.parent))
    assert fsutil.snapshot(tmp_path) == before
    np.testing.assert_array_equal(ckpt.load(step)["w"], STATE["w"])


def test_a_project_holding_a_manifest_json_and_a_tree_json_of_its_own_is_no_step_and_runs_save_in_it(tmp_path):
    """A web app's manifest.json beside a tree.json at a project's top made every root and checkpoint under
    it a directory inside a checkpoint (RootDirectoryError); a step of ckpt's is told by its marker or its
    manifest, which a step an earlier ckpt wrote without the marker still has."""
    project = tmp_path / "project"
    project.mkdir()
    (project / fmt.MANIFEST).write_text('{"name": "my app", "icons": []}')
    (project / fmt.TREE).write_text('{"nodes": []}')
    with Checkpointer(project / "runs" / "exp") as ckptr:
        assert ckptr.save(0, STATE)
    ckpt.save(project / "out" / "model", STATE)
    np.testing.assert_array_equal(ckpt.load(project / "out" / "model")["w"], STATE["w"])
    (project / "runs" / "exp" / "0" / fmt.MARKER).unlink()  # as an earlier ckpt wrote it
    with pytest.raises(errors.RootDirectoryError, match="a checkpoint"):
        Checkpointer(project / "runs" / "exp" / "0")


@pytest.mark.parametrize("way", ["Checkpointer", "ckpt.save", "ckpt convert"])
def test_a_root_or_checkpoint_opened_through_a_link_into_a_temporary_is_refused_before_writing_into_it(tmp_path, way):
    """Was: accepted through the link (only the names as written were looked at), and the next writer of the
    temporary's root removed it, with the steps and checkpoints saved there."""
    for run in ("root", "other"):
        with Checkpointer(tmp_path / run) as ckptr:
            ckptr.save(0, STATE)
    (tmp_path / "root" / ("5" + fmt.TMP_SUFFIX)).mkdir()  # a save a crash interrupted
    (tmp_path / "root" / ("5" + fmt.TMP_SUFFIX) / fmt.MARKER).touch()
    (tmp_path / "link").symlink_to(tmp_path / "root" / ("5" + fmt.TMP_SUFFIX), target_is_directory=True)
    before = fsutil.snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"5\.ckpt-tmp is named like a temporary of ckpt's"):
        if way == "Checkpointer":
            Checkpointer(tmp_path / "link" / "run")
        elif way == "ckpt.save":
            ckpt.save(tmp_path / "link" / "model", STATE)
        else:
            ckpt.convert.convert_root(tmp_path / "other", tmp_path / "link" / "copy")
    assert fsutil.snapshot(tmp_path) == before


def test_a_temporary_a_sweep_removes_while_a_save_looks_at_its_name_is_not_taken_for_a_users(tmp_path, monkeypatch):
    """Was: in a job, rank 1's save checked its temporary's name while rank 0's sweep removed the temporary a
    crash had left there (its marker, then the directory): rank 1 found no marker, then no directory, and refused
    it as holding 'nothing without ckpt's marker', a ForeignEntryError that failed the save on every rank
    (tests/test_crash.py's two-rank kills, in a fresh clone)."""
    final, tmp = tmp_path / "5", tmp_path / "5.ckpt-tmp"
    tmp.mkdir()
    storage.mark(tmp)
    marked = storage.is_marked

    def swept_meanwhile(path):
        if path != tmp:
            return marked(path)
        (tmp / fmt.MARKER).unlink()
        tmp.rmdir()
        return False
    monkeypatch.setattr(storage, "is_marked", swept_meanwhile)
    root.check_target(final, tmp, step=5, overwrite=False)
    assert not tmp.exists() and not final.exists()


def test_a_temporary_a_sweep_removes_once_a_save_saw_it_is_not_taken_for_a_users_at_the_first_look(tmp_path,
                                                                                                monkeypatch):
    """Was, after 19e995b: a bare FileNotFoundError ('No such file or directory: .../5.ckpt-tmp') that failed the
    save on every rank, where the sweep removed the temporary between the save's seeing something at its name and
    its first look at what (in a loop of such races, 2% of the checks)."""
    final, tmp = tmp_path / "5", tmp_path / "5.ckpt-tmp"
    tmp.mkdir()
    storage.mark(tmp)
    exists = storage.exists

    def swept_after(path):
        seen = exists(path)
        if path == tmp and seen:
            storage.remove_owned(tmp)
        return seen
    monkeypatch.setattr(storage, "exists", swept_after)
    root.check_target(final, tmp, step=5, overwrite=False)
    assert not tmp.exists() and not final.exists()
