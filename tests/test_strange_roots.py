"""Strange roots, races and clocks: a root that is a file or read-only, odd entries in it, a step deleted
by another process while it is read, forked children of a writer, wall clocks that jump, NaN metrics,
paths tensorstore would read otherwise. Each gets a clear ckpt error or works, and the root is unchanged."""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import cli, convert, errors, loading
from ckpt import format as fmt
from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp
from tests import fsutil, procs

ALWAYS = sdp.FixedIntervalPolicy(1)
STATE = {"w": np.arange(6.0), "n": 3}


def _saved_root(root: Path, steps=(0, 1)) -> Path:
    with Checkpointer(root, save_decision_policy=ALWAYS, custom_metadata={"run": "r"}) as ckptr:
        for step in steps:
            ckptr.save(step, {**STATE, "n": step}, metrics={"loss": 1.0 / (step + 1)})
    return root


# ------------------------------------------------------------------------------ odd roots
@pytest.mark.parametrize("where", ["the root", "a directory above the root"])
def test_a_root_that_is_a_file_gets_an_error_that_names_it_and_says_what_to_do(tmp_path, where):
    file = tmp_path / "runs"
    file.write_text("not a directory")
    root = file if where == "the root" else file / "exp1"
    before = fsutil.snapshot(tmp_path)
    with pytest.raises(errors.RootDirectoryError) as info:
        Checkpointer(root)
    message = str(info.value)
    assert str(root) in message and "not a directory" in message and "Pass the path of a directory" in message
    assert f"{file} is a regular file of 15 bytes" in message
    assert info.value.path == root
    assert fsutil.snapshot(tmp_path) == before


@pytest.mark.parametrize("way", ["Checkpointer", "ckpt.save", "ckpt.save_async", "ckpt convert"])
@pytest.mark.parametrize("in_the_way", ["a file", "a symbolic link to itself"])
def test_a_path_below_a_file_or_a_link_loop_gets_the_error_that_names_what_is_in_the_way(tmp_path, way, in_the_way):
    """Not a FileExistsError that reads as if the checkpoint existed, nor an OSError of a link loop."""
    runs = tmp_path / "runs"
    if in_the_way == "a file":
        runs.write_text("not a directory")
    else:
        os.symlink(runs, runs)
    path = runs / "exp1" / "model"
    before = fsutil.snapshot(tmp_path)
    with pytest.raises(errors.RootDirectoryError) as info:
        if way == "Checkpointer":
            Checkpointer(path)
        elif way == "ckpt convert":
            list(convert.convert_root(_saved_root(tmp_path / "source"), path))
        else:
            getattr(ckpt, way.split(".")[1])(path, STATE)
    assert f"{runs} is {'a regular file' if in_the_way == 'a file' else 'a symbolic link'}" in str(info.value)
    assert {k: v for k, v in fsutil.snapshot(tmp_path).items() if not k.startswith("source")} == before


def test_a_file_named_like_a_step_or_a_step_whose_manifest_is_a_directory_does_not_stop_the_root(tmp_path, caplog):
    root = _saved_root(tmp_path / "root")
    (root / "456").write_bytes(b"not a step")
    (root / "10").mkdir()
    (root / "10" / fmt.MANIFEST).mkdir()
    before = fsutil.snapshot(root)
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(root, save_decision_policy=ALWAYS) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1]
        assert ckptr.load()["n"] == 1
        for step in (10, 456):
            with pytest.raises(errors.ForeignEntryError, match=str(root / str(step))):
                ckptr.save(step, STATE, force=True, overwrite=True)
    assert f"skipping {root / '456'}, which holds a regular file of 10 bytes" in caplog.text
    assert f"{root / '10'}, which holds a directory holding 'manifest.json', whose manifest.json is not a regular" \
           in caplog.text
    assert fsutil.snapshot(root) == before


