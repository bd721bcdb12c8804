"""Two checkpoint tiers (``Checkpointer(..., local=LocalCheckpointOptions(...))``) over a local S3-compatible
server (moto, the ``bucket`` fixture): restore from the freshest tier after a SIGKILL, a preemption's step
made durable within the grace period, a damaged local step falling back to its durable copy."""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import cli, distributed, errors, formats, tiers
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp
from tests import fsutil, procs, tiers_worker

WORKER = procs.REPO / "tests" / "tiers_worker.py"


def assert_bit_exact(loaded: dict, step: int) -> None:
    expected = tiers_worker.state(step)
    assert loaded["step"] == step
    for got, want in [(loaded["params"], expected["params"]), (loaded["opt"]["mu"], expected["opt"]["mu"]),
                      (loaded["opt"]["count"], expected["opt"]["count"])]:
        assert np.asarray(got).dtype == np.asarray(want).dtype
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def kill_worker(mode: str, line: str, bucket: str, tmp_path: Path) -> Path:
    """Runs tests/tiers_worker.py's ``mode`` until it prints ``line``, then SIGKILLs it; its local tier."""
    local = tmp_path / "local"
    proc = procs.start(WORKER, mode, bucket, str(local))
    try:
        procs.wait_for_line(proc, line, timeout=120)
    finally:
        assert procs.stop(proc) == -signal.SIGKILL
    return local


def test_a_killed_run_restores_from_the_local_tier_when_newer_and_from_the_durable_tier_without_it(bucket, tmp_path):
    local = kill_worker("run", "ready", bucket, tmp_path)
    with tiers_worker.checkpointer(bucket, str(local)) as ckptr:
        where = {c.step: sorted(c.locations) for c in ckptr.checkpoints}
        # step 10 stays local too when its promotion outlasted the next local commits (kept until copied)
        assert where.pop(10) in (["durable"], ["durable", "local"])
        assert where == {5: ["durable"], 12: ["local"], 13: ["local"]}
        assert ckptr.latest.step == 13 and ckptr.latest.path == local / "13"
        assert_bit_exact(ckptr.load(), 13)
    shutil.rmtree(local)  # a new machine: its local tier is gone
    with tiers_worker.checkpointer(bucket, str(local)) as ckptr:
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [(5, ["durable"]), (10, ["durable"])]
        assert str(ckptr.latest.path) == f"{bucket}/10"
        assert_bit_exact(ckptr.load(), 10)


def test_a_preemption_notice_leaves_the_current_step_durable_within_the_grace_period(bucket, tmp_path):
    local = tmp_path / "local"
    proc = procs.start(WORKER, "preempt", bucket, str(local))
    try:
        procs.wait_for_line(proc, "saved 3", timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        procs.stop(proc)
    output = procs.output(proc)
    stopped = int(re.search(r"^stopped at (\d+)$", output, re.M).group(1))
    promoted = re.search(rf"^ckpt: preemption: step {stopped} promoted to the durable tier {bucket}/{stopped} "
                         rf"in ([\d.]+) s \([\d.]+ MiB; grace period 60 s\)$", output, re.M)
    assert promoted, output
    assert float(promoted.group(1)) <= tiers_worker.GRACE_SECS
    with ckpt.Checkpointer(bucket) as durable:  # the durable tier alone: the step is there, complete
        assert [c.step for c in durable.checkpoints] == [stopped]  # step 1..: FixedIntervalPolicy(1000) saved none
        assert_bit_exact(durable.load(), stopped)


def test_a_damaged_local_step_falls_back_to_the_durable_copy_then_to_older_steps(bucket, tmp_path, caplog):
    local = tmp_path / "local"
    with tiers_worker.checkpointer(bucket, str(local), durable_every=2) as ckptr:
        for step in range(4):
            ckptr.save(step, tiers_worker.state(step))
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (0, ["durable"]), (2, ["durable", "local"]), (3, ["local"])]
    fsutil.flip(local / "2" / "arrays" / "0" / "c" / "0" / "0", 9)
    with tiers_worker.checkpointer(bucket, str(local)) as ckptr, caplog.at_level(logging.WARNING, "ckpt"):
        assert_bit_exact(ckptr.load(2), 2)  # its durable copy
        assert "step 2 on the local tier cannot be loaded" in caplog.text
        fsutil.flip(local / "3" / "arrays" / "0" / "c" / "0" / "0", 9)
        assert_bit_exact(ckptr.load(), 2)  # the newest step that loads
        with pytest.raises(errors.CheckpointCorruptedError):
            ckptr.load(3)  # on the local tier only


def steps_in(directory) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_each_tier_keeps_its_own_policies_and_ckpt_ls_shows_where_each_step_lives(tmp_path, capsys):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(2))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(3),
                           local=local) as ckptr:
        saved = []
        for step in range(10):
            response = ckptr.save_async(step, {"step": step})
            if response is not None:  # each promotion ends before the next save (a newer one replaces a waiting one)
                saved.append(step)
                response.result()
        assert saved == [0, 2, 3, 4, 6, 8, 9]
        listed = [(c.step, sorted(c.locations)) for c in ckptr.checkpoints]
    where = dict(listed)
    assert sorted(where) == [0, 3, 6, 8, 9] and where[8] == ["local"] and where[9] == ["durable", "local"]
    assert all(where[step] == ["durable"] for step in (0, 3, 6))  # promoted, then deleted by the local policy
    assert sorted(p.name for p in (tmp_path / "durable").iterdir() if not p.name.startswith(".")) == [
        "0", "3", "6", "9"]
    assert cli.main(["ls", str(tmp_path / "durable"), "--local", str(tmp_path / "local"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(s["step"], s["tiers"]) for s in printed["steps"]] == listed
    assert printed["latest"] == 9 and printed["steps"][-1]["path"] == str(tmp_path / "local" / "9")
    assert cli.main(["ls", str(tmp_path / "durable"), "--local", str(tmp_path / "gone")]) == 0  # a new machine
    assert re.search(r"^\* 9 +durable ", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("local, error", [("", "the directory is ''"), ("hdfs://ssd/run", "a hdfs:// URL"),
                                          ("s3://bucket/run", "the local tier must be a local directory")])
def test_ckpt_ls_refuses_a_local_tier_that_is_no_local_directory(tmp_path, capsys, local, error):
    ckpt.save(tmp_path / "durable" / "1", {"a": np.zeros(2)})
    assert cli.main(["ls", str(tmp_path / "durable"), "--local", local]) == 2  # was listed as the durable tier alone
    assert error in capsys.readouterr().err


@pytest.mark.parametrize("under", ["", "/sub"])
def test_ckpt_ls_refuses_a_file_given_as_the_local_tier_naming_it(tmp_path, capsys, under):
    """(It said '--local FILE/ckpt-root.json cannot be read as the root's metadata (NotADirectoryError ...)'.)"""
    ckpt.save(tmp_path / "durable" / "1", {"a": np.zeros(2)})
    (tmp_path / "notes.txt").write_text("notes")
    local = f"{tmp_path / 'notes.txt'}{under}"
    assert cli.main(["ls", str(tmp_path / "durable"), "--local", local]) == 2
    assert (f"--local {local} cannot be the local tier's directory: {tmp_path / 'notes.txt'} is a regular file of 5 "
            "bytes, not a directory") in capsys.readouterr().err


def test_ckpt_ls_finds_a_local_tier_given_with_a_tilde(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(3),
                           local=ckpt.LocalCheckpointOptions("~/local")) as ckptr:
        ckptr.save(1, {"a": np.zeros(2)})
    assert cli.main(["ls", str(tmp_path / "durable"), "--local", "~/local", "--json"]) == 0
    assert [s["tiers"] for s in json.loads(capsys.readouterr().out)["steps"]] == [["local"]]


def test_a_promotion_outlasting_the_timeout_is_named_by_the_timeout_error(tmp_path, monkeypatch):
    """wait() and close() said 'a checkpoint save is still running after 0.2 s' (as after a rank died mid-promotion
    in a multi-process job), naming no promotion, after the step's local save was committed."""
    gate, copy = threading.Event(), tiers._copy_step
    monkeypatch.setattr(tiers, "_copy_step", lambda *args: gate.wait(60) and copy(*args))
    context = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=0.2))
    local = ckpt.LocalCheckpointOptions(tmp_path / "local")
    with ckpt.Checkpointer(tmp_path / "durable", context=context, local=local) as ckptr:
        ckptr.save_async(0, {"a": np.zeros(2)}, force=True)
        said = f"the promotion of step 0 to the durable tier {tmp_path / 'durable'} is still running after 0.2 s"
        try:
            with pytest.raises(TimeoutError, match=re.escape(said)):
                ckptr.wait()
        finally:
            gate.set()
    np.testing.assert_array_equal(ckpt.load(tmp_path / "durable" / "0")["a"], np.zeros(2))


def test_a_step_kept_locally_while_its_promotion_outlasts_the_last_local_commit_is_deleted_once_promoted(
        tmp_path, monkeypatch):
    released, copy_step = threading.Event(), tiers._copy_step

    def held_copy(*args, **kwargs):
        assert released.wait(60), "the test never released the promotion"
        return copy_step(*args, **kwargs)

    monkeypatch.setattr(tiers, "_copy_step", held_copy)
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(3),
                           local=local) as ckptr:
        for step in (3, 4, 5):
            response = ckptr.save_async(step, tiers_worker.state(step))
        response.result()  # step 5 committed locally (its garbage collection done); step 3 still promoting
        assert steps_in(tmp_path / "local") == [3, 4, 5]
        released.set()
        ckptr.wait()
        assert steps_in(tmp_path / "local") == [4, 5]  # LatestN(2), with no local commit since
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (3, ["durable"]), (4, ["local"]), (5, ["local"])]
    with ckpt.Checkpointer(tmp_path / "durable") as durable:
        assert_bit_exact(durable.load(3), 3)


def test_local_tier_options_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="local directory"):
        ckpt.LocalCheckpointOptions("s3://bucket/local")
    for grace in (-1, math.nan, math.inf, True, "30"):  # was: nan and True taken (nan: no wait), inf an OverflowError at
        with pytest.raises(ValueError, match="grace_period_secs"):  # the wait() after a preemption, and at close()
            ckpt.LocalCheckpointOptions(tmp_path, grace_period_secs=grace)


