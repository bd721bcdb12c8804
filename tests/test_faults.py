"""I/O faults: disk full, a read-only file system, permission denied, directories removed underneath.

Each fault must reach the caller as a clear error (from ``save`` itself, or from ``wait`` and
``result()`` after ``save_async``), leave the earlier steps loadable, and never list a partial step.
Disk-full and read-only tests mount a small tmpfs or a read-only bind mount (they need root and skip
with the reason otherwise); permission denied drops root for the block that saves.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess

import numpy as np
import pytest

import ckpt
from ckpt import cli, errors, saving, storage
from ckpt import format as fmt
from ckpt.training import Checkpointer
from tests import fsutil

SMALL = {"w": np.arange(10.0)}


def save(ckptr: Checkpointer, step: int, state: dict, surface: str) -> None:
    """Saves with ``save`` (sync) or ``save_async`` and waits through the ``surface`` named."""
    if surface == "sync":
        ckptr.save(step, state, force=True)
        return
    response = ckptr.save_async(step, state, force=True)
    if surface == "wait":
        ckptr.wait()
    else:
        response.result()


def assert_intact(ckptr: Checkpointer, steps: list[int]) -> None:
    """Only ``steps`` are listed, here and by a new Checkpointer, and each one loads."""
    assert [c.step for c in ckptr.checkpoints] == steps
    with Checkpointer(ckptr.directory) as fresh:
        assert [c.step for c in fresh.checkpoints] == steps
    for step in steps:
        np.testing.assert_array_equal(ckptr.load(step)["w"], SMALL["w"])
    assert not [n for n in os.listdir(ckptr.directory) if n.endswith(fmt.TMP_SUFFIX)], "a temporary was left"


LARGE_STATES = {
    "packed small leaves": {"w": SMALL["w"], **{f"p{i}": np.ones(100_000) for i in range(4)}},  # 4 x 800 kB
    "one large leaf": {"w": SMALL["w"], "big": np.ones(400_000)},  # 3.2 MB, its own array
}


@pytest.mark.parametrize("surface", ["sync", "wait", "result", "save_async over its memory budget"])
@pytest.mark.parametrize("what", list(LARGE_STATES))
def test_disk_full_while_writing_data_raises_enospc_and_keeps_the_earlier_step(tmp_path, what, surface):
    # Over its budget, save_async writes the large leaves before it returns, and raises itself.
    context = ckpt.Context(memory_options=ckpt.MemoryOptions(max_inflight_bytes=0)) if "budget" in surface else None
    with fsutil.tmpfs(tmp_path / "mnt", size="2m") as mnt:
        with Checkpointer(mnt / "root", context=context) as ckptr:
            ckptr.save(0, SMALL, force=True)
            with pytest.raises(OSError, match="No space left on device") as info:
                save(ckptr, 1, LARGE_STATES[what], surface)
            assert info.value.errno == errno.ENOSPC
            assert str(mnt / "root" / ("1" + fmt.TMP_SUFFIX)) in str(info.value)
            assert_intact(ckptr, [0])
            ckptr.save(1, SMALL, force=True)  # the space was given back: the next save works
            assert_intact(ckptr, [0, 1])


FULL_DISKS = {
    "no space at all": (0, SMALL),
    "room for the data, not for tree.json": (64 << 10, {"w": SMALL["w"], "notes": "x" * 300_000}),  # inline str
}


@pytest.mark.parametrize("surface", ["sync", "wait"])
@pytest.mark.parametrize("case", list(FULL_DISKS))
def test_a_full_disk_raises_enospc_whatever_file_fails_and_keeps_the_earlier_step(tmp_path, case, surface):
    leave_bytes, state = FULL_DISKS[case]
    with fsutil.tmpfs(tmp_path / "mnt", size="2m") as mnt:
        with Checkpointer(mnt / "root") as ckptr:
            ckptr.save(0, SMALL, force=True)
            fsutil.fill(mnt, leave_bytes)
            with pytest.raises(OSError) as info:
                save(ckptr, 1, state, surface)
            assert info.value.errno == errno.ENOSPC, info.value
            assert str(mnt / "root" / ("1" + fmt.TMP_SUFFIX)) in str(info.value)  # the file that failed, named
            assert_intact(ckptr, [0])
            (mnt / "filler").unlink()
            ckptr.save(1, SMALL, force=True)
            assert_intact(ckptr, [0, 1])


def test_a_disk_full_before_the_first_save_takes_the_lock_raises_enospc_and_a_later_save_works(tmp_path):
    # the lock file's pid line failed to write: the bare OSError named no file, and the lock stayed held by a
    # descriptor never closed, so every later save (of any Checkpointer of the process) said "being written by another"
    with fsutil.tmpfs(tmp_path / "mnt", size="2m") as mnt:
        with Checkpointer(mnt / "root") as ckptr:
            fsutil.fill(mnt, 0)
            with pytest.raises(OSError) as info:
                ckptr.save(0, SMALL, force=True)
            assert info.value.errno == errno.ENOSPC and str(mnt / "root" / fmt.LOCK) in str(info.value), info.value
            (mnt / "filler").unlink()
            ckptr.save(0, SMALL, force=True)
            assert_intact(ckptr, [0])


@pytest.mark.parametrize("surface", ["sync", "wait"])
def test_a_save_whose_temporarys_marker_cannot_be_made_leaves_no_temporary(tmp_path, surface):
    # no inode left for the marker once the temporary's directory took the last one: the directory was
    # left behind (the save had not begun, so its cleanup removed nothing) until the root's next writer
    with fsutil.tmpfs(tmp_path / "mnt", size="2m", inodes=64) as mnt:
        with Checkpointer(mnt / "root") as ckptr:
            ckptr.save(0, SMALL, force=True)
            fsutil.fill_inodes(mnt, 1)
            with pytest.raises(OSError) as info:
                save(ckptr, 1, SMALL, surface)
            assert info.value.errno == errno.ENOSPC, info.value
            assert str(mnt / "root" / ("1" + fmt.TMP_SUFFIX) / fmt.MARKER) in str(info.value)
            assert_intact(ckptr, [0])
            shutil.rmtree(mnt / "inodes")
            ckptr.save(1, SMALL, force=True)
            assert_intact(ckptr, [0, 1])


def test_a_failed_fsync_of_a_temporarys_marker_is_an_error_naming_the_marker(tmp_path, monkeypatch):
    # an NFS client reports the quota a write exceeded at the file's fsync: the error named no file
    fsync = os.fsync

    def quota_exceeded_at_the_marker(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(fmt.MARKER):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        fsync(fd)

    with Checkpointer(tmp_path / "root") as ckptr:
        ckptr.save(0, SMALL, force=True)
        with monkeypatch.context() as patched:
            patched.setattr(os, "fsync", quota_exceeded_at_the_marker)
            with pytest.raises(OSError) as info:
                ckptr.save(1, SMALL, force=True)
        assert info.value.errno == errno.EDQUOT
        assert str(tmp_path / "root" / ("1" + fmt.TMP_SUFFIX) / fmt.MARKER) in str(info.value)
        assert_intact(ckptr, [0])


@pytest.mark.parametrize("overwrite", [False, True], ids=["new step", "overwrite"])
def test_a_failed_fsync_of_the_root_after_the_commit_rename_says_the_step_is_in_place(tmp_path, monkeypatch,
                                                                                       overwrite):
    """The error named the root only ('[Errno 5] Input/output error: .../root'), as if the step had not been saved,
    though it was in place under its name: listed by the root's next Checkpointer, and refused as existing by a
    save of it again."""
    root, fsync = tmp_path / "root", os.fsync
    step = 0 if overwrite else 1

    def failing_once_the_step_is_in_place(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(root) and (root / str(step) / fmt.MANIFEST).exists():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    with Checkpointer(root) as ckptr:
        ckptr.save(0, SMALL, force=True)
        with monkeypatch.context() as patched:
            patched.setattr(os, "fsync", failing_once_the_step_is_in_place)
            with pytest.raises(OSError, match=rf"the fsync of the root failed after the step was renamed into place "
                                              rf"as {root / str(step)}, so it may not survive a power loss\. The save "
                                              r"raises this, but the step is in place") as info:
                ckptr.save(step, {"w": np.full(3, 7.0)}, force=True, overwrite=overwrite)
        assert info.value.errno == errno.EIO and info.value.filename == str(root)
    with Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1][:step + 1]
        assert ckptr.load(step)["w"].tolist() == [7.0] * 3


def test_a_commit_that_fails_raises_its_own_error_even_when_its_temporary_cannot_be_removed(tmp_path, monkeypatch):
    # the removal of the temporary failed as well, and its error (naming only the temporary) replaced the rename's
    root, undo = tmp_path / "root", []
    write_manifest = saving.StepWriter.write_manifest

    def then_freeze_the_root(self, step, extra=None):
        write_manifest(self, step, extra)
        undo.append(fsutil.undeletable(root))  # the rename to the step's name fails, and so does the removal

    monkeypatch.setattr(saving.StepWriter, "write_manifest", then_freeze_the_root)
    with Checkpointer(root) as ckptr:
        try:
            with pytest.raises(PermissionError) as info:
                ckptr.save(0, SMALL, force=True)
        finally:
            for thaw in undo:
                thaw()
        assert f"-> '{root / '0'}'" in str(info.value), info.value
        assert ckptr.checkpoints == []
        monkeypatch.undo()
        ckptr.save(0, SMALL, force=True)  # removes the temporary left
        assert_intact(ckptr, [0])


def test_an_overwrite_whose_new_step_cannot_be_renamed_into_place_keeps_the_old_one_at_its_name(tmp_path, monkeypatch):
    """Without an atomic exchange (NFS), an overwrite renames the committed step aside, then the new one into its
    name. When that second rename failed, the step stayed aside: the Checkpointer listed no step (latest None,
    load raised StepNotFoundError) until the root's next writer, in another process, put it back."""
    monkeypatch.setattr(storage, "rename_exchange", lambda a, b: False)
    write_manifest, undo = saving.StepWriter.write_manifest, []

    def then_freeze_the_temporary(self, step, extra=None):
        write_manifest(self, step, extra)
        undo.append(fsutil.undeletable(self.tmp_dir))  # its rename into the step's name fails (EPERM)

    with Checkpointer(tmp_path / "root") as ckptr:
        ckptr.save(0, SMALL, force=True)
        try:
            with monkeypatch.context() as patched, pytest.raises(PermissionError):
                patched.setattr(saving.StepWriter, "write_manifest", then_freeze_the_temporary)
                ckptr.save(0, {"w": SMALL["w"] + 1}, force=True, overwrite=True)
        finally:
            for thaw in undo:
                thaw()
        assert [c.step for c in ckptr.checkpoints] == [0] and ckptr.latest.step == 0
        np.testing.assert_array_equal(ckptr.load(0)["w"], SMALL["w"])
        assert "0" + fmt.REPLACED_SUFFIX not in os.listdir(tmp_path / "root")
        ckptr.save(1, SMALL, force=True)
    with Checkpointer(tmp_path / "root") as fresh:
        assert [c.step for c in fresh.checkpoints] == [0, 1]
        np.testing.assert_array_equal(fresh.load(0)["w"], SMALL["w"])