def test_a_read_only_root_is_listed_and_loaded_and_a_save_says_why_it_cannot_write(tmp_path, caplog):
    root = _saved_root(tmp_path / "root")
    (root / "2.ckpt-tmp").mkdir()  # what a crashed save leaves
    before = fsutil.snapshot(root)
    with fsutil.read_only(root):
        with Checkpointer(root, cleanup_tmp_directories=True) as ckptr:  # was: RootDirectoryError at the open
            assert [c.step for c in ckptr.checkpoints] == [0, 1] and ckptr.load(1)["n"] == 1
        assert f"temporary directories left in place: [Errno 30] cannot write in {root}" in caplog.text
        with Checkpointer(root, save_decision_policy=ALWAYS, custom_metadata={"run": "other"}) as ckptr:
            assert [c.step for c in ckptr.checkpoints] == [0, 1]
            assert ckptr.checkpoints[1].metrics == {"loss": 0.5}
            assert ckptr.load(0)["n"] == 0 and ckptr.load_async().result(timeout=60)["n"] == 1
            assert ckptr.metadata(1).metadata["w"].shape == (6,)
            assert ckptr.root_metadata().custom_metadata == {"run": "r"}
            with pytest.raises(errors.RootDirectoryError) as info:
                ckptr.save(2, STATE)
            message = str(info.value)
            assert str(root) in message and "Read-only file system" in message and "loaded" in message
        assert ckpt.load(root / "1")["n"] == 1
        assert ckpt.metadata(root / "1").metrics == {"loss": 0.5}
        assert ckpt.path.step.find_all(root) == {0: "0", 1: "1"}
    assert fsutil.snapshot(root) == before


def test_a_read_only_root_holding_its_latest_step_set_aside_by_a_crash_says_that_step_is_not_listed(tmp_path, caplog):
    """Was: step 1, set aside as 1.ckpt-replaced by an overwrite killed between its two renames (no atomic exchange),
    which only a Checkpointer that may write puts back, was left out silently: latest was step 0, and load() read it."""
    root = _saved_root(tmp_path / "root")
    ckpt.storage.mark(root / "1")  # as the commit leaves it
    os.rename(root / "1", root / ("1" + fmt.REPLACED_SUFFIX))
    with fsutil.read_only(root):
        with Checkpointer(root) as ckptr:
            assert ckptr.latest.step == 0
    assert f"1.ckpt-replaced, set aside by a save with overwrite=True that a crash interrupted, is not listed" \
        in caplog.text
    with Checkpointer(root) as ckptr:
        assert ckptr.latest.step == 1