def test_the_benchmark_reports_blocking_and_lost_work_for_two_tiers_and_durable_only(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_tiers", procs.REPO / "benchmarks" / "tiers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # in this interpreter: a second one costs seconds on a busy machine
    out = tmp_path / "results.json"
    assert bench.main(["--tiny", "--durable", str(tmp_path / "durable"), "--local", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["two_tiers", "durable_every_10", "durable_continuous"]
    assert results["two_tiers"]["blocking"]["saves"] == 20 and results["two_tiers"]["durable_steps"] == 4
    assert results["durable_every_10"]["blocking"]["saves"] == results["durable_every_10"]["durable_steps"] == 4
    for figures in results.values():
        assert figures["blocking"]["median_ms"] > 0
        assert 0 <= figures["lost_steps_process_kill"]["mean"] <= figures["lost_steps_machine_lost"]["mean"] <= 40
    assert "two_tiers" in printed and "lost/kill mean" in printed


def test_a_promotion_that_outlasts_the_grace_period_is_reported_and_the_upload_still_ends(tmp_path, caplog):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", grace_period_secs=0)
    try:
        with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1000),
                               local=local) as ckptr, caplog.at_level(logging.WARNING, "ckpt"):
            ckptr.save_async(1, tiers_worker.state(1))  # the local tier only
            ckpt.preemption.notify()
            ckptr.save_async(2, tiers_worker.state(2))
            assert ckptr.reached_preemption(2)
            ckptr.wait()  # returns once the local save is committed: no grace left for the upload
            assert "step 2 is on the local tier only: its promotion did not finish within the grace period" in caplog.text
    finally:
        ckpt.preemption.reset()
    with ckpt.Checkpointer(tmp_path / "durable") as durable:  # close() let the upload end
        assert [c.step for c in durable.checkpoints] == [2]
        assert_bit_exact(durable.load(), 2)


def test_a_local_tier_in_the_roots_own_directory_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "run"
    for local in (root, f"{root}/", tmp_path / "x" / ".." / "run"):
        with pytest.raises(ValueError, match=r"the local tier's directory is the root itself \(.*run\)"):
            ckpt.Checkpointer(root, local=ckpt.LocalCheckpointOptions(local))
    assert not root.exists()


@pytest.mark.parametrize("local, durable", [("run/3", "run"), ("ssd", "ssd/7/run")])
def test_a_local_tier_and_a_root_one_in_the_other_at_a_steps_name_are_refused_before_anything_is_written(
        tmp_path, local, durable):
    """Was: accepted; the step of that name, once reached, found the other tier's directory in its way
    (ForeignEntryError at its save, after the steps before it were saved)."""
    with pytest.raises(ValueError, match=r"lie one in the other at .*, the name of step [37]"):
        ckpt.Checkpointer(tmp_path / durable, local=ckpt.LocalCheckpointOptions(tmp_path / local))
    assert os.listdir(tmp_path) == []


def test_a_local_directory_holding_another_durable_roots_tier_is_refused_not_restored_from(tmp_path):
    """A local SSD directory reused by the next run (another durable root): its steps, numbered higher than
    the new run's, were restored as the new run's latest state."""
    def local() -> ckpt.LocalCheckpointOptions:
        return ckpt.LocalCheckpointOptions(tmp_path / "ssd", save_decision_policy=sdp.FixedIntervalPolicy(1))

    with ckpt.Checkpointer(tmp_path / "run1", save_decision_policy=sdp.FixedIntervalPolicy(100), local=local()) as ckptr:
        for step in range(3):
            ckptr.save(step, tiers_worker.state(step))
    with pytest.raises(ValueError, match=r"holds the local tier of the durable root .*run1, not of .*run2: its steps "
                                         r"are another run's"):
        ckpt.Checkpointer(tmp_path / "run2", local=local())
    with ckpt.Checkpointer(tmp_path / "run1", local=local()) as ckptr:  # its own run still restores from it
        assert ckptr.latest.step == 2 and sorted(ckptr.latest.locations) == ["local"]
    (tmp_path / "ssd" / "ckpt-root.json").unlink()  # a local tier of an earlier ckpt, which recorded no owner
    with ckpt.Checkpointer(tmp_path / "run1", local=local()) as ckptr:
        assert ckptr.latest.step == 2
    with pytest.raises(ValueError, match="holds the local tier of the durable root"):
        ckpt.Checkpointer(tmp_path / "run2", local=local())


@pytest.mark.parametrize("custom_metadata", [{"lr": 0.1}, "notes"])
def test_a_plain_checkpointer_root_given_as_the_local_tier_is_refused_before_its_steps_are_deleted(tmp_path,
                                                                                                   custom_metadata):
    """Was: adopted as this run's local tier: its latest step restored and promoted to the new durable root, and
    its other steps deleted by the local tier's LatestN(2). Root metadata naming no durable root is no local
    tier's (ckpt has always recorded its owner in a local tier's root metadata)."""
    with ckpt.Checkpointer(tmp_path / "old", custom_metadata=custom_metadata) as ckptr:
        for step in range(4):
            ckptr.save(step, tiers_worker.state(step))
    with pytest.raises(ValueError, match=f"{tmp_path / 'old'} is a checkpoint root of its own, not a local tier"):
        ckpt.Checkpointer(tmp_path / "run", local=ckpt.LocalCheckpointOptions(tmp_path / "old"))
    with ckpt.Checkpointer(tmp_path / "old") as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1, 2, 3]


def test_a_root_of_orbax_without_root_metadata_given_as_the_local_tier_is_refused_before_anything_is_written(
        tmp_path):
    """Was: adopted as this run's local tier (Orbax before 0.10 wrote no root metadata): the first save's promotion of
    Orbax's newest step failed with FileNotFoundError ('.../2/manifest.json'), a forced save of that step first wrote
    its mark (.ckpt-promoting) into Orbax's step, and the local tier's LatestN(2) deleted Orbax's older steps."""
    local = Path(shutil.copytree(procs.REPO / "tests" / "orbax_0_5" / "aggregate", tmp_path / "ssd"))
    before = fsutil.snapshot(local)
    with pytest.raises(ValueError, match=f"{local} is a checkpoint root of Orbax's, not a local tier .*Orbax's step 2"):
        ckpt.Checkpointer(tmp_path / "run", local=ckpt.LocalCheckpointOptions(local))
    assert fsutil.snapshot(local) == before


def test_a_local_tier_whose_recorded_owner_holds_a_nul_is_another_runs_naming_its_directory(tmp_path):
    """Was: ValueError 'LocalCheckpointOptions directory embedded null byte, ...' (os.path.realpath's), naming nothing."""
    (tmp_path / "ssd").mkdir()
    (tmp_path / "ssd" / "ckpt-root.json").write_text('{"custom_metadata": {"durable_root": "run\\u0000x"}}')
    with pytest.raises(ValueError, match=f"{tmp_path / 'ssd'} holds the local tier of the durable root run"):
        ckpt.Checkpointer(tmp_path / "run", local=ckpt.LocalCheckpointOptions(tmp_path / "ssd"))


def test_a_durable_root_that_cannot_be_listed_leaves_the_local_directory_free_for_the_right_one(bucket, tmp_path):
    """A bucket's name mistyped (or the bucket not made yet): the open failed, but only after the local tier had
    recorded the mistyped root as its owner, so the run with the right name was refused ('holds the local tier of
    the durable root s3://nosuch..., not of s3://...: its steps are another run's'), though the tier held nothing."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.Checkpointer(bucket.replace("s3://", "s3://nosuch"), local=local)
    assert not (tmp_path / "local").exists()
    with ckpt.Checkpointer(bucket, local=local) as ckptr:
        ckptr.save(0, {"w": np.arange(2)})
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [(0, ["durable", "local"])]


def test_the_durable_root_named_through_a_symbolic_link_is_the_owner_of_its_local_tier(tmp_path, capsys):
    """The same run opened as /scratch/run (a link) and as its target was refused as another run's ('Use another
    local directory, or delete that one'), its steps not yet promoted with it."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "ssd", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "run", save_decision_policy=sdp.FixedIntervalPolicy(100), local=local) as ckptr:
        for step in range(3):
            ckptr.save(step, tiers_worker.state(step))
    (tmp_path / "link").symlink_to(tmp_path / "run", target_is_directory=True)
    with ckpt.Checkpointer(tmp_path / "link", local=local) as ckptr:
        assert ckptr.latest.step == 2 and sorted(ckptr.latest.locations) == ["local"]
    assert cli.main(["ls", str(tmp_path / "link"), "--local", str(tmp_path / "ssd")]) == 0
    assert "local" in capsys.readouterr().out


def test_a_local_copy_removed_after_the_listing_falls_back_to_its_durable_copy(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1), local=local) as ckptr:
        for step in range(2):
            ckptr.save(step, tiers_worker.state(step))
        assert [sorted(c.locations) for c in ckptr.checkpoints] == [["durable", "local"]] * 2
        shutil.rmtree(tmp_path / "local" / "1")  # listed a moment ago (a user, a cleaner of the SSD)
        assert_bit_exact(ckptr.load(), 1)  # was: InvalidLayoutError, the durable copy never tried
        assert sorted(ckptr.latest.locations) == ["durable"]
        shutil.rmtree(tmp_path / "local" / "0")
        assert ckptr.metadata(0).path == tmp_path / "durable" / "0"


def test_a_step_being_loaded_from_either_tier_is_kept_by_garbage_collection(tmp_path, monkeypatch):
    reading, released, load = threading.Event(), threading.Event(), formats.load_checkpointables

    def held_load(*args, **kwargs):
        reading.set()
        assert released.wait(60), "the test never released the load"
        return load(*args, **kwargs)

    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1),
                                        preservation_policy=pp.LatestN(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2),
                           preservation_policy=pp.LatestN(1), local=local) as ckptr:
        for step in range(4):
            ckptr.save(step, tiers_worker.state(step))
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [(2, ["durable"]), (3, ["local"])]
        monkeypatch.setattr(formats, "load_checkpointables", held_load)
        loading = ckptr.load_async(2)
        assert reading.wait(60)
        monkeypatch.setattr(formats, "load_checkpointables", load)
        try:
            ckptr.save(4, tiers_worker.state(4))  # promoted: LatestN(1) would delete step 2 of the durable tier
            assert steps_in(tmp_path / "durable") == [2, 4]
        finally:
            released.set()
        assert_bit_exact(loading.result(timeout=60), 2)
        ckptr.save(6, tiers_worker.state(6))
        assert steps_in(tmp_path / "durable") == [6]


def test_a_promotion_that_fails_leaves_no_temporary_and_the_next_one_succeeds(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with fsutil.tmpfs(tmp_path / "mnt", size="2m") as mnt:
        durable = mnt / "durable"
        with ckpt.Checkpointer(durable, save_decision_policy=sdp.FixedIntervalPolicy(1), local=local) as ckptr:
            ckptr.save(0, {"w": np.full(100_000, 0, np.float32)})
            fsutil.fill(mnt, 64 << 10)
            ckptr.save_async(1, {"w": np.full(100_000, 1, np.float32)})
            with pytest.raises(OSError, match="promoting ") as info:
                ckptr.wait()
            assert info.value.errno == errno.ENOSPC
            assert sorted(p.name for p in durable.iterdir()) == [".ckpt.lock", "0"]  # was: 1.ckpt-tmp left
            (mnt / "filler").unlink()
            ckptr.save(2, {"w": np.full(100_000, 2, np.float32)})
            assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
                (0, ["durable"]), (1, ["local"]), (2, ["durable", "local"])]