def test_an_overwrite_whose_replaced_step_cannot_be_removed_is_committed_and_says_so(tmp_path, caplog):
    # the save raised the removal's error (naming only the temporary) while the new step was committed, and the
    # Checkpointer kept listing the replaced step's metadata
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(0, SMALL, force=True, metrics={"loss": 1.0})
        fsutil.undeletable(root / "0" / fmt.TREE)  # goes with the replaced step, renamed to the temporary's name
        try:
            assert ckptr.save(0, {"w": SMALL["w"] + 1}, force=True, overwrite=True, metrics={"loss": 0.5})
        finally:
            for step_dir in (root / "0", root / ("0" + fmt.TMP_SUFFIX)):
                subprocess.run(["chattr", "-i", str(step_dir / fmt.TREE)], capture_output=True)
        assert "the step was committed, but the one it replaced could not be removed" in caplog.text
        assert [c.metrics for c in ckptr.checkpoints] == [{"loss": 0.5}]
        np.testing.assert_array_equal(ckptr.load(0)["w"], SMALL["w"] + 1)
    with Checkpointer(root) as ckptr:
        ckptr.save(1, SMALL, force=True)  # the first save of a writer removes what was left
        assert sorted(os.listdir(root)) == [fmt.LOCK, "0", "1"]


