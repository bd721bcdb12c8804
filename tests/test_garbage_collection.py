"""Garbage collection after each commit, driven by the preservation policy."""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess

import numpy as np
import pytest

from ckpt import format as fmt
from ckpt.path import step as step_lib
from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp
from tests import fsutil

ALWAYS = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1)])


def steps_on_disk(root) -> list[int]:
    return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def loss_of(step: int) -> float:
    return float((step * 37) % 50)  # a scrambled but deterministic metric


def test_latest_n_plus_best_n_keeps_exactly_the_expected_steps_after_50_saves(tmp_path):
    policy = pp.AnyPreservationPolicy([pp.LatestN(3), pp.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=2)])
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=policy) as ckptr:
        for step in range(50):
            ckptr.save(step, {"w": np.full(4, step, np.float32)}, metrics={"loss": loss_of(step)})
        listed = [c.step for c in ckptr.checkpoints]
    best_two = sorted(range(50), key=loss_of)[:2]
    expected = sorted(set(best_two) | {47, 48, 49})
    assert listed == expected
    assert steps_on_disk(tmp_path) == expected
    with Checkpointer(tmp_path) as again:
        assert [c.step for c in again.checkpoints] == expected
        assert [c.metrics["loss"] for c in again.checkpoints] == [loss_of(s) for s in expected]


def test_best_n_alone_never_deletes_the_latest_step(tmp_path):
    policy = pp.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1)
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=policy) as ckptr:
        for step, loss in enumerate([0.1, 0.5, 0.9]):
            ckptr.save(step, {"w": np.zeros(2)}, metrics={"loss": loss})
            assert ckptr.latest.step == step
        assert [c.step for c in ckptr.checkpoints] == [0, 2]
        assert ckptr.load()["w"].shape == (2,)


@pytest.mark.parametrize("policy", [pp.LatestN(0), pp.CustomSteps([]), pp.LatestDuration(datetime.timedelta(0))],
                         ids=["LatestN(0)", "CustomSteps([])", "LatestDuration(0)"])
def test_a_policy_that_keeps_no_step_leaves_the_latest(tmp_path, policy):
    """Orbax 0.12.8 deletes every step with these (its checkpoints end empty); README, What differs."""
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=policy) as ckptr:
        for step in range(3):
            ckptr.save(step, {"w": np.full(2, float(step))})
        assert [c.step for c in ckptr.checkpoints] == [2] and steps_on_disk(tmp_path) == [2]
        assert ckptr.load()["w"].tolist() == [2.0, 2.0]


def test_policy_sees_steps_found_on_disk_from_an_earlier_run(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as first:
        for step in range(4):
            first.save(step, {"x": step})
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(2)) as second:
        second.save(4, {"x": 4})
        assert [c.step for c in second.checkpoints] == [3, 4]
    assert steps_on_disk(tmp_path) == [3, 4]


def test_a_step_saved_below_the_latest_with_force_counts_as_saved_last_as_in_orbax(tmp_path):
    """Orbax's policy sees the steps in save order: LatestN(2) after 10, 20, then 5 keeps 20 and 5."""
    with Checkpointer(tmp_path, preservation_policy=pp.LatestN(2)) as ckptr:
        ckptr.save(10, {"w": np.full(2, 10.0)})
        ckptr.save(20, {"w": np.full(2, 20.0)}, force=True)
        assert ckptr.save(5, {"w": np.full(2, 5.0)}, force=True)  # e.g. an earlier step evaluated again
        assert [c.step for c in ckptr.checkpoints] == [5, 20] and steps_on_disk(tmp_path) == [5, 20]
        assert ckptr.load(5)["w"][0] == 5.0 and ckptr.latest.step == 20
        ckptr.save(30, {"w": np.full(2, 30.0)})
        assert steps_on_disk(tmp_path) == [5, 30]  # 20 was saved before 5
    with Checkpointer(tmp_path, preservation_policy=pp.LatestN(2)) as again:  # found on disk: by step
        again.save(40, {"w": np.full(2, 40.0)})
        assert steps_on_disk(tmp_path) == [30, 40]


def test_a_save_never_deletes_the_step_it_wrote_the_next_one_may(tmp_path):
    with Checkpointer(tmp_path, preservation_policy=pp.EveryNSteps(10)) as ckptr:
        ckptr.save(0, {"w": np.zeros(2)})
        ckptr.save(20, {"w": np.zeros(2)}, force=True)
        assert ckptr.save(5, {"w": np.ones(2)}, force=True)  # EveryNSteps(10) does not keep 5
        assert steps_on_disk(tmp_path) == [0, 5, 20] and ckptr.load(5)["w"][0] == 1
        ckptr.save(30, {"w": np.zeros(2)}, force=True)
        assert steps_on_disk(tmp_path) == [0, 20, 30]


def test_a_step_being_read_is_not_deleted(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1)) as ckptr:
        ckptr.save(0, {"x": np.arange(3)})
        ckptr._reading[0] += 1  # a load of step 0 is under way (e.g. in load_async)
        ckptr.save(1, {"x": np.arange(3)})
        assert steps_on_disk(tmp_path) == [0, 1]
        ckptr._reading[0] -= 1
        ckptr.save(2, {"x": np.arange(3)})
        assert steps_on_disk(tmp_path) == [2]


def test_a_half_deleted_step_is_never_listed_and_is_cleaned_up(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, {"x": np.arange(3)})
        ckptr.save(1, {"x": np.arange(3)})
    # What a crash in the middle of deleting step 0 leaves: the renamed directory, partly removed.
    os.rename(tmp_path / "0", tmp_path / "0.ckpt-deleting")
    os.remove(tmp_path / "0.ckpt-deleting" / "manifest.json")
    with Checkpointer(tmp_path) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [1]
    with Checkpointer(tmp_path, cleanup_tmp_directories=True):
        pass
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "1"]