@pytest.mark.parametrize("planted", ["a link to a file outside", "a link to a directory outside", "a FIFO"])
def test_a_promotion_never_copies_what_a_link_in_the_local_step_leads_to_nor_waits_on_a_fifo(tmp_path, planted):
    """The local step is input too: its files are copied only as the regular files they are, and the step
    that holds anything else is not promoted (was: a link's target, outside the step, was uploaded)."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"OUTSIDE-THE-STEP" * 8)
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1000),
                           local=local) as ckptr:
        ckptr.save(5, {"w": np.ones(3)})
        where = tmp_path / "local" / "5" / "notes"
        if planted == "a FIFO":
            os.mkfifo(where)
        else:
            where.symlink_to(secret if planted == "a link to a file outside" else tmp_path)
        with pytest.raises(errors.CheckpointCorruptedError, match=f"{where}.*(symbolic link|FIFO)") as info:
            ckptr.save(5, {"w": np.ones(3)}, force=True)
            ckptr.wait()
        assert info.value.path == tmp_path / "local" / "5"
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [(5, ["local"])]
    assert not any(b"OUTSIDE" in p.read_bytes() for p in (tmp_path / "durable").rglob("*") if p.is_file())


def test_a_failed_promotion_is_raised_by_the_next_save_before_it_writes_anything(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with fsutil.tmpfs(tmp_path / "mnt", size="2m") as mnt:
        with ckpt.Checkpointer(mnt / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
            ckptr.save(0, {"w": np.full(100_000, 0, np.float32)})
            fsutil.fill(mnt, 64 << 10)
            ckptr.save_async(2, {"w": np.full(100_000, 2, np.float32)})
            while ckptr.is_saving_in_progress():  # the promotion fails in the background
                time.sleep(0.01)
            (mnt / "filler").unlink()
            with pytest.raises(OSError, match="promoting .*/2 ") as info:
                ckptr.save(3, {"w": np.full(100_000, 3, np.float32)})  # was: saved, the failure kept for wait()
            assert info.value.errno == errno.ENOSPC
            assert steps_in(tmp_path / "local") == [0, 2]
            ckptr.save(3, {"w": np.full(100_000, 3, np.float32)})  # raised once
            ckptr.save(4, {"w": np.full(100_000, 4, np.float32)})
            ckptr.wait()
            assert steps_in(mnt / "durable") == [0, 4]


def test_ckpt_ls_lists_a_step_whose_local_manifest_is_damaged_by_its_sound_durable_copy_as_the_checkpointer(
        tmp_path, capsys):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in range(5):
            ckptr.save(step, {"step": step})
    fsutil.flip(tmp_path / "local" / "4" / "manifest.json")
    with ckpt.Checkpointer(tmp_path / "durable", local=local) as ckptr:
        listed = [(c.step, sorted(c.locations)) for c in ckptr.checkpoints]
        assert listed[-1] == (4, ["durable"]) and ckptr.load()["step"] == 4
    assert cli.main(["ls", str(tmp_path / "durable"), "--local", str(tmp_path / "local"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(s["step"], s["tiers"]) for s in printed["steps"]] == listed  # was: 4 DAMAGED, on both tiers
    assert printed["latest"] == 4 and printed["steps"][-1]["path"] == str(tmp_path / "durable" / "4")


@pytest.mark.parametrize("durable", ["local", "s3"])
@pytest.mark.parametrize("lightweight", [False, True], ids=["listed", "lightweight_initialize"])
def test_a_step_saved_again_in_the_durable_root_by_another_writer_loads_that_newer_copy_not_the_local_one(
        request, tmp_path, capsys, durable, lightweight):
    root = request.getfixturevalue("bucket") if durable == "s3" else str(tmp_path / "durable")
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(root, save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in range(3):
            ckptr.save(step, {"w": np.full(2, step)})
    with ckpt.Checkpointer(root) as other:  # another machine's run saves step 2 again in the durable root
        other.save(2, {"w": np.full(2, 20)}, force=True, overwrite=True)
    with ckpt.Checkpointer(root, local=local, lightweight_initialize=lightweight) as ckptr:
        assert sorted(ckptr.latest.locations) == ["durable", "local"]
        assert ckptr.load(2)["w"].tolist() == ckptr.load()["w"].tolist() == [20, 20]  # was: [2, 2], the local copy
        assert ckptr.metadata(2).commit_timestamp_nsecs == ckpt.metadata(f"{root}/2").commit_timestamp_nsecs
        if not lightweight:
            assert str(ckptr.latest.path) == f"{root}/2"
    assert cli.main(["ls", root, "--local", str(tmp_path / "local"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"][-1]["path"] == f"{root}/2"


def test_saving_again_a_step_only_the_local_tier_holds_raises_as_one_tier_does(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        for step in range(7):
            ckptr.save(step, {"w": np.full(3, step)})
        with pytest.raises(errors.StepAlreadyExistsError, match="step 6 already exists at .*local/6"):
            ckptr.save(6, {"w": np.full(3, 60)})  # was: False, 'the durable root already holds step 6'
    sdp3 = sdp.FixedIntervalPolicy(3)  # a restarted run whose durable policy wants step 6
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp3, local=local) as ckptr:
        with pytest.raises(errors.StepAlreadyExistsError, match="step 6 already exists"):
            ckptr.save(6, {"w": np.full(3, 60)})  # was: True, the local copy promoted and this state dropped
        assert ckptr.save(6, {"w": np.full(3, 60)}, force=True)  # force: the local copy is made durable
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints][-1] == (6, ["durable", "local"])
        assert ckptr.load(6)["w"][0] == 6


def test_should_save_is_false_for_a_step_below_the_latest_that_only_the_local_tier_holds(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        for step in range(8):
            ckptr.save(step, {"w": np.full(3, step)})
    sdp3 = sdp.FixedIntervalPolicy(3)  # a restarted run whose durable policy wants step 6, below the latest (7)
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp3, local=local) as ckptr:
        assert ckptr.latest.step == 7
        assert not ckptr.should_save(6)  # was: True (the durable tier's latest is 5): a hook then saved it
        assert ckptr.should_save(9)
        assert ckptr.save(0, {"w": np.full(3, 10)}, overwrite=True)  # an overwrite the policy wants still saves
        assert ckptr.load(0)["w"][0] == 10


def test_a_step_below_the_latest_that_only_the_durable_tier_holds_is_not_saved_on_a_new_machine(tmp_path, caplog):
    """A new machine (an empty local tier) whose loop began again below the durable tier's latest step (it did not
    load): should_save was True and each step was saved on the local tier, where one tier skips them and says so."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        for step in range(11):
            ckptr.save(step, {"w": np.full(3, step)})
    shutil.rmtree(tmp_path / "local")
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr, \
            caplog.at_level(logging.WARNING, "ckpt"):
        assert not ckptr.should_save(3)  # was: True
        assert not ckptr.save(3, {"w": np.full(3, 30)})
        assert [c.step for c in ckptr.checkpoints] == [0, 5, 10]  # was: [0, 3, 5, 10], step 3 on the local tier
        assert ckptr.save(11, {"w": np.full(3, 11)})
    assert "step 3 is not saved, nor any step up to 10" in caplog.text


