"""Crash consistency: a saving process killed with SIGKILL at random moments, and the commit's durability order.

Each trial forks ``crash_worker.main`` from a clean forkserver (a loop of sync, async or mixed saves with ``LatestN(2)``
garbage collection) on a root shared by the trials of its mode, kills it after a random delay drawn
from a seeded RNG, and checks what a new Checkpointer finds. The delays only spread the kills over
the phases of a save; nothing asserts on timing. ``CKPT_SOAK_TRIALS=1000`` runs a longer soak.
"""
from __future__ import annotations

import collections
import errno
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ckpt
import ckpt.cli
from ckpt import format as fmt
from ckpt import storage
from ckpt.path import step as step_lib
from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from tests import crash_worker, procs

MODES = ("sync", "async", "mixed")
TRIALS = int(os.environ.get("CKPT_SOAK_TRIALS") or 54)
SEED = int(os.environ.get("CKPT_CRASH_SEED") or 20240607)
MAX_KILL_DELAY_SECS = 0.25  # about 20 saves of the worker's state: kills land in every phase of a save


def run_and_kill(root: Path, mode: str, delay: float) -> tuple[list[int], list[int], str]:
    """Runs the worker until ``delay`` seconds after it is ready, kills it; returns (begun, committed, output)."""
    worker, log = crash_worker.start(root, mode)
    try:
        crash_worker.wait_for(worker, log, "ready")
        time.sleep(delay)
    finally:
        worker.kill()
        worker.join()
    output = log.read_text()
    assert worker.exitcode == -9, f"the worker exited by itself with {worker.exitcode}:\n{output}"
    begun = [int(n) for n in re.findall(r"^begin (\d+)$", output, re.M)]
    committed = [int(n) for n in re.findall(r"^committed (\d+)$", output, re.M)]
    return begun, committed, output


def temporaries(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.endswith((fmt.TMP_SUFFIX, fmt.DELETING_SUFFIX)))


def assert_step_matches(ckptr: Checkpointer, step: int) -> None:
    loaded = ckptr.load(step)
    expected = crash_worker.state(step)
    assert loaded.keys() == expected.keys()
    assert loaded["step"] == step and loaded["name"] == expected["name"] and loaded["bytes"] == expected["bytes"]
    np.testing.assert_array_equal(loaded["big"], expected["big"])
    for key, value in expected["small"].items():
        np.testing.assert_array_equal(loaded["small"][key], value)
    assert next(c for c in ckptr.checkpoints if c.step == step).metrics == crash_worker.metrics(step)


def check_recovery(root: Path, previous_latest: int | None, begun: list[int], committed: list[int]) -> int:
    """Asserts what a new Checkpointer finds after a kill, saves the next step; returns the new latest."""
    lowest = max(committed) if committed else previous_latest
    highest = max(begun) if begun else previous_latest
    with crash_worker.checkpointer(root) as ckptr:
        listed = [c.step for c in ckptr.checkpoints]
        on_disk = sorted(step_lib.find_steps(os.listdir(root), step_lib.standard_name_format()))
        assert listed == on_disk, "a directory with a final step name is not a loadable committed step"
        latest = None if ckptr.latest is None else ckptr.latest.step
        assert lowest is None or (latest is not None and latest >= lowest), f"latest {latest}, committed {lowest}"
        assert latest is None or (highest is not None and latest <= highest), f"latest {latest}, begun {highest}"
        assert len(listed) <= crash_worker.KEEP + 1  # a kill between commit and garbage collection keeps one more
        for step in listed:
            assert_step_matches(ckptr, step)
        following = 0 if latest is None else latest + 1
        assert ckptr.save(following, crash_worker.state(following), force=True, metrics=crash_worker.metrics(following))
        assert ckptr.latest.step == following
        assert not (root / (str(following) + fmt.TMP_SUFFIX)).exists()
    with Checkpointer(root) as reader:
        assert reader.latest.step == following
        assert_step_matches(reader, following)
    return following