def test_a_deletion_in_a_root_that_became_read_only_says_so_naming_the_root_and_keeps_the_step(tmp_path):
    """And a deletion refused by the step alone (immutable), in a root this process may write, names the step."""
    root = _saved_root(tmp_path / "root")
    with Checkpointer(root, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(2, STATE)  # (the root taken: its lock held)
        with fsutil.read_only(root):
            for delete in (ckptr.delete, lambda step: ckpt.delete(root / str(step))):
                with pytest.raises(errors.RootDirectoryError, match=f"cannot write in {root}: Read-only"):
                    delete(1)
            assert [c.step for c in ckptr.checkpoints] == [0, 1, 2] and ckptr.load(1)["n"] == 1
        thaw = fsutil.undeletable(root / "1")  # the root is writable, step 1 alone is not: its error, not the root's
        try:
            with pytest.raises(PermissionError, match=f"'{root / '1'}' ->") as info:
                ckptr.delete(1)
            assert not isinstance(info.value, errors.RootDirectoryError)
        finally:
            thaw()


def test_a_save_in_a_root_that_became_read_only_says_so_naming_the_root_and_keeps_the_steps(tmp_path):
    root = _saved_root(tmp_path / "root")
    with Checkpointer(root, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(2, STATE)  # (the root taken: its lock held)
        before = fsutil.snapshot(root)
        with fsutil.read_only(root):
            saves = (lambda: ckptr.save(3, STATE), lambda: (ckptr.save_async(3, STATE), ckptr.wait()),
                     lambda: ckpt.save(root / "model", STATE))
            for save in saves:
                with pytest.raises(errors.RootDirectoryError, match=f"cannot write in {root}: Read-only"):
                    save()
        thaw = fsutil.undeletable(root)  # permission refused (EPERM): RootNotWritableError, a PermissionError
        try:
            with pytest.raises(errors.RootNotWritableError, match=f"cannot write in {root}: Operation not permitted"):
                ckptr.save(3, STATE)
        finally:
            thaw()
        assert fsutil.snapshot(root) == before and [c.step for c in ckptr.checkpoints] == [0, 1, 2]


# --------------------------------------------------------------------------------- races
GARBAGE_COLLECT = """
import sys
import numpy as np
from ckpt.training import Checkpointer, preservation_policies as pp
with Checkpointer(sys.argv[1], preservation_policy=pp.LatestN(1)) as ckptr:
    ckptr.save(int(sys.argv[2]), {"w": np.zeros(3)}, force=True)
print("collected", flush=True)
"""


def _garbage_collected_while_reading(monkeypatch, root: Path, next_step: int) -> None:
    """Makes the next read of a step's trees run another process's save of ``next_step`` first, whose garbage
    collection (LatestN(1)) deletes the step being read: after its manifest was read, before its arrays."""
    read_tree = loading.read_tree

    def then_collected(step_dir, manifest):
        found = read_tree(step_dir, manifest)
        result = procs.run_script(GARBAGE_COLLECT, str(root), str(next_step))
        assert "collected" in result.stdout, result.stdout + result.stderr
        return found

    monkeypatch.setattr(loading, "read_tree", then_collected)


def test_a_checkpointer_load_of_a_step_another_process_deletes_meanwhile_says_the_step_is_gone(tmp_path,
                                                                                            monkeypatch):
    root = _saved_root(tmp_path / "root")
    with Checkpointer(root) as reader:
        _garbage_collected_while_reading(monkeypatch, root, 2)
        with pytest.raises(errors.StepNotFoundError, match=r"step 0 .* was deleted while it was being read") as info:
            reader.load(0)
        assert info.value.step == 0
        assert [c.step for c in reader.checkpoints] == [1]  # forgotten; a reload lists what is left
        reader.reload()
        assert [c.step for c in reader.checkpoints] == [2]


def test_a_load_async_of_a_step_this_checkpointer_deletes_meanwhile_says_that_it_deleted_it(tmp_path, monkeypatch):
    """(Its error blamed another process's garbage collection.)"""
    root = _saved_root(tmp_path / "root")
    with Checkpointer(root) as ckptr:
        read_tree, deleting = loading.read_tree, ckptr.delete

        def then_deleted(step_dir, manifest):  # after the manifest was read, before the arrays
            found = read_tree(step_dir, manifest)
            deleting(0)
            return found

        monkeypatch.setattr(loading, "read_tree", then_deleted)
        with pytest.raises(errors.StepNotFoundError) as info:
            ckptr.load_async(0).result()
        assert str(info.value) == (f"step 0 ({root / '0'}) was deleted while it was being read, by this Checkpointer's "
                                   "delete() or delete_async()")
        ckptr.save(0, STATE, force=True)  # saved again, then removed by another tool: no longer its deletion

        def deleting(step: int) -> None:
            shutil.rmtree(root / str(step))

        with pytest.raises(errors.StepNotFoundError, match="by another process's garbage collection"):
            ckptr.load(0)


def test_the_free_load_of_a_step_another_process_deletes_meanwhile_says_the_step_is_gone(tmp_path, monkeypatch):
    root = _saved_root(tmp_path / "root")
    _garbage_collected_while_reading(monkeypatch, root, 2)
    with pytest.raises(errors.StepNotFoundError, match="was deleted while it was being read") as info:
        ckpt.load(root / "1")
    assert info.value.path == root / "1"
    assert sorted(os.listdir(root)) == [fmt.LOCK, "2", fmt.ROOT_METADATA]


OVERWRITE = """
import sys
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    ckptr.save(int(sys.argv[2]), {"w": np.full(100_000, float(sys.argv[3]))}, force=True, overwrite=True)
print("replaced", flush=True)
"""


def _replaced_while_reading(monkeypatch, root: Path, step: int, values: list[float]) -> None:
    """Makes the next reads of a step's trees, one for each of ``values``, run another process's
    ``save(step, overwrite=True)`` of that value first: after the manifest and tree.json were read, before
    the arrays."""
    read_tree = loading.read_tree
    left = list(values)

    def then_replaced(step_dir, manifest):
        found = read_tree(step_dir, manifest)
        if left:
            result = procs.run_script(OVERWRITE, str(root), str(step), str(left.pop(0)))
            assert "replaced" in result.stdout, result.stdout + result.stderr
        return found

    monkeypatch.setattr(loading, "read_tree", then_replaced)


def test_a_load_of_a_step_another_process_replaces_meanwhile_is_no_damage_and_reads_the_new_one(tmp_path,
                                                                                               monkeypatch):
    """A rolling checkpoint (one step saved again with overwrite=True) read by an evaluator: the reader saw
    CheckpointCorruptedError ("does not match its checksum") in a sound step."""
    root = tmp_path / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(1, {"w": np.zeros(100_000)})
    with Checkpointer(root) as reader:
        _replaced_while_reading(monkeypatch, root, 1, [7.0])
        np.testing.assert_array_equal(reader.load(1)["w"], np.full(100_000, 7.0))  # read again: the new one
        assert [c.step for c in reader.checkpoints] == [1]
        _replaced_while_reading(monkeypatch, root, 1, [8.0, 9.0])
        with pytest.raises(errors.StepReplacedError, match="was replaced .* while it was being read") as info:
            reader.load(1)
        assert isinstance(info.value, errors.StepNotFoundError) and info.value.step == 1
        assert [c.step for c in reader.checkpoints] == [1]  # still there: not forgotten
    _replaced_while_reading(monkeypatch, root, 1, [10.0])
    with pytest.raises(errors.StepReplacedError):
        ckpt.load(root / "1")


# ---------------------------------------------------------------------------- forked children
FORK_A_CHILD = """
import multiprocessing
import signal
import sys
import numpy as np
from ckpt.training import Checkpointer
ckptr = Checkpointer(sys.argv[1])
ckptr.save(0, {"w": np.arange(4.0)}, force=True)            # takes the directory lock
def worker(started):
    started.set()  # (after the fork's own handlers ran in this child)
    signal.pause()
fork = multiprocessing.get_context("fork")
started = fork.Event()
child = fork.Process(target=worker, args=(started,))    # a DataLoader worker, say
child.start()
started.wait()
print("ready", child.pid, flush=True)
signal.pause()
"""


def test_a_forked_child_does_not_hold_the_lock_after_its_parent_is_killed(tmp_path):
    root = tmp_path / "root"
    parent = procs.start(FORK_A_CHILD, str(root))
    child_pid = None
    try:
        child_pid = int(procs.wait_for_line(parent, "ready").split()[1])
        with Checkpointer(root) as other:
            with pytest.raises(errors.DirectoryLockedError):  # the parent, alive, still holds it
                other.save(1, STATE, force=True)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=60)
        os.kill(child_pid, 0)  # the orphaned child still runs
        with Checkpointer(root) as restarted:  # at once, while the child lives
            assert restarted.save(1, STATE, force=True)
            assert [c.step for c in restarted.checkpoints] == [0, 1]
    finally:
        procs.stop(parent)
        if child_pid is not None:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -------------------------------------------------------------------------------- clocks
def _shift_wall_clock(monkeypatch, seconds: float) -> None:
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + int(seconds * 1e9))


