"""One writer per directory: a second writer is refused, a dead writer's lock is not stuck, readers are free."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from ckpt import errors
from ckpt import format as fmt
from ckpt.training import Checkpointer
from tests import crash_worker, fsutil, procs

HOLD_THE_LOCK = """
import signal
import sys
import numpy as np
from ckpt.training import Checkpointer
ckptr = Checkpointer(sys.argv[1])
ckptr.save(0, {"w": np.arange(4.0)}, force=True)
print("ready", flush=True)
signal.pause()  # holds the Checkpointer open until killed
"""

STATE = {"w": np.ones(3)}


@pytest.fixture
def other_writer(tmp_path):
    """A process that has saved step 0 of ``tmp_path / 'root'`` and keeps its Checkpointer open."""
    proc = procs.start(HOLD_THE_LOCK, str(tmp_path / "root"))
    try:
        procs.wait_for_line(proc, "ready")
        yield proc
    finally:
        procs.stop(proc)


@pytest.mark.parametrize("how", ["save", "save_async", "save_checkpointables"])
def test_a_second_writer_in_another_process_is_refused_before_writing_anything(tmp_path, other_writer, how):
    root = tmp_path / "root"
    before = fsutil.snapshot(root)
    with Checkpointer(root) as second:
        args = {"state": STATE} if how != "save_checkpointables" else {"checkpointables": {"state": STATE}}
        with pytest.raises(errors.DirectoryLockedError) as info:
            getattr(second, how)(1, force=True, **args)
        message = str(info.value)
        assert str(root) in message and f"pid {other_writer.pid}" in message and "one writer per directory" in message
        assert [c.step for c in second.checkpoints] == [0]
    assert fsutil.snapshot(root) == before


def test_readers_list_and_load_while_another_process_holds_the_writer_lock(tmp_path, other_writer):
    with Checkpointer(tmp_path / "root") as reader:
        assert [c.step for c in reader.checkpoints] == [0]
        np.testing.assert_array_equal(reader.load()["w"], np.arange(4.0))
        assert reader.metadata(0).metrics is None
        np.testing.assert_array_equal(reader.load_async(0).result()["w"], np.arange(4.0))


def test_cleaning_up_temporaries_is_refused_while_another_process_writes(tmp_path, other_writer):
    root = tmp_path / "root"
    in_flight = root / ("1" + fmt.TMP_SUFFIX)
    in_flight.mkdir()  # what the writer's next save looks like while it is being written
    with pytest.raises(errors.DirectoryLockedError):
        Checkpointer(root, cleanup_tmp_directories=True)
    assert in_flight.exists()


def test_the_lock_of_a_killed_writer_is_released_and_the_next_writer_saves(tmp_path, other_writer):
    root = tmp_path / "root"
    with Checkpointer(root) as second:
        with pytest.raises(errors.DirectoryLockedError):
            second.save(1, STATE, force=True)
        assert procs.stop(other_writer) == -9  # SIGKILL: no chance to release anything
        assert second.save(1, STATE, force=True)
        assert [c.step for c in second.checkpoints] == [0, 1]


def test_two_checkpointers_in_one_process_take_turns(tmp_path):
    first, second = Checkpointer(tmp_path), Checkpointer(tmp_path)
    try:
        first.save(0, STATE, force=True)
        with pytest.raises(errors.DirectoryLockedError, match=f"pid {os.getpid()}"):
            second.save(1, STATE, force=True)
        first.close()
        assert second.save(1, STATE, force=True)
        second.reload()
        assert [c.step for c in second.checkpoints] == [0, 1]
    finally:
        first.close()
        second.close()


def test_a_checkpointer_dropped_without_close_lets_the_next_one_write(tmp_path):
    # a notebook cell that makes the Checkpointer, run again: the first one's lock used to stay held
    ckptr = Checkpointer(tmp_path)
    ckptr.save(0, STATE, force=True)
    response = ckptr.save_async(1, STATE, force=True)
    again = Checkpointer(tmp_path)
    with pytest.raises(errors.DirectoryLockedError, match=f"pid {os.getpid()}, this process: one not closed"):
        again.save(2, STATE, force=True)  # the first is still referenced
    response.result()
    del ckptr, response
    gc.collect()  # (a Checkpointer may sit in a reference cycle: then it goes at the next collection)
    assert again.save(2, STATE, force=True)
    again.reload()
    assert [c.step for c in again.checkpoints] == [0, 1, 2]
    again.close()


def test_a_reader_loading_while_a_writer_saves_and_collects_garbage_gets_whole_steps_or_step_not_found(tmp_path):
    root = tmp_path / "root"
    worker, log = crash_worker.start(root, "mixed")
    try:
        crash_worker.wait_for(worker, log, "committed 3")
        loaded = 0
        with Checkpointer(root) as reader:
            while loaded < 40:
                reader.reload()
                for info in reader.checkpoints:  # the oldest listed step is the next one deleted
                    try:
                        tree = reader.load(info.step)
                    except errors.StepNotFoundError:
                        continue  # deleted by the writer's garbage collection since the listing
                    np.testing.assert_array_equal(tree["big"], crash_worker.state(info.step)["big"])
                    assert tree["small"]["p5"].tolist() == crash_worker.state(info.step)["small"]["p5"].tolist()
                    loaded += 1
    finally:
        worker.kill()
        worker.join()
    assert loaded >= 40