def test_an_overwrite_whose_step_under_another_name_cannot_be_deleted_is_committed_and_says_so(tmp_path, caplog):
    # (composite_name_format) the save raised the deletion's error, naming only step_0, though step 0 was committed
    # as 0; step_0, left, is never listed, and the next writer deletes it
    root = tmp_path / "root"
    names = ckpt.path.step
    old, new = names.standard_name_format(step_prefix="step"), names.standard_name_format()
    with Checkpointer(root, step_name_format=old) as ckptr:
        ckptr.save(0, SMALL, force=True)
    composite = names.composite_name_format(new, [new, old])
    with Checkpointer(root, step_name_format=composite) as ckptr:
        thaw = fsutil.undeletable(root / "step_0")
        try:
            assert ckptr.save(0, {"w": SMALL["w"] + 1}, force=True, overwrite=True)
            assert ckptr.save_async(1, SMALL, force=True).result() is True
        finally:
            thaw()
        assert f"step 0 was committed, but {root / 'step_0'}, the step it replaced under another name" in caplog.text
        assert [(c.step, c.path.name) for c in ckptr.checkpoints] == [(0, "0"), (1, "1")]
    with Checkpointer(root, step_name_format=composite) as ckptr:
        np.testing.assert_array_equal(ckptr.load(0)["w"], SMALL["w"] + 1)
        ckptr.save(2, SMALL, force=True)  # the first save of a writer deletes what was left
    assert sorted(os.listdir(root)) == [fmt.LOCK, "0", "1", "2"]