def test_an_overwrite_of_a_step_only_the_local_tier_holds_asks_its_policy_as_one_tier_does(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(7, {"w": np.zeros(2)})
        assert ckptr.save(7, {"w": np.ones(2)}, overwrite=True)  # was: False, nothing saved
        assert ckptr.load(7)["w"][0] == 1 and sorted(ckptr.latest.locations) == ["local"]


def test_a_skipped_step_behind_the_latest_names_the_tier_that_holds_the_latest(tmp_path, caplog):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr, \
            caplog.at_level(logging.WARNING, "ckpt"):
        ckptr.save(7, {"w": np.zeros(2)})
        assert ckptr.save_async(6, {"w": np.zeros(2)}) is None
    assert f"step 6 is not saved, nor any step up to 7: {tmp_path / 'local'} already holds step 7" in caplog.text


def test_load_async_of_the_latest_falls_back_to_older_steps_as_load_does(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in range(4):
            ckptr.save(step, tiers_worker.state(step))
    fsutil.flip(tmp_path / "local" / "3" / "arrays" / "0" / "c" / "0" / "0", 9)  # step 3: on the local tier only
    with ckpt.Checkpointer(tmp_path / "durable", local=local) as ckptr:
        assert_bit_exact(ckptr.load(), 2)
        assert_bit_exact(ckptr.load_async().result(timeout=60), 2)  # was: CheckpointCorruptedError of step 3
        assert_bit_exact(ckptr.load_checkpointables_async().result(timeout=60)["state"], 2)


def test_only_the_step_saved_for_a_preemption_is_promoted_as_one_later_saves_follow_the_policies(tmp_path):
    """A job that goes on after a preemption (``reset()``): each later local save was promoted too, as a
    preemption save, whatever the durable policy said."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    policy = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000), sdp.PreemptionCheckpointingPolicy()])
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=policy, local=local) as ckptr:
        ckptr.save(1, {"w": np.ones(2)})
        try:
            ckpt.preemption.notify()
            ckptr.save(2, {"w": np.ones(2)})
        finally:
            ckpt.preemption.reset()
        for step in range(3, 6):
            ckptr.save(step, {"w": np.ones(2)})
        ckptr.wait()
        assert steps_in(tmp_path / "durable") == [2]  # was: [2, 3, 4, 5]
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (2, ["durable"]), (4, ["local"]), (5, ["local"])]


def test_a_waiting_promotion_is_replaced_by_a_newer_one_but_never_a_forced_one(tmp_path, monkeypatch, caplog):
    """Saves the durable policy chose faster than uploads: every promotion queued, and the local tier kept
    each step until its turn (a disk filling up). At most one waits now; a newer one replaces it."""
    copying, released, copy_step = threading.Event(), threading.Event(), tiers._copy_step

    def held_copy(*args, **kwargs):
        copying.set()
        assert released.wait(60), "the test never released the promotion"
        return copy_step(*args, **kwargs)

    monkeypatch.setattr(tiers, "_copy_step", held_copy)
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1),
                                        preservation_policy=pp.LatestN(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1),
                           local=local) as ckptr, caplog.at_level(logging.INFO, "ckpt"):
        ckptr.save_async(0, {"w": np.zeros(2)})
        assert copying.wait(60)  # step 0's promotion runs (held)
        ckptr.save_async(1, {"w": np.ones(2)})  # waits, then is replaced by the forced step 2
        ckptr.save_async(2, {"w": np.ones(2)}, force=True)  # never replaced
        ckptr.save_async(3, {"w": np.ones(2)})  # waits behind step 2, replaced by step 4
        response = ckptr.save_async(4, {"w": np.ones(2)})
        released.set()
        assert response.result(timeout=60)
        ckptr.wait()
        assert steps_in(tmp_path / "durable") == [0, 2, 4]  # was: [0, 1, 2, 3, 4]
        assert steps_in(tmp_path / "local") == [4]
    for skipped, newer in ((1, 2), (3, 4)):
        assert (f"step {skipped} is not promoted to the durable tier: step {newer}, newer, replaced it while it "
                "waited for the promotion in flight") in caplog.text


def test_a_step_whose_promotion_a_crash_cut_short_is_promoted_by_the_next_writer(bucket, tmp_path, caplog):
    """Step 10, chosen by the durable policy, committed locally, its upload killed before its manifest: the
    restarted run promoted nothing but the steps its policy chose from then on, so step 10 stayed on the
    local tier only (lost with the machine)."""
    local = kill_worker("interrupt", "saved", bucket, tmp_path)
    with tiers_worker.checkpointer(bucket, str(local)) as ckptr, caplog.at_level(logging.WARNING, "ckpt"):
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (0, ["durable"]), (5, ["durable"]), (10, ["local"]), (11, ["local"]), (12, ["local"])]
        ckptr.save(13, tiers_worker.state(13))  # the first save of the restarted run's writer
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (5, ["durable"]), (10, ["durable"]), (12, ["local"]), (13, ["local"])]  # was: 10 never promoted
    assert "step 10, newer than the durable tier's latest (5), is on the local tier only" in caplog.text
    with ckpt.Checkpointer(bucket) as durable:
        assert_bit_exact(durable.load(10), 10)


def test_a_damaged_durable_step_where_the_next_writer_would_promote_its_local_copy_is_named_not_raised(tmp_path,
                                                                                                       caplog):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in range(3):
            ckptr.save(step, {"step": step})
    fsutil.flip(tmp_path / "durable" / "2" / "manifest.json")  # not listed: local step 2 is newer than durable 0
    damaged = fsutil.snapshot(tmp_path / "durable" / "2")
    for restart in range(2):
        with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2),
                               local=local) as ckptr, caplog.at_level(logging.WARNING, "ckpt"):
            assert ckptr.load(2)["step"] == 2  # from the local tier
            ckptr.save(3 + restart, {"step": 3 + restart})
            ckptr.wait()  # was: ForeignEntryError at every restart, from the promotion of step 2
        assert (f"step 2, newer than the durable tier's latest (0), is on the local tier only: a crash left it "
                f"unpromoted, and is not promoted: cannot save step 2: {tmp_path / 'durable' / '2'} holds") in caplog.text
    assert fsutil.snapshot(tmp_path / "durable" / "2") == damaged


@pytest.mark.parametrize("policy, promoted", [(sdp.FixedIntervalPolicy(2), 4),  # its newest choice; not 2 too
                                              (sdp.ContinuousCheckpointingPolicy(), 5)],  # cannot be asked again
                         ids=["chose by step numbers", "chose by the clock"])
def test_the_next_writer_promotes_only_the_newest_unpromoted_step_the_durable_policy_chose(tmp_path, policy, promoted):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1),
                                        preservation_policy=pp.LatestN(4))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1000),
                           local=local) as ckptr:
        for step in range(6):
            ckptr.save(step, {"w": np.full(2, step)})
    assert steps_in(tmp_path / "local") == [2, 3, 4, 5] and steps_in(tmp_path / "durable") == [0]
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=policy, local=local) as ckptr:
        assert steps_in(tmp_path / "durable") == [0]  # opening writes nothing: a reader may open the root
        ckptr.save(7, {"w": np.full(2, 7)}, force=True)
        ckptr.wait()
    assert steps_in(tmp_path / "durable") == [0, promoted, 7]
    assert ckpt.load(tmp_path / "durable" / str(promoted))["w"][0] == promoted


def test_the_next_writer_promotes_the_newest_unpromoted_step_though_its_first_save_of_that_step_is_refused(tmp_path):
    """Step 10, chosen by the durable policy, committed locally, a crash before its promotion; the next writer's first
    save was step 10 again (overwrite=True), refused (a bad leaf): its recovery skipped the step that save was of, and
    the local policy dropped step 10 at the next saves: lost from both tiers."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(5, {"w": np.full(2, 5)})
    with ckpt.Checkpointer(tmp_path / "local") as local_tier:  # what the crash left: step 10 on the local tier only
        local_tier.save(10, {"w": np.full(2, 10)})
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        with pytest.raises(TypeError, match="builtins.object"):
            ckptr.save(10, {"w": object()}, overwrite=True)
        for step in (11, 12, 13):
            ckptr.save(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (5, ["durable"]), (10, ["durable"]), (12, ["local"]), (13, ["local"])]  # was: 10 nowhere
    assert ckpt.load(tmp_path / "durable" / "10")["w"][0] == 10


def test_only_policies_that_decide_by_step_numbers_can_be_asked_again_what_they_chose():
    assert sdp.decides_by_step_numbers(sdp.AnySavePolicy([sdp.InitialSavePolicy(), sdp.FixedIntervalPolicy(5),
                                                          sdp.SpecificStepsPolicy([3])]))
    assert not sdp.decides_by_step_numbers(sdp.AnySavePolicy([sdp.FixedIntervalPolicy(5),
                                                              sdp.PreemptionCheckpointingPolicy()]))
    assert not sdp.decides_by_step_numbers(sdp.ContinuousCheckpointingPolicy())


def test_once_a_preemptions_promotion_has_ended_wait_waits_for_the_promotions_again(tmp_path, monkeypatch):
    """A preemption's promotion that outlasted the grace period left its expired deadline behind: every
    later wait() (a job going on after ``reset()``) returned at once, promotions unfinished, failures unraised."""
    held, copy_step = {2: threading.Event(), 5: threading.Event()}, tiers._copy_step

    def held_copy(source, final, step, *args, **kwargs):
        assert step not in held or held[step].wait(60), "the test never released the promotion"
        return copy_step(source, final, step, *args, **kwargs)

    monkeypatch.setattr(tiers, "_copy_step", held_copy)
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1),
                                        grace_period_secs=0)
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        try:
            ckpt.preemption.notify()
            promotion = ckptr.save_async(2, {"w": np.ones(2)})
            ckptr.wait()  # the grace period ran out
        finally:
            ckpt.preemption.reset()
        held[2].set()
        assert promotion.result(timeout=60)
        threading.Timer(0.5, held[5].set).start()
        for step in (3, 4, 5):
            ckptr.save_async(step, {"w": np.ones(2)})
        ckptr.wait()
        assert steps_in(tmp_path / "durable") == [2, 5]  # was: [2], step 5 still being promoted


def test_ckpt_ls_refuses_a_local_tier_of_another_durable_root_as_the_checkpointer_does(tmp_path, capsys):
    local = ckpt.LocalCheckpointOptions(tmp_path / "ssd", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "run1", save_decision_policy=sdp.FixedIntervalPolicy(100), local=local) as ckptr:
        for step in range(3):
            ckptr.save(step, {"w": np.full(2, step)})
    ckpt.save(tmp_path / "run2" / "0", {"w": np.zeros(2)})
    assert cli.main(["ls", str(tmp_path / "run2"), "--local", str(tmp_path / "ssd")]) == 2  # was: 0, latest step 2
    assert (f"--local {tmp_path / 'ssd'} holds the local tier of the durable root {tmp_path / 'run1'}, not of "
            f"{tmp_path / 'run2'}") in capsys.readouterr().err
    assert cli.main(["ls", str(tmp_path / "run1"), "--local", str(tmp_path / "ssd"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latest"] == 2


def test_ckpt_ls_refuses_the_root_itself_as_its_local_tier_as_the_checkpointer_does(tmp_path, capsys):
    ckpt.save(tmp_path / "run" / "1", {"w": np.zeros(2)})
    for local in (tmp_path / "run", tmp_path / "x" / ".." / "run"):
        assert cli.main(["ls", str(tmp_path / "run"), "--local", str(local)]) == 2  # was: 0, step 1 in both tiers
        assert f"the local tier's directory is the root itself ({tmp_path / 'run'})" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ls", "show", "verify"])
def test_the_ckpt_command_refuses_a_step_as_the_local_tier_as_the_checkpointer_does(tmp_path, capsys, command):
    """A step of the root (a typo for the local tier) was read as an empty local tier: exit status 0, every step
    durable only."""
    ckpt.save(tmp_path / "run" / "1", {"w": np.zeros(2)})
    for local in (tmp_path / "run" / "1", tmp_path / "run" / "1" / "sub"):
        with pytest.raises(errors.RootDirectoryError, match="it (is|lies in) .*a checkpoint"):
            ckpt.Checkpointer(tmp_path / "run", local=ckpt.LocalCheckpointOptions(local))
        assert cli.main([command, str(tmp_path / "run"), "--local", str(local)]) == 2  # was: 0
        assert "--local" in (err := capsys.readouterr().err) and "a checkpoint (a step directory)" in err


def test_a_failed_local_save_of_a_step_to_promote_is_raised_once(tmp_path):
    """Its failure was kept by both writers, the local save's and the promotion's that waited for it: raised
    by the next save or wait, then again by the one after (a loop that had handled it died at close)."""
    with fsutil.tmpfs(tmp_path / "mnt", size="2m") as mnt:
        local = ckpt.LocalCheckpointOptions(mnt / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
        with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1), local=local) as ckptr:
            ckptr.save(0, {"w": np.full(100_000, 0, np.float32)})
            fsutil.fill(mnt, 64 << 10)
            ckptr.save_async(1, {"w": np.full(100_000, 1, np.float32)})
            with pytest.raises(OSError, match=r"local/1\.ckpt-tmp") as info:
                ckptr.wait()
            assert info.value.errno == errno.ENOSPC
            (mnt / "filler").unlink()
            ckptr.save(2, {"w": np.full(100_000, 2, np.float32)})  # was: the same ENOSPC again, here or at wait()
            ckptr.wait()
            assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
                (0, ["durable", "local"]), (2, ["durable", "local"])]


def test_a_second_preemption_after_a_reset_is_saved_and_promoted_as_the_first(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(2))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1000), local=local) as ckptr:
        for step in range(1, 6):
            try:
                if step in (3, 5):  # a notice, withdrawn after the step is saved
                    ckpt.preemption.notify()
                assert ckptr.save(step, {"w": np.full(2, step)}) == (step != 1)
            finally:
                ckpt.preemption.reset()
        assert steps_in(tmp_path / "durable") == [3, 5]  # was: [3], step 5 no preemption save