def test_a_deletion_error_is_reported_after_the_commit(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1)) as ckptr:
        ckptr.save(0, {"x": np.arange(3)})
        undo = fsutil.undeletable(tmp_path / "0")
        try:
            with pytest.raises(OSError, match=r"committed, but garbage collection could not delete: step 0"):
                ckptr.save(1, {"x": np.arange(3)})
        finally:
            undo()
        assert [c.step for c in ckptr.checkpoints] == [0, 1]
        assert ckptr.latest.step == 1


def test_a_step_removed_by_hand_after_it_was_listed_is_forgotten_and_saves_go_on(tmp_path):
    # garbage collection failed on it at every later save ("could not delete: step 0 ... No such file")
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1)) as ckptr:
        ckptr.save(0, {"x": np.arange(3)})
        shutil.rmtree(tmp_path / "0")  # by hand, after the listing
        ckptr.save(1, {"x": np.arange(3)})
        ckptr.save(2, {"x": np.arange(3)})
        assert [c.step for c in ckptr.checkpoints] == [2]


def test_a_step_whose_files_cannot_all_be_removed_once_renamed_aside_is_deleted_and_never_listed(tmp_path, caplog):
    """Its deletion failed after the rename (an NFS server's .nfs files while another client reads it): delete()
    raised, and the Checkpointer listed the step again, which was gone (its load: StepNotFoundError); garbage
    collection failed the save so."""
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(2)) as ckptr:
        for step in (1, 2):
            ckptr.save(step, {"x": np.arange(3)})
        for step in (1, 2):
            fsutil.undeletable(tmp_path / str(step) / fmt.PACKED)
        try:
            assert ckptr.delete(2) and [c.step for c in ckptr.checkpoints] == [1]
            assert ckptr.save(3, {"x": np.arange(3)}) and ckptr.save(4, {"x": np.arange(3)})  # deletes step 1
            assert [c.step for c in ckptr.checkpoints] == [3, 4]
        finally:
            subprocess.run(["chattr", "-R", "-i", str(tmp_path)], check=True)  # (the steps were renamed aside)
    assert caplog.text.count("the step was deleted, but what is left of it") == 2
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        assert ckptr.save(5, {"x": np.arange(3)})  # the root's next writer removes what was left
    assert sorted(os.listdir(tmp_path)) == [fmt.LOCK, "3", "4", "5"]


def test_a_step_saved_again_after_a_deletion_left_part_of_it_is_deleted_again(tmp_path):
    """The second deletion removed what the first left at 2.ckpt-deleting before its rename, and failed there:
    delete() raised PermissionError naming 'zarr.json' alone, the step stayed listed, and so at every try."""
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        for step in (1, 2, 3):
            ckptr.save(step, {"x": np.arange(3) + step})
        fsutil.undeletable(tmp_path / "2" / fmt.PACKED)
        try:
            assert ckptr.delete(2)
            assert ckptr.save(2, {"x": np.arange(3) + 20}, force=True)
            assert ckptr.delete(2) and [c.step for c in ckptr.checkpoints] == [1, 3]
        finally:
            subprocess.run(["chattr", "-R", "-i", str(tmp_path)], check=True)  # (renamed aside)
    with Checkpointer(tmp_path) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [1, 3]
        assert ckptr.save(4, {"x": np.arange(3)})  # the root's next writer removes what both deletions left
    assert sorted(os.listdir(tmp_path)) == [fmt.LOCK, "1", "3", "4"]


def test_a_step_whose_name_is_too_long_for_its_deletion_name_is_still_deleted(tmp_path):
    """Was: a name of 242 to 246 bytes was saved (its temporary's fits in 255 bytes), but '<name>.ckpt-deleting'
    did not fit: every deletion failed with 'File name too long', so garbage collection failed every save."""
    names = step_lib.standard_name_format(step_prefix="é" * 120)  # (242 bytes: 'é' is two)
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1),
                      step_name_format=names) as ckptr:
        for step in (0, 1, 2):
            ckptr.save(step, {"x": np.arange(3) + step})
        assert [c.step for c in ckptr.checkpoints] == [2] and ckptr.delete(2) and not ckptr.checkpoints
    assert os.listdir(tmp_path) == [fmt.LOCK]


def test_a_deletion_name_cut_from_a_long_step_name_is_cut_between_characters(tmp_path):
    """Was: '<start of name>.<random>.ckpt-deleting' kept the name's first bytes, cutting a two-byte 'é' in half:
    what a deletion whose removal failed left in the root had a name that is no UTF-8 ('\\udcc3' in ckpt ls)."""
    names = step_lib.standard_name_format(step_prefix="a" + "é" * 121)  # (244 bytes with the step)
    with Checkpointer(tmp_path, step_name_format=names) as ckptr:
        ckptr.save(0, {"x": np.arange(3)}, force=True)
        fsutil.undeletable(ckptr.checkpoints[0].path / fmt.PACKED)
        try:
            assert ckptr.delete(0) and not ckptr.checkpoints
            [left] = [name for name in os.listdir(os.fsencode(tmp_path)) if name != os.fsencode(fmt.LOCK)]
            assert left.decode("utf-8").startswith("a" + "é" * 115) and left.endswith(b".ckpt-deleting")
        finally:
            subprocess.run(["chattr", "-R", "-i", str(tmp_path)], check=True)  # (renamed aside)
    with Checkpointer(tmp_path, step_name_format=names) as ckptr:
        assert ckptr.save(1, {"x": np.arange(3)}, force=True)  # the root's next writer removes what was left
    assert sorted(os.listdir(tmp_path)) == [fmt.LOCK, names.build_name(1)]