def test_a_leftover_temporary_that_cannot_be_removed_is_left_and_the_saves_go_on(tmp_path, caplog):
    # the first save of every writer swept it, failed, and raised: no save of any step could be made there
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(0, SMALL, force=True)
    leftover = root / ("1" + fmt.TMP_SUFFIX)  # a crashed save's, one file of it undeletable
    leftover.mkdir()
    (leftover / fmt.MARKER).touch()
    (leftover / fmt.TREE).write_text("{}")
    thaw = fsutil.undeletable(leftover / fmt.TREE)
    try:
        with Checkpointer(root) as ckptr:
            ckptr.save(2, SMALL, force=True)
            assert [c.step for c in ckptr.checkpoints] == [0, 2]
        assert f"could not remove {leftover}, left by a crashed save or deletion" in caplog.text
    finally:
        thaw()
    with Checkpointer(root) as ckptr:
        ckptr.save(3, SMALL, force=True)  # removed now
        assert_intact(ckptr, [0, 2, 3])


@pytest.mark.parametrize("surface", ["sync", "wait", "result"])
def test_a_read_only_file_system_raises_erofs_and_keeps_the_earlier_step(tmp_path, surface):
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(0, SMALL, force=True)
        before = fsutil.snapshot(root)
        with fsutil.read_only(root):
            with pytest.raises(OSError, match="Read-only file system") as info:
                save(ckptr, 1, LARGE_STATES["one large leaf"], surface)
            assert info.value.errno == errno.EROFS
            assert [c.step for c in ckptr.checkpoints] == [0]
            np.testing.assert_array_equal(ckptr.load(0)["w"], SMALL["w"])  # reading still works
        assert fsutil.snapshot(root) == before
        ckptr.save(1, SMALL, force=True)
        assert_intact(ckptr, [0, 1])