def test_a_promotion_the_policies_chose_leaves_the_durable_tier_to_the_background(tmp_path, monkeypatch):
    """save_async of a step the durable policy chose asked the durable root about the step from the loop's
    thread: with an object store out of reach (tensorstore retrying for minutes) the loop stopped, local
    saves and all. Only a save asked for (force, overwrite) is checked there, before anything is written."""
    from ckpt import root

    asked, check_target = [], root.check_target

    def recording(final, *args, **kwargs):
        if final.parent == tmp_path / "durable":
            asked.append(threading.current_thread() is threading.main_thread())
        return check_target(final, *args, **kwargs)

    monkeypatch.setattr(root, "check_target", recording)
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in range(4):
            ckptr.save_async(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert asked and not any(asked)  # was: the loop's thread asked first, for each step
        before = len(asked)
        ckptr.save(5, {"w": np.full(2, 5)}, force=True)
        assert asked[before] and not any(asked[before + 1:])
        assert steps_in(tmp_path / "durable") == [0, 2, 5]


def test_a_step_to_promote_to_a_durable_root_another_writer_holds_is_refused_before_it_is_saved_locally(tmp_path):
    """The durable root was taken only after the local save: the save raised DirectoryLockedError (or, on a
    read-only durable root, RootDirectoryError) with the step committed locally all the same, and kept there
    for ever for a promotion that never ran (LatestN(2) left every such step on the local disk)."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable") as other_writer:
        other_writer.save(0, {"w": np.zeros(2)})
        with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(3),
                               local=local) as ckptr:
            for step in range(1, 8):
                if step % 3:
                    ckptr.save(step, {"w": np.full(2, step)})
                    continue
                with pytest.raises(errors.DirectoryLockedError, match="being written by another Checkpointer"):
                    ckptr.save(step, {"w": np.full(2, step)})
            assert steps_in(tmp_path / "local") == [5, 7]  # was: [3, 6, 7], each refused step saved and kept
            assert steps_in(tmp_path / "durable") == [0]


def test_an_overwrite_of_a_step_the_durable_tier_holds_replaces_its_durable_copy_too(tmp_path):
    """overwrite=True of a step on both tiers, which the durable policy does not choose, replaced the local copy
    only: once the local copy was gone (a new machine, a damaged local step) the old values were restored."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(4, {"w": np.full(2, 4)}, force=True)
        ckptr.save(6, {"w": np.full(2, 6)})  # the local tier only
        assert ckptr.save(4, {"w": np.full(2, 40)}, overwrite=True)
        ckptr.save(6, {"w": np.full(2, 60)}, overwrite=True)
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (4, ["durable", "local"]), (6, ["local"])]
    shutil.rmtree(tmp_path / "local")  # a new machine
    with ckpt.Checkpointer(tmp_path / "durable", local=local) as ckptr:
        assert ckptr.load(4)["w"][0] == 40  # was: 4, the values the overwrite replaced


def test_an_overwrite_of_a_step_being_promoted_waits_so_that_the_promotion_copies_one_whole_step(tmp_path, monkeypatch):
    """The promotion of step 4 copied its local files while save(4, overwrite=True) replaced them: the durable
    step it committed held the old arrays and the new tree.json, damaged (listed, not loadable) until the
    overwrite's own promotion replaced it, and for good when the process died first."""
    reading, released, read = threading.Event(), threading.Event(), tiers._read

    def held_read(path):
        data = read(path)
        if "arrays" in path.parts and not reading.is_set():  # the old array copied; the rest of the step next
            reading.set()
            assert released.wait(60), "the test never released the promotion"
        return data

    durable_copies, copy_step = [], tiers._copy_step

    def copy_and_load(source, final, *args, **kwargs):
        copied = copy_step(source, final, *args, **kwargs)
        durable_copies.append(ckpt.load(final)["w"][0])  # was: CheckpointCorruptedError for the first
        return copied

    monkeypatch.setattr(tiers, "_read", held_read)
    monkeypatch.setattr(tiers, "_copy_step", copy_and_load)
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(4), local=local) as ckptr:
        ckptr.save_async(4, {"w": np.full(300_000, 4, np.float32)})
        assert reading.wait(60)
        threading.Timer(0.5, released.set).start()
        ckptr.save(4, {"w": np.full(300_000, 40, np.float32)}, overwrite=True)  # waits for step 4's promotion
        ckptr.wait()
    assert durable_copies == [4, 40]


@pytest.mark.parametrize("lightweight", [False, True], ids=["", "lightweight_initialize"])
def test_a_durable_copy_left_behind_by_a_crash_during_an_overwrites_promotion_is_replaced_by_the_next_writer(tmp_path,
                                                                                                          lightweight):
    """Step 4 saved again with overwrite=True, committed locally, its promotion cut short by a crash: its durable
    copy kept the replaced values for good (the next writer promoted only steps newer than the durable latest),
    and a new machine restored them. So too where the next writer was opened with lightweight_initialize=True, whose
    listings read no manifest: no commit time told that the local copy was the newer."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(4, {"w": np.full(2, 4)}, force=True)
        ckptr.save(5, {"w": np.full(2, 5)})
    with ckpt.Checkpointer(tmp_path / "local") as local_tier:  # what the crash left: the local copy saved again only
        local_tier.save(4, {"w": np.full(2, 40)}, overwrite=True)
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(5), local=local,
                           lightweight_initialize=lightweight) as ckptr:
        ckptr.save(6, {"w": np.full(2, 6)})
        ckptr.wait()
    assert ckpt.load(tmp_path / "durable" / "4")["w"][0] == 40  # was: 4
    assert ckpt.load(tmp_path / "durable" / "5")["w"][0] == 5


@pytest.mark.parametrize("cleanup", [False, True], ids=["swept at the first save", "swept at open"])
def test_on_s3_a_step_whose_overwrites_promotion_a_crash_cut_short_is_promoted_again_by_the_next_writer(
        bucket, tmp_path, cleanup):
    """Step 4 saved again with overwrite=True, committed locally; its promotion, which on an object store deletes the
    durable copy first (no rename), cut short by a crash: the next writer promoted only steps newer than the durable
    latest, so step 4 stayed on the local tier only, and was lost from both tiers once the local policy dropped it."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(4, {"w": np.full(2, 4)}, force=True)
        ckptr.save(5, {"w": np.full(2, 5)})
    with ckpt.Checkpointer(tmp_path / "local") as local_tier:  # what the crash left: the local copy saved again,
        local_tier.save(4, {"w": np.full(2, 40)}, overwrite=True)
    ckpt.objectstore.ObjectPath(f"{bucket}/4/manifest.json").unlink()  # the durable copy's commit undone
    assert_step_4_promoted_again_by_the_next_writer(bucket, local, cleanup=cleanup)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_step_whose_overwrites_promotion_a_crash_cut_short_stays_durable_where_the_next_writer_refuses_to_save_it(
        tmp_path, request, store):
    """The two tests above, the next writer's first save being step 4 again (overwrite=True), refused (a bad leaf):
    its recovery skipped the step that save was of, so step 4's durable copy kept the replaced values (local root), or
    none at all (s3), and the local policy dropped the local copy at the next saves: the values 40 were lost."""
    durable = tmp_path / "durable" if store == "local" else request.getfixturevalue("bucket")
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(durable, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(4, {"w": np.full(2, 4)}, force=True)
        ckptr.save(5, {"w": np.full(2, 5)})
    with ckpt.Checkpointer(tmp_path / "local") as local_tier:  # what the crash left: the local copy saved again
        local_tier.save(4, {"w": np.full(2, 40)}, overwrite=True)
    if store == "s3":
        ckpt.objectstore.ObjectPath(f"{durable}/4/manifest.json").unlink()  # the durable copy's commit undone
    with ckpt.Checkpointer(durable, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        with pytest.raises(TypeError, match="builtins.object"):
            ckptr.save(4, {"w": object()}, overwrite=True)
        assert_saves_6_to_8_promote_step_4(ckptr)
    assert ckpt.load(f"{durable}/4")["w"][0] == 40  # was: 4 (local), StepNotFoundError (s3)


def assert_step_4_promoted_again_by_the_next_writer(bucket: str, local: ckpt.LocalCheckpointOptions, *,
                                                    cleanup: bool = False) -> None:
    """Step 4, saved again as 40 on the local tier, its promotion cut short: the next writer's saves promote it."""
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local,
                           cleanup_tmp_directories=cleanup) as ckptr:
        assert_saves_6_to_8_promote_step_4(ckptr)
    assert ckpt.load(f"{bucket}/4")["w"][0] == 40


def assert_saves_6_to_8_promote_step_4(ckptr: ckpt.Checkpointer) -> None:
    """Saves steps 6, 7 and 8, the local policy (LatestN(2)) dropping step 4 meanwhile: step 4 is durable."""
    for step in (6, 7, 8):
        ckptr.save(step, {"w": np.full(2, step)})
    ckptr.wait()
    assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
        (4, ["durable"]), (5, ["durable"]), (7, ["local"]), (8, ["local"])]  # was: 4 nowhere


def overwrite_step_4_refused(ckptr: ckpt.Checkpointer, monkeypatch) -> None:
    """Saves steps 4 and 5 on both tiers, then step 4 again as 40 (``overwrite=True``), whose promotion fails (a
    store that refuses the step's writes) once it has removed the durable copy it replaces."""
    copy_files = tiers._copy_files

    def refused(source, final, *args, **kwargs):
        if source.name == "4":
            raise PermissionError(errno.EACCES, f"promoting {source} to {final}: access denied")
        return copy_files(source, final, *args, **kwargs)

    ckptr.save(4, {"w": np.full(2, 4)}, force=True)
    ckptr.save(5, {"w": np.full(2, 5)})
    ckptr.wait()
    monkeypatch.setattr(tiers, "_copy_files", refused)
    with pytest.raises(PermissionError, match="access denied"):
        ckptr.save(4, {"w": np.full(2, 40)}, overwrite=True)
    monkeypatch.setattr(tiers, "_copy_files", copy_files)


def test_on_s3_an_overwrites_promotion_that_failed_once_it_removed_the_durable_copy_is_promoted_again(bucket, tmp_path,
                                                                                                     monkeypatch):
    """Was: the failed promotion removed all it had begun at the step's name, the marker too, after the durable copy
    it replaced was gone; the next writer saw nothing begun there and never promoted the step again, which was lost
    from both tiers once the local policy dropped it (found with a store that refused the step's writes)."""
    def local() -> ckpt.LocalCheckpointOptions:
        return ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))

    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local()) as ckptr:
        overwrite_step_4_refused(ckptr, monkeypatch)
    assert_step_4_promoted_again_by_the_next_writer(bucket, local())