@pytest.mark.parametrize("shift", [-3600, 2 * 3600])
def test_continuous_checkpointing_measures_intervals_on_a_monotonic_clock(tmp_path, monkeypatch, shift):
    hourly = sdp.ContinuousCheckpointingPolicy(minimum_interval_secs=3600)
    eager = sdp.ContinuousCheckpointingPolicy(minimum_interval_secs=1e-6)
    with Checkpointer(tmp_path / "hourly", save_decision_policy=hourly) as slow, \
            Checkpointer(tmp_path / "eager", save_decision_policy=eager) as fast:
        slow.save(0, STATE, force=True)
        fast.save(0, STATE, force=True)
        _shift_wall_clock(monkeypatch, shift)  # the wall clock is set back an hour, or jumps two hours ahead
        assert not slow.should_save(1)  # an hour has not passed
        assert fast.save(1, STATE)  # a microsecond has
        assert fast.save(2, STATE)


def test_a_wall_clock_set_back_since_the_last_run_does_not_stop_continuous_checkpointing(tmp_path, monkeypatch):
    policy = sdp.ContinuousCheckpointingPolicy(minimum_interval_secs=60)
    with Checkpointer(tmp_path, save_decision_policy=policy) as first:
        first.save(0, STATE, force=True)
    _shift_wall_clock(monkeypatch, -3600)
    with Checkpointer(tmp_path, save_decision_policy=policy) as resumed:  # step 0 is known by its wall time only
        assert resumed.save(1, STATE)
        assert not resumed.should_save(2)  # then on the monotonic clock: 60 s have not passed