def raised(fn) -> BaseException | None:
    try:
        fn()
    except Exception as e:
        return e
    return None


def test_permission_denied_is_a_permission_error_naming_the_path_and_reading_still_works():
    with fsutil.shared_directory() as base:
        root = base / "root"
        with Checkpointer(root) as writer:
            writer.save(0, SMALL, force=True)
        os.chmod(root, 0o555)
        before = fsutil.snapshot(root)
        with fsutil.without_root():  # only ckpt runs here: modules imported lazily may be unreadable without root
            with Checkpointer(root) as ckptr:
                listed = [c.step for c in ckptr.checkpoints]
                loaded = ckptr.load(0)["w"]
                failures = {surface: raised(lambda: save(ckptr, 1, SMALL, surface)) for surface in ("sync", "result")}
                listed_after = [c.step for c in ckptr.checkpoints]
        assert listed == listed_after == [0]
        np.testing.assert_array_equal(loaded, SMALL["w"])
        for surface, error in failures.items():
            assert isinstance(error, PermissionError) and error.errno == errno.EACCES, (surface, error)
            assert str(root) in str(error)
        assert fsutil.snapshot(root) == before


def test_a_local_chunk_this_process_may_not_read_is_named_without_a_hint_at_object_store_credentials(capsys):
    """Was: ckpt verify said 'access denied (...local file...); check the credentials (for s3://,
    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)' of a local step's chunk file of mode 000."""
    with fsutil.shared_directory() as base:
        ckpt.save(base / "c", {"big": np.arange(140_000.0)})
        chunk = base / "c" / fmt.ARRAYS / "0" / "c" / "0"
        os.chmod(chunk, 0)
        with fsutil.without_root():
            status = cli.main(["verify", str(base / "c")])
        message = capsys.readouterr().err
        assert status == 2 and f'{chunk}": Permission denied' in message and "credentials" not in message, message


def test_a_step_and_a_temporary_this_process_may_not_enter_are_skipped_and_the_root_still_opens_and_saves(capsys):
    """Another user's step directory and crashed save of mode 0700 in a shared root: Checkpointer(root) raised
    PermissionError, ckpt ls exited 2, and every save failed in its sweep of the temporaries."""
    with fsutil.shared_directory() as base:
        root = base / "root"
        with Checkpointer(root) as writer:
            writer.save(0, SMALL, force=True)
            writer.save(1, SMALL, force=True)
        (root / ("2" + fmt.TMP_SUFFIX)).mkdir()
        for path, mode in ((root, 0o777), (root / fmt.LOCK, 0o666), (root / "1", 0o700),
                           (root / ("2" + fmt.TMP_SUFFIX), 0o700)):
            os.chmod(path, mode)
        with fsutil.without_root():
            with Checkpointer(root) as ckptr:
                listed = [c.step for c in ckptr.checkpoints]
                ckptr.save(3, SMALL, force=True)
                saved = [c.step for c in ckptr.checkpoints]
            status = cli.main(["ls", str(root)])
            converted = cli.main(["convert", str(root), str(base / "copy")])  # (it would leave step 1 out)
        out, err = capsys.readouterr()
        assert listed == [0] and saved == [0, 3] and (root / ("2" + fmt.TMP_SUFFIX)).is_dir()
        assert status == 0 and f"a directory this process may not read ([Errno 13] Permission denied: '{root / '1'}" \
            in out
        assert converted == 2 and f"{root} holds 1, named like step 1, which may be a step" in err
        assert not (base / "copy").exists()


