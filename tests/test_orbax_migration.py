"""What an Orbax user meets on switching: the names, errors and clocks of Orbax's free functions and options.

Orbax's tests of these (save_load_test.py, metadata/loading_test.py, preservation_policy_test.py) are
not shipped in its wheel; these are our own tests of the same behaviours (README, "Migrating from Orbax").
"""
from __future__ import annotations

import datetime
import threading

import numpy as np
import pytest

import ckpt
from ckpt import errors, root
from ckpt.training import preservation_policies as pp
from tests.test_custom_checkpointables import AbstractVocab, Counter, Vocab, VocabHandler


@pytest.mark.parametrize("alias, new, call", [
    ("save_pytree", "save", lambda p: ckpt.save_pytree(p / "new", {"a": 1})),
    ("save_pytree_async", "save_async", lambda p: ckpt.save_pytree_async(p / "new", {"a": 1}).result(timeout=60)),
    ("load_pytree", "load", lambda p: ckpt.load_pytree(p / "old")),
    ("load_pytree_async", "load_async", lambda p: ckpt.load_pytree_async(p / "old").result(timeout=60)),
    ("pytree_metadata", "metadata", lambda p: ckpt.pytree_metadata(p / "old").metadata),
])
def test_the_free_functions_deprecated_aliases_warn_in_orbaxs_words_and_do_what_the_new_name_does(
        tmp_path, alias, new, call):
    ckpt.save(tmp_path / "old", {"a": 0})
    with pytest.warns(DeprecationWarning, match=f"^Use `{new}` instead.$") as record:
        result = call(tmp_path)
    assert record[0].filename == __file__  # the warning points at the caller
    expected = {"save_pytree": None, "save_pytree_async": None, "load_pytree": {"a": 0},
                "load_pytree_async": {"a": 0}, "pytree_metadata": {"a": ckpt.LeafMetadata("int", None, None)}}
    assert result == expected[alias]
    if alias.startswith("save"):
        assert ckpt.load(tmp_path / "new") == {"a": 1}