@pytest.mark.timeout(max(300, 3 * TRIALS))  # a soak runs longer than the suite's per-test limit
def test_saves_killed_at_random_moments_leave_only_committed_loadable_steps_and_the_next_save_works(tmp_path):
    rng = random.Random(SEED)
    outcomes: collections.Counter[str] = collections.Counter()
    latest: dict[str, int | None] = dict.fromkeys(MODES)
    for trial in range(TRIALS):
        mode = MODES[trial % len(MODES)]
        root = tmp_path / mode
        delay = rng.uniform(0, MAX_KILL_DELAY_SECS)
        begun, committed, output = run_and_kill(root, mode, delay)
        in_flight = any(name.endswith(fmt.TMP_SUFFIX) for name in os.listdir(root))
        outcomes["killed while writing a step" if in_flight else "killed between saves"] += 1
        outcomes["committed before the kill"] += bool(committed)
        try:
            latest[mode] = check_recovery(root, latest[mode], begun, committed)
        except Exception as e:
            raise AssertionError(f"trial {trial} (mode {mode}, killed after {delay:.3f} s, CKPT_CRASH_SEED={SEED}): "
                                 f"{e}\nworker output:\n{output[-2000:]}") from e
    # The harness must really interrupt saves, and the workers must really commit between kills.
    assert outcomes["killed while writing a step"] > 0, outcomes
    assert outcomes["committed before the kill"] > 0, outcomes
    for mode in MODES:
        with Checkpointer(tmp_path / mode, cleanup_tmp_directories=True) as ckptr:
            assert ckptr.latest.step == latest[mode]
        assert temporaries(tmp_path / mode) == []


# ------------------------------------------------------------------------------- durability order
SAVE_ONE_STEP = """
import sys
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    ckptr.save(7, {"big": np.ones(300_000), "small": np.arange(5), "n": 1}, force=True)
"""

_CALL = re.compile(r'^(\d+)\s+(\w+)\((.*)')
_FD_PATH = re.compile(r'^\d+<([^>]*)>')


def syscalls(trace: str) -> list[tuple[str, list[str]]]:
    """(name, paths) of each completed syscall, in completion order (``-f -y`` output, calls resumed by pid)."""
    pending: dict[tuple[str, str], str] = {}
    calls = []
    for line in trace.splitlines():
        resumed = re.match(r'^(\d+)\s+<\.\.\. (\w+) resumed>', line)
        if resumed:
            args = pending.pop((resumed.group(1), resumed.group(2)), "")
            name = resumed.group(2)
        else:
            match = _CALL.match(line)
            if not match:
                continue
            pid, name, args = match.groups()
            if line.endswith("<unfinished ...>"):
                pending[(pid, name)] = args
                continue
        if name in ("fsync", "fdatasync"):
            fd = _FD_PATH.match(args)
            calls.append((name, [fd.group(1)] if fd else []))
        else:
            calls.append((name, re.findall(r'"([^"]*)"', args)))
    return calls