# ------------------------------------------------------------------------------- metrics
def test_nan_and_infinite_metrics_are_saved_and_best_n_ranks_nan_worst(tmp_path):
    lowest = pp.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1)
    highest = pp.BestN(get_metric_fn=lambda m: m["acc"], reverse=False, n=1)
    losses = [0.5, math.nan, 0.25, math.nan, math.inf, 0.75]
    with Checkpointer(tmp_path / "low", save_decision_policy=ALWAYS, preservation_policy=lowest) as low, \
            Checkpointer(tmp_path / "high", save_decision_policy=ALWAYS, preservation_policy=highest) as high:
        for step, loss in enumerate(losses):
            low.save(step, STATE, metrics={"loss": loss, "history": [loss, -math.inf]})
            high.save(step, STATE, metrics={"acc": loss})
        assert [c.step for c in low.checkpoints] == [2, 5]  # the lowest loss, and the latest
        assert [c.step for c in high.checkpoints] == [4, 5]  # the highest: inf; never NaN
    with Checkpointer(tmp_path / "low") as again:
        metrics = again.checkpoints[0].metrics
        assert metrics == {"loss": 0.25, "history": [0.25, -math.inf]}
    ckpt.save(tmp_path / "nan", STATE)
    with Checkpointer(tmp_path / "n", save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, STATE, metrics={"loss": math.nan})
        assert math.isnan(ckptr.latest.metrics["loss"])
    with Checkpointer(tmp_path / "n") as again:
        assert math.isnan(again.latest.metrics["loss"])
        assert math.isnan(again.metadata().metrics["loss"])
    assert b"NaN" not in (tmp_path / "n" / "0" / fmt.MANIFEST).read_bytes()  # the manifest stays strict JSON


# --------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("make", [
    lambda tmp_path: Checkpointer(tmp_path / "a\\b"),
    lambda tmp_path: ckpt.save(tmp_path / "a\\b", STATE),
    lambda tmp_path: ckpt.load(tmp_path / "a\\b"),
])
def test_a_path_with_a_backslash_is_refused_before_anything_is_written(tmp_path, make):
    with pytest.raises(ValueError, match=r"backslash, which tensorstore reads as a path separator"):
        make(tmp_path)
    assert list(tmp_path.iterdir()) == []


NOT_UTF8 = os.fsdecode(b"run_\xff")  # a name of other bytes, as os.listdir gives it (a lone surrogate)


@pytest.mark.parametrize("make", [
    lambda tmp_path: Checkpointer(tmp_path / NOT_UTF8),
    lambda tmp_path: ckpt.save(tmp_path / NOT_UTF8, STATE),
    lambda tmp_path: ckpt.LocalCheckpointOptions(tmp_path / NOT_UTF8),
])
def test_a_path_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path, make):
    """tensorstore cannot open such a path: the first save failed with pybind11's "Unable to cast Python
    instance of type <class 'str'>", the root and its lock already made."""
    with pytest.raises(ValueError, match="is not valid UTF-8"):
        make(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("directory, error", [
    ("", r"the directory is '': give the checkpoint root's path"),
    ("hdfs://namenode/runs", r"'hdfs://namenode/runs' is a hdfs:// URL; ckpt stores to local directories"),
    ("file://runs/exp1", r"a file:// URL names a local path from the root"),
    (str(Path("s3://bucket/runs") / "exp1"),  # was: a directory s3: in the current one, the run lost with the machine
     r"the path 's3:/bucket/runs/exp1' is the URL 's3://bucket/runs/exp1' with a slash lost"),
])
@pytest.mark.parametrize("make", [
    lambda directory: Checkpointer(directory),
    lambda directory: ckpt.save(directory, STATE),
    lambda directory: lightning_callback(directory),
    lambda directory: ckpt.LocalCheckpointOptions(directory),
])
def test_an_empty_path_or_a_url_ckpt_cannot_store_to_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, directory, error, make):
    monkeypatch.chdir(tmp_path)  # an empty path would have been the current directory
    with pytest.raises(ValueError, match=error):
        make(directory)
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["ls", directory]) == 2