def test_on_s3_an_overwrites_promotion_that_failed_is_promoted_again_by_the_next_save_of_its_run(bucket, tmp_path,
                                                                                                monkeypatch):
    """Was: a run that went on after the failure (its error caught) still listed step 4 as durable, its durable copy
    gone; the local policy dropped the local copy at the next saves, and step 4 was lost from both tiers."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        overwrite_step_4_refused(ckptr, monkeypatch)
        assert sorted(ckptr.checkpoints[0].locations) == ["local"]  # was: durable too, though gone from there
        assert_saves_6_to_8_promote_step_4(ckptr)
    assert ckpt.load(f"{bucket}/4")["w"][0] == 40


def overwrite_step_4_refused_not_telling_whether_its_copy_is_gone(ckptr: ckpt.Checkpointer, monkeypatch) -> None:
    """:func:`overwrite_step_4_refused`, the store refusing every request for step 4 once the promotion has removed its
    durable copy (credentials that expired then), the check whether the copy is gone as well."""
    ObjectPath = ckpt.objectstore.ObjectPath
    exists, remove_all_but, removed = ObjectPath.exists, ObjectPath.remove_all_but, []

    def removing(path, *args):
        remove_all_but(path, *args)
        removed.append(path.name)

    def refused(path):
        if removed.count("4") >= 2 and path.parent.name == "4":  # (from the second removal: the overwrite's)
            raise PermissionError(errno.EACCES, f"{path}: access denied")
        return exists(path)

    with monkeypatch.context() as refusing:
        refusing.setattr(ObjectPath, "remove_all_but", removing)
        refusing.setattr(ObjectPath, "exists", refused)
        overwrite_step_4_refused(ckptr, monkeypatch)


def test_on_s3_an_overwrites_promotion_that_failed_where_the_store_refused_to_tell_whether_the_copy_is_gone_is_kept(
        bucket, tmp_path, monkeypatch):
    """The store refused to tell whether the durable copy of step 4 was gone: the run took the copy for still there,
    listed step 4 as durable, and its local policy dropped the local copy at the next saves; step 4 was lost from
    both tiers."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        overwrite_step_4_refused_not_telling_whether_its_copy_is_gone(ckptr, monkeypatch)
        assert_saves_6_to_8_promote_step_4(ckptr)
    assert ckpt.load(f"{bucket}/4")["w"][0] == 40  # was: CheckpointNotFoundError


def test_on_s3_a_step_deleted_after_its_overwrites_promotion_failed_is_not_promoted_again(bucket, tmp_path,
                                                                                          monkeypatch):
    """Step 4 deleted by the user once its overwrite's promotion failed (its local copy kept to promote it again):
    the next save queued its promotion all the same, which failed, and wait() raised 'step 4 was removed from the
    local tier ... it is not promoted' for a step the user had deleted."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        overwrite_step_4_refused(ckptr, monkeypatch)
        assert ckptr.delete(4)
        ckptr.save(6, {"w": np.full(2, 6)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [(5, ["durable", "local"]), (6, ["local"])]



def test_on_s3_a_step_deleted_once_its_overwrites_promotion_failed_not_telling_whether_its_copy_is_gone_is_gone(
        bucket, tmp_path, monkeypatch):
    """Was: delete(4), once the store answered again, raised ForeignEntryError 's3://.../4 is not a committed ckpt step
    (it holds a directory holding '.ckpt-owned'); it was not deleted' (what the failed promotion left at its name),
    after it had deleted the local copy, and listed step 4 as durable again, with nothing there to load."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        overwrite_step_4_refused_not_telling_whether_its_copy_is_gone(ckptr, monkeypatch)
        assert ckptr.delete(4)
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [(5, ["durable", "local"])]
    assert not ckpt.objectstore.ObjectPath(f"{bucket}/4").exists()


KILLED_ONCE_THE_DURABLE_COPY_IS_REMOVED = """
import os, signal, sys
import numpy as np
import ckpt
from ckpt.objectstore import ObjectPath
from ckpt.training import save_decision_policies as sdp
local = ckpt.LocalCheckpointOptions(sys.argv[2], save_decision_policy=sdp.FixedIntervalPolicy(1))
with ckpt.Checkpointer(sys.argv[1], save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
    ckptr.save(4, {"w": np.full(2, 4)}, force=True)
    ckptr.save(5, {"w": np.full(2, 5)})
    ckptr.wait()
    def killed_after(remove):
        def removed(path, *args, **kwargs):
            remove(path, *args, **kwargs)
            if path.name == "4":  # the durable copy of step 4 removed, its new one not yet written
                os.kill(os.getpid(), signal.SIGKILL)
        return removed
    ObjectPath.remove_tree, ObjectPath.remove_all_but = map(killed_after, (ObjectPath.remove_tree,
                                                                           ObjectPath.remove_all_but))
    ckptr.save(4, {"w": np.full(2, 40)}, overwrite=True)
    ckptr.wait()
"""


def test_on_s3_an_overwrites_promotion_killed_once_it_removed_the_durable_copy_is_promoted_again(bucket, tmp_path):
    """SIGKILL between the promotion's removal of the durable copy it replaces and its first write: the step's name
    held nothing at all, so the next writer saw no promotion begun there and step 4 was lost from both tiers once
    the local policy dropped it (load: CheckpointNotFoundError)."""
    killed = procs.run_script(KILLED_ONCE_THE_DURABLE_COPY_IS_REMOVED, bucket, str(tmp_path / "local"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert_step_4_promoted_again_by_the_next_writer(bucket, ckpt.LocalCheckpointOptions(
        tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1)))


def test_a_local_step_found_gone_before_its_promotion_began_fails_it_naming_the_step(tmp_path, monkeypatch):
    """Step 4, its promotion waiting behind step 2's, removed from the local tier (a cleaner of the SSD) and found
    gone by a load: wait() raised a bare StopIteration, naming nothing."""
    released, copy_step = threading.Event(), tiers._copy_step

    def held_copy(source, final, step, *args, **kwargs):
        assert step != 2 or released.wait(60), "the test never released the promotion"
        return copy_step(source, final, step, *args, **kwargs)

    monkeypatch.setattr(tiers, "_copy_step", held_copy)
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in (2, 3, 4):
            ckptr.save_async(step, {"w": np.full(2, step)})
        while ckptr.latest.step != 4:  # committed locally (wait() would wait for the held promotion)
            time.sleep(0.01)
        shutil.rmtree(tmp_path / "local" / "4")
        with pytest.raises(errors.StepNotFoundError):
            ckptr.load(4)
        released.set()
        with pytest.raises(errors.StepNotFoundError, match=r"step 4 was removed from the local tier .*local before its "
                                                           r"promotion to the durable tier began") as info:
            ckptr.wait()  # was: StopIteration()
        assert info.value.step == 4
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [(2, ["durable", "local"]), (3, ["local"])]


def _another_run_and_step_2s_promotion_held(tmp_path: Path, monkeypatch) -> tuple[ckpt.LocalCheckpointOptions,
                                                                                     threading.Event]:
    """Saves another run's checkpoint at ``tmp_path / "other"`` and holds the promotion of step 2 until the event is set;
    returns the local tier's options (a save every step) and the event."""
    ckpt.save(tmp_path / "other", {"w": np.full(2, 999)})
    released, copy_step = threading.Event(), tiers._copy_step
    monkeypatch.setattr(tiers, "_copy_step", lambda source, final, step, *args: (
        step != 2 or released.wait(60)) and copy_step(source, final, step, *args))
    return ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1)), released


def test_a_local_step_replaced_by_a_link_before_its_promotion_is_not_promoted_through_it(tmp_path, monkeypatch):
    """Step 4, its promotion waiting behind step 2's, replaced on the local tier by a link to another run's step 4: the
    promotion copied what the link leads to, and the durable step 4 held the other run's values."""
    local, released = _another_run_and_step_2s_promotion_held(tmp_path, monkeypatch)
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in (2, 4):
            ckptr.save_async(step, {"w": np.full(2, step)})
        while ckptr.latest.step != 4:  # committed locally (wait() would wait for the held promotion)
            time.sleep(0.01)
        (tmp_path / "local" / "4").rename(tmp_path / "moved")
        (tmp_path / "local" / "4").symlink_to(tmp_path / "other")
        released.set()
        with pytest.raises(errors.StepNotFoundError, match=r"step 4 \(.*local/4\) is no committed step now: it holds "
                                                           r"a symbolic link"):
            ckptr.wait()
    assert sorted(os.listdir(tmp_path / "durable")) == [".ckpt.lock", "2"]  # was: 4, holding 999


@pytest.mark.parametrize("forced", ["a step the local tier holds", "a step waiting for its promotion"])
def test_a_local_step_replaced_by_a_link_is_not_marked_pending_through_it(tmp_path, monkeypatch, forced):
    """A forced save of step 3 held locally (or step 4's forced promotion, waiting behind step 2's), its local
    directory replaced since it was listed by a link to another run's checkpoint: the mark of a promotion owed
    (.ckpt-promoting) was written through the link into that checkpoint, and left there, before the promotion was
    refused."""
    local, released = _another_run_and_step_2s_promotion_held(tmp_path, monkeypatch)
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        step = 3 if forced == "a step the local tier holds" else 4
        ckptr.save_async(2, {"w": np.full(2, 2)})
        ckptr.save_async(step, {"w": np.full(2, step)}, force=step == 4)
        while ckptr.latest.step != step:  # committed locally (wait() would wait for the held promotion)
            time.sleep(0.01)
        (tmp_path / "local" / str(step)).rename(tmp_path / "moved")
        (tmp_path / "local" / str(step)).symlink_to(tmp_path / "other")
        with pytest.raises(errors.StepNotFoundError, match=rf"step {step} \(.*local/{step}\) is no committed step now: "
                                                           r"it holds a symbolic link"):
            if step == 3:
                ckptr.save(3, {"w": np.full(2, 3)}, force=True)
            released.set()
            ckptr.wait()
        released.set()
    assert sorted(os.listdir(tmp_path / "other")) == [".ckpt-owned", "manifest.json", "packed", "tree.json"]