def test_data_is_fsynced_before_the_manifest_the_manifest_before_the_rename_and_the_root_after(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the commit's syscalls cannot be observed")
    root = tmp_path / "root"
    trace_file = tmp_path / "trace"
    result = subprocess.run(
        ["strace", "-f", "-y", "-qq", "-o", str(trace_file), "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", SAVE_ONE_STEP, str(root)],
        capture_output=True, text=True, timeout=120, env=procs.env())
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    calls = syscalls(trace_file.read_text())
    tmp, final = str(root / ("7" + fmt.TMP_SUFFIX)), str(root / "7")

    def index(predicate) -> list[int]:
        return [i for i, call in enumerate(calls) if predicate(*call)]

    chunk = re.compile(rf"^{re.escape(tmp)}/({fmt.ARRAYS}/\d+|{fmt.PACKED})/c/\d+(\.__lock)?$")
    data_fsyncs = index(lambda name, paths: name in ("fsync", "fdatasync") and bool(paths) and bool(chunk.match(paths[0])))
    tree_fsync = index(lambda name, paths: name == "fsync" and paths == [f"{tmp}/{fmt.TREE}"])
    manifest_open = index(lambda name, paths: name == "openat" and paths[-1:] == [f"{tmp}/{fmt.MANIFEST}"])
    manifest_fsync = index(lambda name, paths: name == "fsync" and paths == [f"{tmp}/{fmt.MANIFEST}"])
    rename = index(lambda name, paths: name.startswith("rename") and paths == [tmp, final])
    root_fsync = index(lambda name, paths: name == "fsync" and paths == [str(root)])

    synced_chunks = {calls[i][1][0] for i in data_fsyncs}
    assert any(f"/{fmt.ARRAYS}/" in p for p in synced_chunks) and any(f"/{fmt.PACKED}/" in p for p in synced_chunks), \
        f"the large leaf's and the packed leaves' chunks must both be fsync'd: {sorted(synced_chunks)}"
    assert len(tree_fsync) == len(manifest_open) == len(manifest_fsync) == len(rename) == 1 and root_fsync
    assert max(data_fsyncs) < tree_fsync[0] < manifest_open[0] < manifest_fsync[0] < rename[0] < max(root_fsync)
    every_dir = {str(p) for p in (root / "7").rglob("*") if p.is_dir()} | {final}
    synced_dirs = {paths[0].replace(tmp, final, 1) for name, paths in calls[: rename[0]]
                   if name == "fsync" and paths and paths[0].startswith(tmp)}
    assert every_dir <= synced_dirs, f"directories not fsync'd before the rename: {sorted(every_dir - synced_dirs)}"


# ------------------------------------------------------------------------ a kill at each commit step
def kill_at_the_nth_operation(root: Path, kill_at: int, overwrite: bool, exchange: bool) -> tuple[int, str]:
    """Runs :func:`crash_worker.kill_at_the_nth_operation` in a child forked from the clean forkserver; returns
    its exit code and what it printed."""
    log = root.with_name(root.name + ".log")
    child = procs.forkserver(crash_worker.__name__).Process(
        target=crash_worker.kill_at_the_nth_operation,
        args=(str(root), kill_at, overwrite, exchange, str(log)))
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise AssertionError(f"the save killed at file operation {kill_at} ran over 120 s:\n{log.read_text()}")
    return child.exitcode, log.read_text()


@pytest.mark.parametrize("overwrite, exchange", [(False, "exchange"), (True, "exchange"), (True, "no exchange")],
                         ids=["new step", "overwrite", "overwrite without an atomic exchange"])
def test_a_save_killed_before_any_file_operation_of_its_commit_keeps_the_old_or_the_new_step(tmp_path, overwrite,
                                                                                               exchange):
    """Without an atomic exchange, a kill between the commit's two renames left the step under an aside name
    and nothing under its own: the next writer removed it as a leftover (a committed step lost)."""
    code, said = kill_at_the_nth_operation(tmp_path / "dry", 0, overwrite, exchange == "exchange")
    assert code == 0, said
    total = int(re.search(r"operations (\d+)", said).group(1))
    assert total >= 5  # removing a stale temporary, fsyncs, renames, removing the replaced step
    step = 0 if overwrite else 1
    for kill_at in range(1, total + 1):
        root = tmp_path / str(kill_at)
        code, said = kill_at_the_nth_operation(root, kill_at, overwrite, exchange == "exchange")
        assert code == -9, said
        with Checkpointer(root) as ckptr:
            listed = [c.step for c in ckptr.checkpoints]
            where = f"killed before file operation {kill_at} of {total}, the root holds {sorted(os.listdir(root))}"
            assert 0 in listed, f"{where}: step 0 is gone"
            values = {s: ckptr.load(s)["v"].tolist() for s in listed}
            if overwrite:
                assert listed == [0] and values[0] in ([0.0] * 3, [1.0] * 3), where
            else:
                assert listed in ([0], [0, 1]) and values[0] == [0.0] * 3, where
                assert values.get(1, [1.0] * 3) == [1.0] * 3, where
            assert ckptr.save(step + 1, {"v": np.ones(3)}, force=True)


def test_a_replaced_step_a_failed_removal_left_never_comes_back_once_its_step_is_deleted(tmp_path, monkeypatch,
                                                                                          caplog):
    """Without an atomic exchange (NFS), an overwrite sets the committed step aside (``5.ckpt-replaced``),
    renames the new one into its name and removes the old one. A removal that failed (EBUSY: a file of it held
    open, which NFS keeps as a .nfs file) left the old step under the set-aside name; once garbage collection
    deleted step 5, the next Checkpointer put the old step back as step 5: a deleted step listed again, with
    the values the overwrite had replaced."""
    monkeypatch.setattr(storage, "rename_exchange", lambda a, b: False)
    remove_owned = storage.remove_owned

    def busy(directory):
        if directory.name.startswith(f"5{fmt.REPLACED_SUFFIX}") and os.path.lexists(directory):
            raise OSError(errno.EBUSY, "Device or resource busy", str(directory))
        remove_owned(directory)

    root = tmp_path / "root"
    with Checkpointer(root, preservation_policy=pp.LatestN(1)) as ckptr:
        ckptr.save(5, {"v": np.zeros(3)}, force=True)
        with monkeypatch.context() as patched:
            patched.setattr(storage, "remove_owned", busy)
            ckptr.save(5, {"v": np.ones(3)}, force=True, overwrite=True)
        assert "could not be removed" in caplog.text
        ckptr.save(6, {"v": np.full(3, 6.0)}, force=True)  # garbage collection deletes step 5
    with Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [6], sorted(os.listdir(root))
        ckptr.save(7, {"v": np.full(3, 7.0)}, force=True)  # its writer removes what the removal left
    assert sorted(os.listdir(root)) == [fmt.LOCK, "6", "7"]


def test_a_free_load_of_a_checkpoint_a_crash_left_set_aside_says_where_it_is(tmp_path):
    """``ckpt.save(path, overwrite=True)`` killed between the two renames (no atomic exchange): no
    Checkpointer puts a free checkpoint back, so its load says where the checkpoint is (as a save there does). A
    directory of the user's named so is no checkpoint set aside: the load was told to rename it back too, and a
    deletion, which deletes a checkpoint set aside, leaves it alone."""
    model, aside = tmp_path / "model", tmp_path / ("model" + fmt.REPLACED_SUFFIX)
    ckpt.save(model, {"v": np.zeros(3)})
    if not storage.is_marked(model):
        storage.mark(model, durable=True)  # (as the commit marks it before it sets it aside)
    os.rename(model, aside)  # as the crash leaves it
    with pytest.raises(ckpt.errors.CheckpointNotFoundError,
                       match=r"model\.ckpt-replaced holds it as it was before a save with overwrite=True"):
        ckpt.load(model)
    assert storage.set_aside_step(aside) is not None  # left as it was
    shutil.rmtree(aside)
    aside.mkdir()
    (aside / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.errors.CheckpointNotFoundError, match="the path does not exist$"):
        ckpt.load(model)
    assert ckpt.delete(model, missing_ok=True) is False and (aside / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("missing_ok", [True, False])
def test_a_free_delete_deletes_the_checkpoint_an_overwrite_killed_between_its_renames_left_set_aside(tmp_path,
                                                                                                    missing_ok):
    """Was: with model set aside as model.ckpt-replaced by the kill (nothing at model), ckpt.delete(model,
    missing_ok=True) returned False and left it, and the next ckpt.save(model) without overwrite=True refused it as
    the checkpoint ('already exists, set aside as ...'); without missing_ok the deletion raised CheckpointNotFoundError
    (rename it back). The checkpoint set aside is the one a save sees there: it is put back and deleted."""
    model = tmp_path / "model"
    child = procs.forkserver(crash_worker.__name__).Process(
        target=crash_worker.free_overwrite_killed_after_a_rename, args=(str(model), fmt.REPLACED_SUFFIX))
    child.start()
    child.join(120)
    assert child.exitcode == -9 and not model.exists()
    assert ckpt.delete(model, missing_ok=missing_ok) is True  # was: False (missing_ok), CheckpointNotFoundError
    assert [name for name in os.listdir(tmp_path) if not name.endswith(fmt.TMP_SUFFIX)] == []
    ckpt.save(model, {"v": np.full(3, 2.0)})  # was: StepAlreadyExistsError
    assert ckpt.load(model)["v"].tolist() == [2.0] * 3
    assert ckpt.delete(model) and ckpt.delete(model, missing_ok=True) is False and os.listdir(tmp_path) == []


KILLED_BEFORE_ITS_RENAME = """
import os, signal, sys
import numpy as np
from ckpt import storage
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    ckptr.save(4, {"v": np.zeros(3)}, force=True)
    storage.rename_noreplace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)   # every file written and fsync'd
    ckptr.save(5, {"v": np.ones(3)}, force=True)
"""


def test_a_save_a_crash_left_uncommitted_named_directly_is_refused_as_a_temporary(tmp_path, capsys):
    """A step killed just before its rename (5.ckpt-tmp, every file there) was loaded by ckpt.load, and shown and
    verified by the ckpt command, as a committed checkpoint (`ckpt show` gave its 'committed' time)."""
    root = tmp_path / "root"
    assert procs.run_script(KILLED_BEFORE_ITS_RENAME, str(root)).returncode == -9
    tmp = root / ("5" + fmt.TMP_SUFFIX)
    said = r"5\.ckpt-tmp: it is a temporary of ckpt's, a save of 5 that was never committed"
    for read in (ckpt.load, ckpt.load_checkpointables, ckpt.metadata):
        with pytest.raises(ckpt.errors.CheckpointNotFoundError, match=said):
            read(tmp)
    assert not ckpt.is_orbax_checkpoint(tmp)
    for command in (["show", str(tmp)], ["verify", str(tmp)], ["ls", str(tmp)], ["convert", str(tmp), str(tmp_path / "to")]):
        assert ckpt.cli.main(command) == 2, command
        assert re.search(said, capsys.readouterr().err), command
    with Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [4]


KILLED_BEFORE_IT_DELETES_THE_STEP_REPLACED = """
import os, signal, sys
import numpy as np
from ckpt import root
from ckpt.path import step as step_lib
from ckpt.training import Checkpointer
old, new = step_lib.standard_name_format(), step_lib.standard_name_format(step_prefix="step")
with Checkpointer(sys.argv[1], step_name_format=old) as ckptr:
    ckptr.save(5, {"v": np.zeros(3)}, force=True)
with Checkpointer(sys.argv[1], step_name_format=step_lib.composite_name_format(new, [new, old])) as ckptr:
    root.delete_step = lambda path, step: os.kill(os.getpid(), signal.SIGKILL)   # step_5 committed, 5 still there
    ckptr.save(5, {"v": np.ones(3)}, force=True, overwrite=True)
"""


def test_an_overwrite_under_a_composite_name_killed_before_it_deletes_the_old_name_lists_and_keeps_the_new_step(tmp_path):
    """Killed between the commit of step_5 and the deletion of 5 (the step it replaced, under the name the
    composite format reads but does not write), the next Checkpointer listed and loaded 5, the value the
    overwrite had replaced; once garbage collection deleted it, step_5 came back as step 5."""
    root = tmp_path / "root"
    assert procs.run_script(KILLED_BEFORE_IT_DELETES_THE_STEP_REPLACED, str(root)).returncode == -9
    assert sorted(n for n in os.listdir(root) if not n.startswith(".")) == ["5", "step_5"]
    old, new = step_lib.standard_name_format(), step_lib.standard_name_format(step_prefix="step")
    names = step_lib.composite_name_format(new, [new, old])
    with Checkpointer(root, step_name_format=names, preservation_policy=ckpt.training.preservation_policies.LatestN(1)) as ckptr:
        assert [(c.step, c.path.name) for c in ckptr.checkpoints] == [(5, "step_5")]
        assert ckptr.load(5)["v"].tolist() == [1.0] * 3
        assert step_lib.find_all(root, names) == {5: "step_5"}
        ckptr.save(6, {"v": np.full(3, 6.0)}, force=True)
    with Checkpointer(root, step_name_format=names) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [6]


def test_a_save_a_crash_left_uncommitted_is_refused_as_a_root_or_a_directory_to_save_in(tmp_path):
    """A Checkpointer opened on 5.ckpt-tmp saved its steps there, and the root's next writer removed them with
    the temporary (a user's step 0 gone); ckpt.save into it likewise."""
    root = tmp_path / "root"
    assert procs.run_script(KILLED_BEFORE_ITS_RENAME, str(root)).returncode == -9
    tmp = root / ("5" + fmt.TMP_SUFFIX)
    said = r"5\.ckpt-tmp is named like a temporary of ckpt's"
    with pytest.raises(ValueError, match=said):
        Checkpointer(tmp)
    with pytest.raises(ValueError, match=said):
        ckpt.save(tmp / "model", {"v": np.ones(3)})
    assert sorted(os.listdir(tmp)) == sorted([fmt.MARKER, fmt.MANIFEST, fmt.TREE, fmt.PACKED])  # nothing written


# ------------------------------------------------------------------- a multi-rank save killed on one rank
TORCH_WORKER = procs.REPO / "tests" / "torch_multiprocess_worker.py"


def test_a_two_rank_save_killed_on_one_rank_leaves_only_committed_loadable_steps_and_the_job_resumes(tmp_path):
    pytest.importorskip("torch")
    root = tmp_path / "run"
    victims = [1, 0, 1, 1]  # rank 1 at the start of an async save, rank 0 of a sync one, then later in a save
    proc = procs.start(TORCH_WORKER, str(root), "", *["crash:2"] * len(victims))
    committed, temporaries_seen = [], 0
    try:
        for trial, victim in enumerate(victims):
            pids, begun = {}, []
            while len(begun) < 2 + trial:  # the victim's first saves, then one more each trial
                line = procs.wait_for_line(proc, "rank ", timeout=240)
                if " pid " in line:
                    pids[int(line.split()[1])] = int(line.split()[3])
                elif line.startswith(f"rank {victim} begin"):
                    begun.append(int(line.split()[-1]))
            os.kill(pids[victim], 9)
            procs.wait_for_line(proc, "job crash:2 ended", timeout=60)  # the worker kills the other rank
            temporaries_seen += bool(temporaries(root))
    finally:
        procs.stop(proc)
    output = "".join(proc._seen)
    committed = [int(n) for n in re.findall(r"^committed (\d+)$", output, re.M)]
    with Checkpointer(root) as ckptr:  # a plain process: whole tensors
        listed = [c.step for c in ckptr.checkpoints]
        assert listed == sorted(step_lib.find_steps(os.listdir(root), step_lib.standard_name_format())), output[-3000:]
        assert listed and listed[-1] >= max(committed), (listed, committed)
        first = ckptr.load_checkpointables(listed[0])  # the model never trains: every step holds the same values
        for step in listed[1:]:
            loaded = ckptr.load_checkpointables(step)
            assert all(torch_equal(loaded["model"][k], v) for k, v in first["model"].items()), step
    assert temporaries_seen, "no kill interrupted a save"
    resumed = procs.run_script(TORCH_WORKER, str(root), "", "resume:2", timeout=240)
    assert f"rank 0 resumed from {listed[-1]} steps" in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert temporaries(root) == []


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


KILLED_WHILE_IT_REMOVES_A_DELETED_CHECKPOINT = """
import os, signal, sys
import ckpt
from ckpt import storage
storage.remove_owned = lambda path: os.kill(os.getpid(), signal.SIGKILL) if path.name == "model.ckpt-deleting" and \\
    not path.parent.joinpath("model").exists() else None   # renamed aside: deleted, its files still there
ckpt.delete(sys.argv[1])
"""


def test_a_free_save_removes_what_a_deletion_of_its_path_killed_midway_left(tmp_path):
    """Was: model.ckpt-deleting, what a ckpt.delete killed after its rename left (the whole checkpoint's bytes),
    stayed beside every later save at that path: no root's writer sweeps a free checkpoint's directory."""
    runs, leftover = tmp_path / "runs", tmp_path / "runs" / ("model" + fmt.DELETING_SUFFIX)
    ckpt.save(runs / "model", {"v": np.zeros(1000)})
    assert procs.run_script(KILLED_WHILE_IT_REMOVES_A_DELETED_CHECKPOINT, str(runs / "model")).returncode == -9
    assert os.listdir(runs) == [leftover.name]
    shutil.copytree(leftover, tmp_path / "left")
    for save in (ckpt.save, lambda *args: ckpt.save_async(*args).result(timeout=60)):
        save(runs / "model", {"v": np.ones(3)})
        assert os.listdir(runs) == ["model"] and ckpt.load(runs / "model")["v"].tolist() == [1.0] * 3
        ckpt.delete(runs / "model")
        shutil.copytree(tmp_path / "left", leftover)



def test_a_free_checkpoint_an_overwrite_killed_between_its_renames_left_aside_is_neither_lost_nor_brought_back(tmp_path):
    """Was: with model set aside as model.ckpt-replaced by the kill, a save without overwrite=True took the name,
    leaving the old checkpoint there for good; and once model was deleted (after a kill past the second rename too),
    ckpt.load said 'model.ckpt-replaced holds it ...: rename it back' of the checkpoint the overwrite had replaced."""
    model = tmp_path / "model"
    for after, expected in (("", [1.0] * 3), (fmt.REPLACED_SUFFIX, [2.0] * 3)):
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        child = procs.forkserver(crash_worker.__name__).Process(
            target=crash_worker.free_overwrite_killed_after_a_rename, args=(str(model), after))
        child.start()
        child.join(120)
        assert child.exitcode == -9
        if after:  # killed between the renames: the checkpoint is aside, and a save must not take its place
            with pytest.raises(ckpt.errors.StepAlreadyExistsError, match=r"set aside as .*model\.ckpt-replaced"):
                ckpt.save(model, {"v": np.full(3, 2.0)})
            ckpt.save(model, {"v": np.full(3, 2.0)}, overwrite=True)
        assert sorted(os.listdir(tmp_path)) == (["model"] if after else ["model", "model" + fmt.REPLACED_SUFFIX])
        assert ckpt.load(model)["v"].tolist() == expected
        assert ckpt.delete(model) and os.listdir(tmp_path) == []
        with pytest.raises(ckpt.errors.CheckpointNotFoundError, match="the path does not exist$"):
            ckpt.load(model)


def test_a_deletion_refused_at_a_path_holding_no_checkpoint_keeps_the_checkpoint_set_aside_beside_it(tmp_path):
    """Was: with model set aside as model.ckpt-replaced (an overwrite killed between its renames) and an empty
    directory, a file or a user's directory made at model since, ckpt.delete(model) removed model.ckpt-replaced, the
    only copy of the checkpoint, then refused model ('it was not deleted')."""
    model = tmp_path / "model"
    aside = tmp_path / ("model" + fmt.REPLACED_SUFFIX)
    ckpt.save(model, {"v": np.ones(3)})
    if not storage.is_marked(model):
        storage.mark(model, durable=True)  # (as the commit marks it before it sets it aside)
    os.rename(model, aside)
    for make in (os.mkdir, lambda p: p.write_text("x")):
        make(model)
        with pytest.raises(ckpt.errors.NotACheckpointError, match="it was not deleted"):
            ckpt.delete(model)
        assert sorted(os.listdir(tmp_path)) == ["model", "model" + fmt.REPLACED_SUFFIX]
        os.rmdir(model) if model.is_dir() else model.unlink()
    os.rename(aside, model)
    assert ckpt.load(model)["v"].tolist() == [1.0] * 3