def test_ckpt_convert_refuses_a_step_set_aside_that_this_process_may_not_enter_before_it_writes_anything(capsys):
    """Another user's step 5, set aside as 5.ckpt-replaced (mode 0700) by an overwrite killed between its renames:
    ckpt convert converted step 0 alone and exited 0, leaving out step 5, which that user's Checkpointer puts back."""
    with fsutil.shared_directory() as base:
        root, copy = base / "root", base / "into" / "copy"
        with Checkpointer(root) as writer:
            writer.save(0, SMALL, force=True)
            writer.save(5, SMALL, force=True)
        storage.mark(root / "5")  # as the commit marks it before it sets it aside
        os.rename(root / "5", root / ("5" + fmt.REPLACED_SUFFIX))
        for path, mode in ((root, 0o777), (root / ("5" + fmt.REPLACED_SUFFIX), 0o700), (copy.parent, 0o777)):
            path.mkdir(exist_ok=True)
            os.chmod(path, mode)
        with fsutil.without_root():
            converted = cli.main(["convert", str(root), str(copy)])
        assert converted == 2, capsys.readouterr()
        assert f"{root} holds 5.ckpt-replaced, named like step 5 set aside" in capsys.readouterr().err
        assert os.listdir(copy.parent) == []
        with Checkpointer(root) as owner:
            assert [c.step for c in owner.checkpoints] == [0, 5]


@pytest.mark.parametrize("saved_before", [True, False], ids=["after a save", "before any save"])
@pytest.mark.parametrize("how", ["save", "save_async"])
def test_a_root_removed_underneath_is_reported_and_not_silently_recreated(tmp_path, how, saved_before):
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        if saved_before:
            ckptr.save(0, SMALL, force=True)
        shutil.rmtree(root)
        with pytest.raises(FileNotFoundError, match="was removed") as info:
            getattr(ckptr, how)(1, SMALL, force=True)
        assert str(root) in str(info.value)
        assert not root.exists()
        ckptr.reload()
        assert ckptr.checkpoints == []


def test_a_step_removed_between_listing_and_loading_is_step_not_found(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, SMALL, force=True)
        ckptr.save(1, SMALL, force=True)
        shutil.rmtree(tmp_path / "0")  # another process's garbage collection, say
        with pytest.raises(errors.StepNotFoundError, match="step 0") as info:
            ckptr.load(0)
        assert info.value.step == 0
        np.testing.assert_array_equal(ckptr.load(1)["w"], SMALL["w"])


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_sync_save_interrupted_while_its_arrays_are_written_raises_that_and_leaves_no_temporary(
        tmp_path, monkeypatch, error):
    """Ctrl-C (or any error) while tensorstore still writes the large arrays of a sync save: the save
    waits for those writes before it removes its temporary directory, so the caller gets that error,
    not "Directory not empty" from a removal racing the writes, and no temporary is left."""
    from ckpt import chunks
    state = {"w": SMALL["w"], **{f"big{i}": np.full(500_000, float(i)) for i in range(24)}}  # 24 x 4 MB
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, SMALL, force=True)

        def interrupted(*args):  # the checksums run while tensorstore writes the arrays
            raise error("interrupted")

        monkeypatch.setattr(chunks, "checksums", interrupted)
        with pytest.raises(error, match="interrupted"):
            ckptr.save(1, state, force=True)
        monkeypatch.undo()
        assert_intact(ckptr, [0])
        ckptr.save(1, state, force=True)
        np.testing.assert_array_equal(ckptr.load(1)["big23"], state["big23"])


def test_a_short_write_of_a_part_whose_items_are_wider_than_a_byte_goes_on_from_the_byte_it_ended_at(tmp_path):
    """A real short write (the file size limit, SIGXFSZ ignored: os.write writes up to it and returns the count) of a
    float32 part: the rest is written from that byte, so the write past the limit raises (was: the rest sliced by
    items, empty, and the file left 6 of 12 bytes long without an error)."""
    path = tmp_path / "part"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6, hard))
    try:
        storage.write_file(path, [np.arange(3, dtype=np.float32)])
    except OSError as e:
        raised = e.errno
    else:
        raised = None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert raised == errno.EFBIG, f"no error; {path.stat().st_size} of 12 bytes written"
    storage.write_file(path, [np.arange(3, dtype=np.float32), b"\x01\x02"])  # (no limit: every byte, in order)
    assert path.read_bytes() == np.arange(3, dtype=np.float32).tobytes() + b"\x01\x02"