def lightning_callback(directory: str):
    pytest.importorskip("pytorch_lightning")
    from ckpt.integrations.lightning import CheckpointCallback
    return CheckpointCallback(directory)


def test_a_file_url_means_its_local_path(tmp_path):
    url = f"file://{tmp_path}/run"
    with Checkpointer(url) as ckptr:
        ckptr.save(0, STATE)
    loaded = ckpt.load(f"{url}/0")
    assert (tmp_path / "run" / "0").is_dir() and np.array_equal(loaded["w"], STATE["w"]) and loaded["n"] == 3


def test_a_free_checkpoint_whose_name_is_too_long_for_its_set_aside_name_is_saved_overwritten_and_deleted(tmp_path):
    """Was: for a name of 242 to 246 bytes (its temporary's name fits, '<name>.ckpt-replaced' does not), ckpt.save
    raised OSError 'File name too long: ...ckpt-replaced', with overwrite=True once the checkpoint was committed, and
    ckpt.delete raised it too, keeping the checkpoint."""
    model = tmp_path / ("m" * (255 - len(fmt.TMP_SUFFIX)))
    ckpt.save(model, {"v": np.ones(3)})
    ckpt.save(model, {"v": np.full(3, 2.0)}, overwrite=True)
    assert ckpt.load(model)["v"].tolist() == [2.0] * 3
    assert ckpt.delete(model) and os.listdir(tmp_path) == []


def test_the_load_of_a_missing_path_too_long_for_its_set_aside_name_says_there_is_no_checkpoint(tmp_path):
    """Was: OSError 'File name too long: .../<name>.ckpt-replaced', from the look for the checkpoint set aside."""
    with pytest.raises(errors.CheckpointNotFoundError, match="the path does not exist$"):
        ckpt.load(tmp_path / ("m" * 245))


@pytest.mark.parametrize("name", ["sp ace", "p%20q", "x?y", "h#i", "c:d", "new\nline", "ünï"])
def test_a_root_with_odd_characters_means_exactly_that_path(tmp_path, name):
    root = tmp_path / name
    with Checkpointer(root) as ckptr:
        ckptr.save(0, {"big": np.arange(300_000, dtype=np.float32), "n": 1})
    assert sorted(os.listdir(tmp_path)) == [name]
    np.testing.assert_array_equal(ckpt.load(root / "0")["big"], np.arange(300_000, dtype=np.float32))


def test_a_root_given_with_dot_dot_means_what_the_system_means(tmp_path):
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    with Checkpointer(tmp_path / "link" / ".." / "root") as ckptr:  # the system resolves link/.. to real/
        ckptr.save(0, {"big": np.arange(300_000, dtype=np.float32)})
    assert sorted(os.listdir(tmp_path / "real")) == ["deep", "root"]
    assert (tmp_path / "real" / "root" / "0" / fmt.MANIFEST).exists()


def test_a_path_with_dot_dot_ending_in_a_symbolic_link_is_the_link_which_no_save_or_deletion_goes_through(tmp_path):
    ckpt.save(tmp_path / "model", STATE)
    (tmp_path / "link").symlink_to(tmp_path / "model")
    (tmp_path / "dangling").symlink_to(tmp_path / "elsewhere")
    through = tmp_path / "sub" / ".."  # (the system follows no link named last, '..' or not)
    (tmp_path / "sub").mkdir()
    with pytest.raises(errors.NotACheckpointError, match="link"):
        ckpt.delete(through / "link")
    with pytest.raises(errors.ForeignEntryError, match="symbolic link"):
        ckpt.save(through / "link", {"w": np.zeros(2)}, overwrite=True)
    with pytest.raises(errors.ForeignEntryError, match="symbolic link"):
        ckpt.save(through / "dangling", {"w": np.zeros(2)})
    assert not (tmp_path / "elsewhere").exists() and ckpt.load(through / "link")["n"] == STATE["n"]
    np.testing.assert_array_equal(ckpt.load(tmp_path / "model")["w"], STATE["w"])
