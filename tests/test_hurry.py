"""A background write goes on at full speed once someone waits for it (wait, close, a new save, the
response's result) or a preemption is announced; a write switched half-way is whole and exact. Its
files are fsync'd before tree.json is written, and each chunk file's writeback starts as it is written."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import ckpt
from ckpt import format as fmt
from ckpt import preemption, saving, storage, verify


@pytest.fixture
def writes(monkeypatch):
    """The tensorstore context (background or not) of every array opened for writing."""
    seen: list[bool] = []
    original = storage.open_for_write

    def open_for_write(spec, *, background=False, synced=True):
        seen.append(background)
        assert synced is not background, "a background write fsyncs its files itself, a full-speed one by tensorstore"
        return original(spec, background=background, synced=synced)

    monkeypatch.setattr(storage, "open_for_write", open_for_write)
    return seen


def handed_off(tmp_path, state) -> saving.StepWriter:
    writer = saving.StepWriter(saving.plan({"state": state}), tmp_path / "0.ckpt-tmp", tmp_path / "0")
    writer.hand_off()
    return writer


def test_a_write_hurried_between_two_chunks_finishes_at_full_speed_and_loads_exactly(tmp_path, monkeypatch, writes):
    monkeypatch.setattr(fmt, "ARRAY_CHUNK_BYTES", 1 << 20)  # the big leaf spans 3 chunk files
    state = {"big": np.arange((5 << 20) // 8, dtype=np.float32), "small": np.arange(7)}
    writer = handed_off(tmp_path, state)
    chunks_written = []
    original = writer._slow

    def slow() -> bool:  # hurried by a waiter just after the first chunk is on disk
        chunks_written.append(1)
        if len(chunks_written) == 3:
            writer.hurry()
        return original()

    writer._slow = slow
    writer.run(0)
    assert writes == [True, False, False], "the big leaf opened in the background, reopened at full speed, then packed"
    loaded = ckpt.load(tmp_path / "0")
    np.testing.assert_array_equal(loaded["big"], state["big"])
    np.testing.assert_array_equal(loaded["small"], state["small"])
    assert verify.verify_step(tmp_path / "0").ok  # every chunk checksum holds


def test_a_preemption_notice_switches_a_background_write_to_full_speed(tmp_path, writes):
    writer = handed_off(tmp_path, {"big": np.ones((1 << 20) // 4 + 1, np.float32)})
    preemption.notify()
    try:
        writer.run(0)
    finally:
        preemption.reset()
    assert writes == [False]


@pytest.mark.parametrize("how", ["wait", "result", "close", "next save"])
def test_waiting_for_a_background_save_hurries_it(tmp_path, writes, how, monkeypatch):
    gate, hurried = threading.Event(), []
    original_run, original_hurry = saving.StepWriter.run, saving.StepWriter.hurry

    def run(self, step):
        assert gate.wait(30)
        return original_run(self, step)

    def hurry(self):
        hurried.append(self.final_dir.name)
        gate.set()
        original_hurry(self)

    monkeypatch.setattr(saving.StepWriter, "run", run)
    monkeypatch.setattr(saving.StepWriter, "hurry", hurry)
    ckptr = ckpt.Checkpointer(tmp_path)
    response = ckptr.save_async(0, {"big": np.ones((1 << 20) // 4 + 1, np.float32)})
    {"wait": ckptr.wait, "result": response.result, "close": ckptr.close,
     "next save": lambda: ckptr.save_async(1, {"big": np.ones(3)})}[how]()
    ckptr.close()
    assert hurried[0] == "0" and writes[0] is False, "the write of step 0 ran at full speed"
    assert ckpt.load(tmp_path / "0")["big"].sum() == (1 << 20) // 4 + 1


def _data_files(step_dir) -> set[str]:
    return {os.path.join(d, name) for top in ("arrays", "packed") for d, _, names in os.walk(step_dir / top)
            for name in names}


def test_a_background_write_fsyncs_every_data_file_before_tree_json_and_starts_each_chunks_writeback(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "ARRAY_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(fmt, "PACKED_CHUNK_BYTES", 1 << 16)
    small = {f"s{i}": np.full(1000, i, np.float64) for i in range(40)}  # 320 KB packed: 5 chunk files
    # Every chunk goes through tensorstore, whose writes this test follows: a buffer that lies page-aligned
    # (numpy's memory sometimes does, by chance) would go straight from memory instead, as
    # tests/test_direct_io.py checks.
    monkeypatch.setattr(storage, "write_direct", lambda path, data: False)
    state = {"big": np.arange((5 << 20) // 8, dtype=np.float32), "scalar": np.float32(3), **small}
    fsynced, started, tree_written = [], [], []
    real_fsync, real_start, real_write = os.fsync, storage.start_writeback, storage.write_file

    def fsync(fd):  # what each Python fsync made durable, by its path
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def start_writeback(path):
        assert os.path.isfile(path), f"{path}: the writeback of a file not written yet"
        started.append(str(path))
        return real_start(path)

    def write_file(path, data, **kw):
        if path.name == fmt.TREE:
            tree_written.append(set(fsynced))
        return real_write(path, data, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(storage, "start_writeback", start_writeback)
    monkeypatch.setattr(storage, "write_file", write_file)
    writer = handed_off(tmp_path, state)
    writer.run(0)
    step = tmp_path / "0"
    files = {f.replace(str(step), str(tmp_path / "0.ckpt-tmp")) for f in _data_files(step)}
    assert len(files) >= 3 + 5 + 2, "the chunks of the big leaf and of the packed array, and their zarr.json"
    assert files <= tree_written[0], f"not fsync'd before tree.json: {sorted(files - tree_written[0])}"
    chunk_files = {f for f in files if not f.endswith("zarr.json")}
    assert set(started) == chunk_files, "each chunk file's writeback started once it was written"
    loaded = ckpt.load(step)
    np.testing.assert_array_equal(loaded["big"], state["big"])
    assert all((loaded[k] == v).all() for k, v in small.items()) and verify.verify_step(step).ok


def test_start_writeback_and_fsync_files_on_a_real_directory(tmp_path):
    (tmp_path / "c").mkdir()
    for name in ("a", "c/b"):
        (tmp_path / name).write_bytes(os.urandom(1 << 16))
    storage.start_writeback(tmp_path / "a")  # advice to the kernel: returns at once, changes no byte
    storage.fsync_files(tmp_path)
    assert (tmp_path / "a").stat().st_size == 1 << 16
    with pytest.raises(FileNotFoundError):
        storage.start_writeback(tmp_path / "missing")


def test_fsync_all_fsyncs_every_path_and_then_raises_the_first_error_naming_its_path(tmp_path, monkeypatch):
    paths = [tmp_path / f"chunk{i}" for i in range(20)]
    for path in paths:
        path.write_bytes(b"x")
    paths.insert(7, tmp_path / "missing")
    synced = []
    real_fsync_path = storage.fsync_path
    monkeypatch.setattr(storage, "fsync_path", lambda path: (real_fsync_path(path), synced.append(path)))
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.fsync_all(paths)
    assert sorted(synced) == sorted(paths[:7] + paths[8:])


@pytest.mark.timeout(30)
def test_fsync_files_and_start_writeback_neither_follow_links_nor_wait_on_fifos(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ckpt's")
    (tmp_path / "step").mkdir()
    os.mkfifo(tmp_path / "step" / "fifo")  # opened for reading, it would wait for a writer forever
    os.symlink(outside, tmp_path / "step" / "link")
    (tmp_path / "step" / "chunk").write_bytes(b"x" * 4096)
    opened = []
    real_fsync_path = storage.fsync_path
    monkeypatch.setattr(storage, "fsync_path", lambda path: (opened.append(path.name), real_fsync_path(path)))
    storage.fsync_files(tmp_path / "step")
    assert opened == ["chunk"]
    storage.start_writeback(tmp_path / "step" / "fifo")  # returns at once
    with pytest.raises(OSError):
        storage.start_writeback(tmp_path / "step" / "link")


def test_an_fsync_that_fails_names_its_file_and_the_background_save_commits_nothing(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("zarr.json"):
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    writer = handed_off(tmp_path, {"big": np.ones((1 << 20) // 4 + 1, np.float32)})
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"Input/output error: '.*zarr\.json'"):
        writer.run(0)
    assert not (tmp_path / "0").exists() and not (tmp_path / "0.ckpt-tmp").exists()