def test_ckpt_show_and_verify_with_local_read_the_step_a_load_reads_and_check_every_copy_on_either_tier(tmp_path, capsys):
    """show and verify of the durable root read that tier alone: show gave its latest (2) where a load reads step
    3 of the local tier, and verify passed while the local copy a load reads first was damaged."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in range(4):
            ckptr.save(step, tiers_worker.state(step))
    durable, tier = str(tmp_path / "durable"), str(tmp_path / "local")
    assert cli.main(["show", durable, "--local", tier, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "local" / "3")
    assert cli.main(["show", durable, "2", "--local", tier, "--json"]) == 0  # on both tiers: the local copy
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "local" / "2")
    fsutil.flip(tmp_path / "local" / "2" / "arrays" / "0" / "c" / "0" / "0", 9)
    assert cli.main(["verify", durable, "--local", tier, "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert [(s["path"], s["ok"]) for s in printed["steps"]] == [
        (str(tmp_path / "durable" / "0"), True), (str(tmp_path / "durable" / "2"), True),
        (str(tmp_path / "local" / "2"), False), (str(tmp_path / "local" / "3"), True)]
    assert cli.main(["verify", durable, "2", "--local", tier]) == 1
    assert re.search(r"^step 2 +.*durable/2: ok.*\n^step 2 +.*local/2: DAMAGED", capsys.readouterr().out, re.M)
    assert cli.main(["verify", durable, "--local", str(tmp_path / "ssd")]) == 0  # a new machine: the durable tier
    assert cli.main(["verify", f"{durable}/2", "--local", tier]) == 2  # one checkpoint, not a root
    assert "drop --local" in capsys.readouterr().err


class Primary(ckpt.distributed.SingleProcess):
    """The primary of two processes whose other one is always there at once; records how long it waits."""

    count, waits = 2, []

    def barrier(self, name, timeout_secs):
        self.waits.append((name.rsplit("/", 1)[-1], timeout_secs))

    def compare(self, name, key, value, timeout_secs):
        self.barrier(name, timeout_secs)
        return {}


def test_a_promotion_waits_for_the_other_processes_as_long_as_the_active_context_says(tmp_path):
    """(A promotion's barriers took the timeout of the Checkpointer's constructor, 1200 s by default, not the
    one of the ``with ckpt.Context(...)`` block the saves ran in: a process killed in a promotion left the
    others waiting 20 minutes, where the job asked for 5 seconds.)"""
    options = ckpt.MultiprocessingOptions(processes=Primary())
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=5), multiprocessing_options=options):
        with tiers_worker.checkpointer(str(tmp_path / "durable"), str(tmp_path / "local"), durable_every=1) as ckptr:
            ckptr.save_async(1, {"w": np.ones(3)})
            ckptr.wait()
    promotion = [(name, secs) for name, secs in Primary.waits if name in ("prepared", "written", "committed")]
    assert promotion == [("prepared", 5), ("written", 5), ("committed", 5)], Primary.waits


def test_a_multi_process_job_resuming_from_the_durable_tier_saves_again_the_local_steps_a_stopped_job_left(
        tmp_path, caplog):
    """(Local steps newer than the durable latest, left by a job stopped before promoting them, stayed: each
    process decided alone that the steps it saved again were below its own latest (False on one rank, True on
    another), and a promotion copied the old run's local copy into the new run's durable step, with the other
    processes' new files: a durable step of two runs, which failed its checksums.)"""
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    with ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=Primary())):
        with tiers_worker.checkpointer(durable, local, durable_every=3) as ckptr:
            for step in range(8):
                ckptr.save(step, {"w": np.full(3, step)})
        shutil.rmtree(tmp_path / "durable" / "6")  # its promotion cut short: local steps 6 and 7 are newer than 3
        with tiers_worker.checkpointer(durable, local, durable_every=3) as ckptr, caplog.at_level(logging.WARNING, "ckpt"):
            assert ckptr.latest.step == 3  # (a multi-process job resumes from the durable tier)
            assert [ckptr.save(step, {"w": np.full(3, 100 + step)}) for step in range(4, 8)] == [True] * 4
            ckptr.wait()
            assert [c.step for c in ckptr.checkpoints] == [3, 6]
            assert ckptr.load(6)["w"].tolist() == [106] * 3
    assert "deleting step 7 of the local tier" in caplog.text


def test_ckpt_ls_show_and_verify_of_a_multi_process_local_directory_name_its_process_tiers(tmp_path, capsys):
    """(They read the local directory itself, which holds no step, and said nothing of LOCAL/process_<i>: step 3
    was listed on the durable tier alone, and verify's 'every copy' left the local copies unchecked.)"""
    durable, local = tmp_path / "durable", tmp_path / "local"
    with ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=Primary())):
        with tiers_worker.checkpointer(str(durable), str(local), durable_every=3) as ckptr:
            for step in range(5):
                ckptr.save(step, {"w": np.full(3, step)})
    (local / "process_1").mkdir()  # (the other process's, empty: its host was replaced)
    note = (f"ckpt: note: not read: the local tiers of a multi-process job's processes in {local} (process_0, "
            f"process_1), which such a job does not load from (it loads the durable tier's steps); name one to see or "
            f"check its copies: --local {local / 'process_0'}")
    for command in ("ls", "show", "verify"):
        assert cli.main([command, str(durable), "--local", str(local)]) == 0
        assert note in capsys.readouterr().err, command
    assert cli.main(["ls", str(durable), "--local", str(local / "process_0"), "--json"]) == 0
    assert [(s["step"], s["tiers"]) for s in json.loads(capsys.readouterr().out)["steps"]] == [
        (0, ["durable"]), (3, ["durable", "local"]), (4, ["local"])]


def test_on_s3_an_overwrites_promotion_that_kept_failing_while_later_steps_promoted_is_promoted_by_the_next_writer(
        bucket, tmp_path, monkeypatch, caplog):
    """Step 4 saved again (overwrite=True), its promotion refused at each try while step 10's was promoted: the run
    ended with step 4 on the local tier only, and the next writer promoted it no more (its local copy was older than
    the durable step 10): step 4 was lost from both tiers once the local policy dropped it."""
    def local() -> ckpt.LocalCheckpointOptions:
        return ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))

    copy_files = tiers._copy_files

    def refused(source, *args):
        if source.name == "4":
            raise PermissionError(errno.EACCES, "access denied")
        return copy_files(source, *args)

    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local()) as ckptr:
        overwrite_step_4_refused(ckptr, monkeypatch)
        monkeypatch.setattr(tiers, "_copy_files", refused)
        ckptr.save(10, {"w": np.full(2, 10)})  # (step 4's promotion queued again, refused again)
        with pytest.raises(PermissionError, match="access denied"):
            ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (4, ["local"]), (5, ["durable"]), (10, ["durable", "local"])]
    monkeypatch.setattr(tiers, "_copy_files", copy_files)
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local()) as ckptr:
        for step in (11, 12, 13):
            ckptr.save(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (4, ["durable"]), (5, ["durable"]), (10, ["durable"]), (12, ["local"]), (13, ["local"])]  # was: 4 nowhere
    assert ckpt.load(f"{bucket}/4")["w"][0] == 40
    assert ("step 4 is on the local tier only: its promotion (of a forced or preemption save, or one that replaced its "
            "durable copy)") in caplog.text
    assert not ckpt.objectstore.ObjectPath(f"{bucket}/4/{ckpt.format.PROMOTING}").exists()  # the local tier's alone


@pytest.mark.parametrize("leaf, durable", [(np.full(2, 41), 41), (object(), 40)], ids=["saved", "refused"])
def test_on_s3_a_step_whose_overwrites_promotion_failed_saved_again_by_the_next_writer_stays_durable(
        bucket, tmp_path, monkeypatch, leaf, durable):
    """Was: step 4's overwrite failed in its promotion once the durable copy was gone (its local step marked pending);
    the next writer's first save was step 4 again (overwrite=True), whose recovery skipped it as the step being saved,
    and the save promoted it only where the durable tier listed the step, which it no longer did: saved, step 4 stayed
    on the local tier alone (the mark gone with the copy it replaced); refused (a bad leaf), it was no longer kept for
    its promotion. Either way the local policy then dropped it, and step 4 was lost from both tiers."""
    def local() -> ckpt.LocalCheckpointOptions:
        return ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))

    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local()) as ckptr:
        overwrite_step_4_refused(ckptr, monkeypatch)
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local()) as ckptr:
        with pytest.raises(TypeError, match="builtins.object") if durable == 40 else contextlib.nullcontext():
            ckptr.save(4, {"w": leaf}, overwrite=True)
        for step in (6, 7, 8):
            ckptr.save(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (4, ["durable"]), (5, ["durable"]), (7, ["local"]), (8, ["local"])]  # was: 4 nowhere
    assert ckpt.load(f"{bucket}/4")["w"][0] == durable


def test_on_s3_a_step_whose_failed_overwrite_a_forced_save_promoted_stays_deleted_from_the_durable_tier(
        bucket, tmp_path, monkeypatch, caplog):
    """Step 4's overwrite refused by the store; the next run forced step 4, which promoted its local copy but left it
    marked pending; deleted from the durable root, step 4 was promoted again by the writer after ('its promotion ...
    never committed'), a step deleted coming back."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1),
                                        preservation_policy=pp.PreserveAll())
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        overwrite_step_4_refused(ckptr, monkeypatch)
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(4, {"w": np.full(2, 400)}, force=True)  # (promotes the local copy, 40)
    assert ckpt.load(f"{bucket}/4")["w"][0] == 40
    assert_step_4_deleted_from_the_durable_root_stays_deleted(bucket, local, caplog)


def assert_step_4_deleted_from_the_durable_root_stays_deleted(bucket: str, local: ckpt.LocalCheckpointOptions,
                                                             caplog, *, then: int = 6) -> None:
    """Deletes step 4 from the durable root alone, then saves step ``then`` with the local tier (which keeps every
    step, local only from step 6 on): step 4 is not promoted again."""
    with ckpt.Checkpointer(bucket) as durable:
        durable.delete(4)
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(then, {"w": np.full(2, then)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (4, ["local"]), (5, ["durable", "local"]), *[(step, ["local"]) for step in range(6, then + 1)]
        ]  # was: 4 durable again
    assert "never committed" not in caplog.text


KILLED_ONCE_THE_OVERWRITES_PROMOTION_COMMITTED = """
import os, signal, sys
import numpy as np
import ckpt
from ckpt import tiers
from ckpt.training import preservation_policies as pp, save_decision_policies as sdp
local = ckpt.LocalCheckpointOptions(sys.argv[2], save_decision_policy=sdp.FixedIntervalPolicy(1),
                                    preservation_policy=pp.PreserveAll())