@pytest.mark.parametrize("call", [ckpt.load, ckpt.load_checkpointables, ckpt.metadata, ckpt.checkpointables_metadata])
def test_a_missing_checkpoint_path_is_an_invalid_layout_as_in_orbax_and_a_file_not_found(tmp_path, call):
    with pytest.raises(errors.CheckpointNotFoundError, match="typo.*does not exist") as info:
        call(tmp_path / "typo")
    assert isinstance(info.value, errors.InvalidLayoutError) and isinstance(info.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []


def test_requested_checkpointables_a_step_lacks_are_named_beside_every_one_it_has(tmp_path):
    ckpt.save_checkpointables(tmp_path / "c", {"params": {"w": np.ones(2)}, "counter": Counter(3)})
    with pytest.raises(errors.CheckpointableNotFoundError,
                       match=r"Requested checkpointables: \['opt', 'data'\] .*\['counter', 'params'\]") as info:
        ckpt.load_checkpointables(tmp_path / "c", {"params": None, "opt": None, "data": None})
    assert isinstance(info.value, KeyError)
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save_checkpointables(0, {"params": {"w": np.ones(2)}, "counter": Counter(3)})
        with pytest.raises(KeyError, match=r"Requested checkpointables: \['opt'\] .*\['counter', 'params'\]"):
            ckptr.load_checkpointables(0, {"opt": None})


def test_load_without_a_name_falls_back_to_the_only_tree_beside_checkpointables_saved_by_handlers(tmp_path):
    ckpt.save_checkpointables(tmp_path / "c", {"params": {"w": np.arange(2)}, "counter": Counter(3)})
    assert ckpt.load(tmp_path / "c")["w"].tolist() == [0, 1]
    assert ckpt.metadata(tmp_path / "c").metadata["w"].shape == (2,)
    ckpt.save_checkpointables(tmp_path / "two", {"params": {"w": np.arange(2)}, "opt": {"m": np.zeros(2)}})
    with pytest.raises(KeyError, match=r"\['state'\].*\['opt', 'params'\]"):  # two trees: which one is not guessed
        ckpt.load(tmp_path / "two")


@pytest.mark.parametrize("leaf", [complex(1, 2), 2j, Vocab(["a"])])
def test_an_unsupported_leaf_is_an_unregistered_type_error_both_type_and_value_error_before_anything_is_written(
        tmp_path, leaf):
    for catch in (TypeError, ValueError):  # Orbax raises a ValueError; ckpt's TypeError is kept
        with pytest.raises(catch, match=r"checkpointable 'state': leaf at \['k'\] has type") as info:
            ckpt.save(tmp_path / "c", {"k": leaf})
        assert isinstance(info.value, errors.UnregisteredTypeError)
    assert list(tmp_path.iterdir()) == []


def test_a_mismatched_abstract_tree_is_reported_with_orbaxs_phrase_and_every_difference(tmp_path):
    ckpt.save(tmp_path / "c", {"a": np.ones(2), "b": np.ones(3)})
    with pytest.raises(errors.TreeMismatchError, match="^User-provided restore item and on-disk value differ") as info:
        ckpt.load(tmp_path / "c", {"a": np.ones(2), "z": np.ones(3)})
    assert len(info.value.differences) == 2


class _FixedNaiveClock(datetime.datetime):
    """A clock set to a naive (local) time, as Orbax's tests set ``datetime.datetime``."""

    @classmethod
    def now(cls, tz=None):
        return datetime.datetime(2026, 5, 29, 12, 0, 0)


@pytest.mark.parametrize("hours, kept", [(24, [2, 3]), (28, [1, 2, 3]), (5, []), (100, [0, 1, 2, 3])])
def test_latest_duration_reads_the_clock_orbaxs_tests_set_even_a_naive_one(monkeypatch, hours, kept):
    now = _FixedNaiveClock.now()
    checkpoints = [ckpt.CheckpointMetadata(step, None, commit_timestamp_nsecs=round(
        (now - datetime.timedelta(hours=ago)).timestamp() * 1e6) * 1000) for step, ago in enumerate([30, 25, 23, 10])]
    monkeypatch.setattr(datetime, "datetime", _FixedNaiveClock)
    flags = pp.LatestDuration(datetime.timedelta(hours=hours)).should_preserve(
        checkpoints, context=pp.PreservationContext())
    assert [c.step for c, keep in zip(checkpoints, flags) if keep] == kept


def test_checkpointables_options_create_with_handlers_adds_them_to_the_global_ones(tmp_path):
    options = ckpt.CheckpointablesOptions.create_with_handlers(VocabHandler)
    assert (VocabHandler, None) in options.registry.get_all_entries()
    with ckpt.Context(checkpointables_options=options):
        ckpt.save_checkpointables(tmp_path / "c", {"vocab": Vocab(["a", "b"])})
        assert ckpt.load_checkpointables(tmp_path / "c", {"vocab": AbstractVocab()})["vocab"] == Vocab(["a", "b"])
    assert VocabHandler not in [h for h, _ in ckpt.handlers.global_registry().get_all_entries()]


def test_checkpoint_metadata_from_metadata_is_an_abstract_tree_to_load_into(tmp_path):
    ckpt.save(tmp_path / "c", {"w": np.arange(3), "n": 2})
    abstract = ckpt.CheckpointMetadata.from_metadata({"w": np.zeros(3, np.int16), "n": 0})
    assert abstract.metadata["w"].dtype == np.int16 and abstract.step is None and abstract.path is None
    loaded = ckpt.load(tmp_path / "c", abstract)
    assert loaded["w"].dtype == np.int16 and loaded["w"].tolist() == [0, 1, 2] and loaded["n"] == 2


def test_checkpointer_delete_and_delete_async_delete_a_step_whatever_the_policy_as_orbaxs_do(tmp_path):
    keep_all = pp.PreserveAll()
    with ckpt.training.Checkpointer(tmp_path, preservation_policy=keep_all) as ckptr:
        for step in range(3):
            ckptr.save(step, {"w": np.full(3, step)})
        ckptr.save_async(3, {"w": np.full(3, 3)})
        assert ckptr.delete(3)                      # the latest, still being written: waited for, then deleted
        assert [c.step for c in ckptr.checkpoints] == [0, 1, 2] and not (tmp_path / "3").exists()
        response = ckptr.delete_async(ckptr.checkpoints[0])
        assert [c.step for c in ckptr.checkpoints] == [1, 2]    # at once, as in Orbax
        assert response.result(timeout=60) and not (tmp_path / "0").exists()
        assert ckptr.delete(0, missing_ok=True) is False
        with pytest.raises(errors.StepNotFoundError, match=r"no checkpoint at step 0 .*\(steps: \[1, 2\]\)"):
            ckptr.delete(0)
        with pytest.raises(ValueError, match="whole checkpoints only"):
            ckptr.delete(1, checkpointable_name="state")
        assert ckptr.save(4, {"w": np.full(3, 4)}) and ckptr.load(2)["w"].tolist() == [2, 2, 2]
    with pytest.raises(RuntimeError, match="is closed"):
        ckptr.delete(1)
    with ckpt.training.Checkpointer(tmp_path) as reopened:
        assert [c.step for c in reopened.checkpoints] == [1, 2, 4]


def test_a_delete_refused_because_another_writer_holds_the_root_keeps_the_step_listed(tmp_path):
    with ckpt.training.Checkpointer(tmp_path) as writer:
        writer.save(1, {"w": np.ones(3)})
        reader = ckpt.training.Checkpointer(tmp_path)
        with pytest.raises(errors.DirectoryLockedError, match="being written by another Checkpointer"):
            reader.delete(1)
        assert [c.step for c in reader.checkpoints] == [1] and reader.load(1)["w"].tolist() == [1, 1, 1]
        reader.close()


def test_a_step_delete_async_is_deleting_counts_for_no_save_decision_meanwhile(tmp_path, monkeypatch):
    release, delete_step = threading.Event(), root.delete_step
    monkeypatch.setattr(root, "delete_step", lambda path, step: release.wait(10) and delete_step(path, step))
    every_5 = ckpt.training.save_decision_policies.FixedIntervalPolicy(5)
    with ckpt.training.Checkpointer(tmp_path, save_decision_policy=every_5) as ckptr:
        ckptr.save(0, {"w": np.zeros(3)})
        assert ckptr.save_async(5, {"w": np.ones(3)}).result(timeout=60)
        response = ckptr.delete_async(5)
        assert ckptr.should_save(5)                 # step 5 is gone: the policy decides, as Orbax's does
        release.set()
        assert response.result(timeout=60) and ckptr.save(5, {"w": np.full(3, 2.0)})
        assert ckptr.load(5)["w"].tolist() == [2, 2, 2]


def test_a_deletion_in_the_background_is_no_save_in_progress_for_the_policy_nor_the_caller(tmp_path, monkeypatch):
    """is_saving_in_progress() said True while delete_async deleted, so the default ContinuousCheckpointingPolicy
    skipped every step meanwhile (save returned False), where Orbax's counts saves only."""
    release, delete_step = threading.Event(), root.delete_step
    monkeypatch.setattr(root, "delete_step", lambda path, step: release.wait(10) and delete_step(path, step))
    with ckpt.training.Checkpointer(tmp_path) as ckptr:   # the default policy: continuous
        ckptr.save(0, {"w": np.zeros(3)})
        response = ckptr.delete_async(0)
        assert not ckptr.is_saving_in_progress() and ckptr.should_save(1)
        release.set()
        assert ckptr.save(1, {"w": np.ones(3)}) and response.result(timeout=60)
        assert [c.step for c in ckptr.checkpoints] == [1]


def test_a_reload_while_delete_async_deletes_a_step_does_not_list_it_again(tmp_path, monkeypatch):
    release, delete_step = threading.Event(), root.delete_step
    monkeypatch.setattr(root, "delete_step", lambda path, step: release.wait(10) and delete_step(path, step))
    with ckpt.training.Checkpointer(tmp_path) as ckptr:
        for step in (0, 5):
            ckptr.save(step, {"w": np.full(3, step)}, force=True)
        response = ckptr.delete_async(5)
        ckptr.reload()                                # the step is still on disk, being deleted
        assert [c.step for c in ckptr.checkpoints] == [0] and ckptr.latest.step == 0
        release.set()
        assert response.result(timeout=60)
        ckptr.reload()
        assert [c.step for c in ckptr.checkpoints] == [0]


def test_an_overwrite_the_policy_skips_keeps_the_step_and_steps_are_compared_with_the_latest_not_the_last_saved(
        tmp_path):
    every_2 = ckpt.training.save_decision_policies.FixedIntervalPolicy(2)
    with ckpt.training.Checkpointer(tmp_path, save_decision_policy=every_2) as ckptr:
        for step in (10, 20):
            ckptr.save(step, {"w": np.full(3, step)})
        assert ckptr.save(5, {"w": np.full(3, 5)}, force=True)
        assert not ckptr.should_save(6) and not ckptr.should_save(20)   # Orbax: yes, above 5, the step saved last
        assert not ckptr.save(5, {"w": np.zeros(3)}, overwrite=True)    # skipped by the policy: Orbax deletes step 5
        assert ckptr.load(5)["w"].tolist() == [5, 5, 5]
        assert ckptr.save(10, {"w": np.zeros(3)}, overwrite=True)       # below the latest: the policy decides
        assert ckptr.load(10)["w"].tolist() == [0, 0, 0] and [c.step for c in ckptr.checkpoints] == [5, 10, 20]