with ckpt.Checkpointer(sys.argv[1], save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
    ckptr.save(4, {"w": np.full(2, 4)}, force=True)
    ckptr.save(5, {"w": np.full(2, 5)})
    ckptr.wait()
    tiers._promoted = lambda step_dir: os.kill(os.getpid(), signal.SIGKILL)  # committed, its mark not yet cleared
    ckptr.save(4, {"w": np.full(2, 40)}, overwrite=True)
"""


def test_on_s3_a_step_whose_overwrites_promotion_was_killed_once_committed_stays_deleted_from_the_durable_tier(
        bucket, tmp_path, caplog):
    """SIGKILL between the commit of step 4's overwrite's promotion and the clearing of its local copy's mark: the mark
    stayed for good, and once step 4 was deleted from the durable root, the next writer promoted it again."""
    killed = procs.run_script(KILLED_ONCE_THE_OVERWRITES_PROMOTION_COMMITTED, bucket, str(tmp_path / "local"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1),
                                        preservation_policy=pp.PreserveAll())
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(6, {"w": np.full(2, 6)})
    assert ckpt.load(f"{bucket}/4")["w"][0] == 40
    assert_step_4_deleted_from_the_durable_root_stays_deleted(bucket, local, caplog, then=7)


@pytest.mark.parametrize("writes", ["save", "delete"])
def test_on_s3_a_second_job_on_the_same_local_directory_is_refused_before_it_sweeps_the_durable_root(
        bucket, tmp_path, monkeypatch, writes):
    """The same job started twice on one machine (one local directory, one durable root on an object store, which has
    no lock): the second's first save (or deletion) swept the durable root, removing the promotion the first had in
    flight, and only then raised DirectoryLockedError for the local directory."""
    settle, written, go = distributed.settle, threading.Event(), threading.Event()

    def hang_once_step_2_is_copied(processes, name, part, timeout_secs, task):
        settle(processes, name, part, timeout_secs, task)
        if name.endswith("promote/2/written"):  # (before its manifest)
            written.set()
            go.wait(60)

    monkeypatch.setattr(distributed, "settle", hang_once_step_2_is_copied)

    def local() -> ckpt.LocalCheckpointOptions:
        return ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))

    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(2), local=local()) as first:
        first.save(0, {"w": np.full(2, 0)})
        first.save_async(2, {"w": np.full(2, 2)})
        assert written.wait(60)
        in_flight = ckpt.objectstore.ObjectPath(f"{bucket}/2").keys()
        with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(2), local=local()) as second:
            with pytest.raises(errors.DirectoryLockedError, match="local"):
                second.save(4, {"w": np.full(2, 4)}) if writes == "save" else second.delete(0)
        assert ckpt.objectstore.ObjectPath(f"{bucket}/2").keys() == in_flight  # was: [] (swept)
        go.set()
        first.wait()
    assert ckpt.load(f"{bucket}/2")["w"][0] == 2


def test_on_s3_a_step_saved_again_after_its_overwrites_promotion_was_killed_is_promoted_again(bucket, tmp_path):
    """SIGKILL once the overwrite's promotion removed the durable copy, then the same save again (the command run
    again): the save took step 4 for the local tier's alone (no durable copy listed), did not promote it and replaced
    its mark, and step 4 was lost from both tiers once the local policy dropped it (load: CheckpointNotFoundError)."""
    killed = procs.run_script(KILLED_ONCE_THE_DURABLE_COPY_IS_REMOVED, bucket, str(tmp_path / "local"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(4, {"w": np.full(2, 41)}, overwrite=True)
        assert_saves_6_to_8_promote_step_4(ckptr)
    assert ckpt.load(f"{bucket}/4")["w"][0] == 41


def test_on_s3_a_refused_save_of_a_step_whose_overwrites_promotion_was_killed_leaves_it_promoted_by_a_later_save(
        bucket, tmp_path):
    """SIGKILL once the overwrite's promotion removed the durable copy; the next writer's first save, of step 4 again,
    refused (a leaf ckpt cannot store: nothing written): the writer had left step 4 to that save, which never replaced
    it, and promoted it no more; step 4 was lost from both tiers once the local policy dropped it."""
    killed = procs.run_script(KILLED_ONCE_THE_DURABLE_COPY_IS_REMOVED, bucket, str(tmp_path / "local"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        with pytest.raises(TypeError, match=r"leaf at \['w'\] has type builtins.object"):
            ckptr.save(4, {"w": object()}, overwrite=True)
        assert_saves_6_to_8_promote_step_4(ckptr)
    assert ckpt.load(f"{bucket}/4")["w"][0] == 40


KILLED_ONCE_IT_SWEPT_THE_ROOT = """
import os, signal, sys
import numpy as np
import ckpt
from ckpt import tiers
from ckpt.training import save_decision_policies as sdp
tiers.LocalTier._promote_again = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # (once it swept)
local = ckpt.LocalCheckpointOptions(sys.argv[2], save_decision_policy=sdp.FixedIntervalPolicy(1))
with ckpt.Checkpointer(sys.argv[1], save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
    ckptr.save(8, {"w": np.full(2, 8)})
"""


def test_on_s3_a_forced_step_whose_promotion_two_crashes_cut_short_is_promoted_by_the_third_writer(bucket, tmp_path):
    """Step 7, forced, its promotion cut short (begun at its name, never committed); the next writer, which swept what
    was begun there as the durable root's writer, SIGKILLed before it promoted step 7 again: the third writer saw
    nothing begun at step 7 and never promoted it; step 7 was lost from both tiers once the local policy dropped it."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        ckptr.save(5, {"w": np.full(2, 5)})
        ckptr.save(7, {"w": np.full(2, 7)}, force=True)
    ckpt.objectstore.ObjectPath(f"{bucket}/7/manifest.json").unlink()  # (its promotion cut short before its commit)
    killed = procs.run_script(KILLED_ONCE_IT_SWEPT_THE_ROOT, bucket, str(tmp_path / "local"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    with ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        for step in (8, 9, 10):
            ckptr.save(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (5, ["durable"]), (7, ["durable"]), (9, ["local"]), (10, ["durable", "local"])]  # was: 7 nowhere
    assert ckpt.load(f"{bucket}/7")["w"][0] == 7


@pytest.mark.parametrize("second", ["opened with cleanup_tmp_directories", "deleting a step"])
def test_on_s3_a_forced_step_whose_promotion_was_cut_short_is_promoted_after_a_writer_that_saved_nothing(
        bucket, tmp_path, second):
    """Step 7, forced, its promotion cut short (begun at its name, never committed); the next writer took the durable
    root (opened with cleanup_tmp_directories=True, or deleting step 3) and closed without a save: its sweep removed
    what was begun at step 7's name, which alone showed it, and the writer after it never promoted step 7, lost from
    both tiers once the local policy dropped it."""
    def tiered(cleanup: bool = False) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(bucket, save_decision_policy=sdp.FixedIntervalPolicy(5), cleanup_tmp_directories=cleanup,
                                 local=ckpt.LocalCheckpointOptions(tmp_path / "local",
                                                                   save_decision_policy=sdp.FixedIntervalPolicy(1)))

    with tiered() as ckptr:
        for step in (3, 5):
            ckptr.save(step, {"w": np.full(2, step)}, force=True)
        ckptr.save(7, {"w": np.full(2, 7)}, force=True)
    ckpt.objectstore.ObjectPath(f"{bucket}/7/manifest.json").unlink()  # (its promotion cut short before its commit)
    with tiered(cleanup=second == "opened with cleanup_tmp_directories") as ckptr:
        if second == "deleting a step":
            ckptr.delete(3)
    assert not ckpt.objectstore.ObjectPath(f"{bucket}/7").exists()  # swept
    with tiered() as ckptr:
        for step in (8, 9, 10):
            ckptr.save(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert [c.step for c in ckptr.checkpoints if "durable" in c.locations][-2:] == [7, 10]  # was: [5, 10]
    assert ckpt.load(f"{bucket}/7")["w"][0] == 7


KILLED_BEFORE_A_FORCED_STEPS_PROMOTION_IS_QUEUED = """
import os, signal, sys
import numpy as np
import ckpt
from ckpt import tiers
from ckpt.training import save_decision_policies as sdp
local = ckpt.LocalCheckpointOptions(sys.argv[2], save_decision_policy=sdp.FixedIntervalPolicy(1))
with ckpt.Checkpointer(sys.argv[1], save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
    ckptr.save(5, {"w": np.full(2, 5)})
    if sys.argv[3] == "held":
        ckptr.save(12, {"w": np.full(2, 12)})  # (on the local tier only: the durable policy skips it)
    ckptr.wait()
    tiers.LocalTier._submit = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    ckptr.save(12, {"w": np.full(2, 12)}, force=True)
"""


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("local_copy", ["saved", "held"])
def test_a_forced_step_killed_once_committed_locally_before_its_promotion_was_queued_is_promoted_by_the_next_writer(
        tmp_path, request, local_copy, store):
    """Step 12 saved with force=True (or, held locally already, forced), committed locally and SIGKILLed before its
    promotion was queued, as when it waits behind another upload: its local copy was marked pending only once its
    promotion ran, so the next writer, whose policy skips step 12, never promoted it, and it was lost from both tiers
    once the local policy dropped it. The mark is committed with the local step (or written before the save returns)."""
    durable = str(tmp_path / "durable") if store == "local" else request.getfixturevalue("bucket")
    local_dir = tmp_path / "local"
    killed = procs.run_script(KILLED_BEFORE_A_FORCED_STEPS_PROMOTION_IS_QUEUED, durable, str(local_dir), local_copy)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    local = ckpt.LocalCheckpointOptions(local_dir, save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(durable, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        for step in (13, 14, 16):
            ckptr.save(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (5, ["durable"]), (12, ["durable"]), (14, ["local"]), (16, ["local"])]  # was: 12 nowhere
    assert not (local_dir / "12").exists() and ckpt.load(f"{durable}/12")["w"][0] == 12


KILLED_AS_A_FORCED_STEPS_COPY_BEGINS = """
import os, signal, sys
import numpy as np
import ckpt
from ckpt import tiers
from ckpt.training import save_decision_policies as sdp
local = ckpt.LocalCheckpointOptions(sys.argv[2], save_decision_policy=sdp.FixedIntervalPolicy(1))
with ckpt.Checkpointer(sys.argv[1], save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
    ckptr.save(5, {"w": np.full(2, 5)})
    ckptr.save(7, {"w": np.full(2, 7)})
    ckptr.wait()
    tiers._copy_step = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    ckptr.save(3, {"w": np.full(2, 3)}, force=True)
"""


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_forced_step_below_the_durable_latest_whose_promotion_was_killed_is_promoted_by_the_next_writer(
        tmp_path, request, store):
    """Step 3 saved with force=True below the durable latest (5), committed locally, its promotion SIGKILLed before it
    wrote anything (so too, on a local durable root, anywhere before its rename): the next writer saw nothing begun at
    step 3's name, and step 3 is no step newer than the durable latest; it was never promoted, and was lost from both
    tiers once the local policy dropped it."""
    durable = str(tmp_path / "durable") if store == "local" else request.getfixturevalue("bucket")
    killed = procs.run_script(KILLED_AS_A_FORCED_STEPS_COPY_BEGINS, durable, str(tmp_path / "local"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Checkpointer(durable, save_decision_policy=sdp.FixedIntervalPolicy(5), local=local) as ckptr:
        for step in (8, 9, 10):
            ckptr.save(step, {"w": np.full(2, step)})
        ckptr.wait()
        assert [(c.step, sorted(c.locations)) for c in ckptr.checkpoints] == [
            (3, ["durable"]), (5, ["durable"]), (9, ["local"]), (10, ["durable", "local"])]  # was: 3 nowhere
    assert ckpt.load(f"{durable}/3")["w"][0] == 3
