"""What an Orbax user meets on switching: the names, errors and clocks of Orbax's free functions and options.

Orbax's tests of these (save_load_test.py, metadata/loading_test.py, preservation_policy_test.py) are
not shipped in its wheel; these are our own tests of the same behaviours (README, "Migrating from Orbax").
"""
from __future__ import annotations

import datetime
import inspect
import os
import threading
import typing

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


@pytest.mark.parametrize("what", ["a run's root", "a user's directory", "a file", "a link to a checkpoint"])
def test_a_free_delete_of_what_is_no_checkpoint_is_an_invalid_layout_as_in_orbax_and_deletes_nothing(tmp_path, what):
    """Was: a ForeignEntryError alone (an OSError), which Orbax's ``except ocp.errors.InvalidLayoutError`` missed."""
    with ckpt.training.Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save(0, {"w": np.ones(2)})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "run" / "0")
    path = {"a run's root": tmp_path / "run", "a user's directory": tmp_path / "notes",
            "a file": tmp_path / "notes" / "todo.txt", "a link to a checkpoint": tmp_path / "link"}[what]
    for delete in (ckpt.delete, lambda p: ckpt.delete_async(p).result(timeout=60)):
        with pytest.raises(errors.InvalidLayoutError, match="it was not deleted") as info:
            delete(path)
        assert isinstance(info.value, errors.ForeignEntryError) and info.value.path == path
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep" and os.path.islink(tmp_path / "link")
    assert ckpt.load(tmp_path / "run" / "0")["w"].tolist() == [1, 1]


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


def test_an_empty_dict_of_checkpointables_loads_every_one_as_orbaxs_load_checkpointables_does(tmp_path):
    """Was: {} loaded nothing ({}), where Orbax loads every checkpointable for None and {} alike."""
    trees = {"params": {"w": np.ones(2)}, "extra": {"lr": 0.5}}
    ckpt.save_checkpointables(tmp_path / "c", trees)
    loaded = ckpt.load_checkpointables(tmp_path / "c", {})
    assert sorted(loaded) == ["extra", "params"] and loaded["extra"] == {"lr": 0.5}
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save_checkpointables(0, trees)
        assert sorted(ckptr.load_checkpointables(0, {})) == sorted(ckptr.load_checkpointables_async(0, {}).result()) \
            == ["extra", "params"]

def test_load_without_a_name_falls_back_to_the_only_tree_beside_checkpointables_saved_by_handlers(tmp_path):
    ckpt.save_checkpointables(tmp_path / "c", {"params": {"w": np.arange(2)}, "counter": Counter(3)})
    assert ckpt.load(tmp_path / "c")["w"].tolist() == [0, 1]
    assert ckpt.metadata(tmp_path / "c").metadata["w"].shape == (2,)
    ckpt.save_checkpointables(tmp_path / "two", {"params": {"w": np.arange(2)}, "opt": {"m": np.zeros(2)}})
    with pytest.raises(KeyError, match=r"\['state'\].*\['opt', 'params'\]"):  # two trees: which one is not guessed
        ckpt.load(tmp_path / "two")


def test_orbaxs_auto_name_reads_the_state_beside_other_trees_as_orbaxs_load_does(tmp_path):
    """Was: checkpointable_name="AUTO" (Orbax's default name of load and metadata) raised
    CheckpointableNotFoundError "['AUTO'] are not in ..." on a step holding state beside another tree."""
    ckpt.save_checkpointables(tmp_path / "c", {"state": {"w": np.arange(2)}, "extra": {"e": np.zeros(1)}})
    assert ckpt.load(tmp_path / "c", checkpointable_name="AUTO")["w"].tolist() == [0, 1]
    assert list(ckpt.metadata(tmp_path / "c", checkpointable_name="AUTO").metadata) == ["w"]
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save_checkpointables(0, {"state": {"w": np.arange(2)}, "extra": {"e": np.zeros(1)}})
        assert ckptr.load(0, checkpointable_name="AUTO")["w"].tolist() == [0, 1]
    ckpt.save_checkpointables(tmp_path / "h", {"state": Counter(3), "extra": {"e": np.zeros(1)}})  # a handler's state
    assert ckpt.load(tmp_path / "h", Counter(0), checkpointable_name="AUTO").n == 3
    assert ckpt.metadata(tmp_path / "h", checkpointable_name="AUTO").metadata == ckpt.metadata(tmp_path / "h").metadata


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


# Keyword arguments of Orbax's public functions and classes that ckpt's do not take, with the reason
# (README, "What differs").
NOT_TAKEN = {
    "Context()": {"atomicity_options": "a group ckpt has not", "checkpoint_layout": "a group ckpt has not",
                  "pathways_options": "a group ckpt has not", "safetensors_options": "a group ckpt has not"},
    "training.Checkpointer()": {"logger": "Orbax's logger of step statistics, which ckpt has not"},
}


def _parameters(function) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # (a builtin without a signature)
        return None


def _not_taken(name: str, orbax_function, ckpt_function) -> dict[str, list[str]]:
    theirs, ours = _parameters(orbax_function), _parameters(ckpt_function)
    if theirs is None or ours is None or any(p.kind is p.VAR_KEYWORD for p in ours.values()):
        return {}
    missing = [n for n, p in theirs.items() if n not in ours and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return {name: sorted(missing)} if missing else {}


def test_every_keyword_argument_of_orbaxs_functions_and_classes_is_taken_by_ckpts_or_listed():
    """Was: standard_name_format(single_host_load_and_broadcast=True) and register_handler(cls=...) raised
    TypeError (an unexpected keyword argument), where code written for Orbax passes them."""
    v1 = pytest.importorskip("orbax.checkpoint.experimental.v1", reason="needs orbax-checkpoint: its API is the input")
    modules = {"": (v1, ckpt), "training.": (v1.training, ckpt.training),
               "save_decision_policies.": (v1.training.save_decision_policies, ckpt.training.save_decision_policies),
               "preservation_policies.": (v1.training.preservation_policies, ckpt.training.preservation_policies),
               "handlers.": (v1.handlers, ckpt.handlers), "options.": (v1.options, ckpt.options),
               "path.step.": (v1.path.step, ckpt.path.step), "errors.": (v1.errors, ckpt.errors)}
    found = {}
    for prefix, (theirs, ours) in modules.items():
        for name in [n for n in dir(theirs) if not n.startswith("_") and hasattr(ours, n)]:
            a, b = getattr(theirs, name), getattr(ours, name)
            if inspect.isclass(a) and inspect.isclass(b):
                found.update(_not_taken(f"{prefix}{name}()", a, b))
                for method in [m for m in dir(a) if not m.startswith("_") and callable(getattr(a, m, None))]:
                    if hasattr(b, method):
                        found.update(_not_taken(f"{prefix}{name}.{method}", getattr(a, method), getattr(b, method)))
            elif callable(a) and callable(b):
                found.update(_not_taken(prefix + name, a, b))
    assert found == {name: sorted(arguments) for name, arguments in NOT_TAKEN.items()}
    names = ckpt.path.step.standard_name_format(step_prefix="step", single_host_load_and_broadcast=True)
    assert names == ckpt.path.step.standard_name_format(step_prefix="step") and names.build_name(3) == "step_3"
    class ByKeyword(VocabHandler):  # (scoped to a name no other test saves: the global registry is shared)
        pass

    assert ckpt.handlers.register_handler(cls=ByKeyword, checkpointable_name="by keyword") is ByKeyword


class AnnotatedVocabHandler(VocabHandler):
    """A handler annotated with Orbax's type names, as Orbax's docs write one."""

    async def save(self, directory: ckpt.path.PathAwaitingCreation, checkpointable: ckpt.Checkpointable):
        return await super().save(directory, checkpointable)

    async def load(self, directory: ckpt.path.Path, abstract_checkpointable: ckpt.handlers.AbstractCheckpointable = None):
        return await super().load(directory, abstract_checkpointable)

    async def metadata(self, directory: ckpt.path.Path) -> ckpt.AbstractCheckpointable:
        return await super().metadata(directory)

    def is_handleable(self, checkpointable: ckpt.handlers.Checkpointable) -> bool:
        return super().is_handleable(checkpointable)


def test_orbaxs_type_names_for_a_handlers_annotations_are_there(tmp_path):
    """Was: AttributeError: module 'ckpt.path' has no attribute 'PathAwaitingCreation' (and 'Path',
    ckpt.Checkpointable, ckpt.handlers.AbstractCheckpointable), where a class defines its methods."""
    for method in ("save", "load", "metadata", "is_handleable"):
        typing.get_type_hints(getattr(AnnotatedVocabHandler, method))  # evaluates them, as a module without
    assert isinstance(ckpt.path.Path("a") / "b", ckpt.path.PathLike)   # `from __future__ import annotations` does
    with ckpt.Context(checkpointables_options=ckpt.CheckpointablesOptions.create_with_handlers(AnnotatedVocabHandler)):
        ckpt.save_checkpointables(tmp_path / "c", {"vocab": Vocab(["a"])})
        assert ckpt.load_checkpointables(tmp_path / "c", {"vocab": AbstractVocab()})["vocab"] == Vocab(["a"])


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


def test_a_delete_of_a_step_committed_since_the_root_was_listed_deletes_it_as_orbaxs_does(tmp_path):
    """Was: StepNotFoundError 'no checkpoint at step 7 (steps: [0])', the step left on disk, until a reload()."""
    with ckpt.training.Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"w": np.zeros(3)})
        ckpt.save(tmp_path / "7", {"w": np.ones(3)})  # a step committed after the Checkpointer listed its root
        assert [c.step for c in ckptr.checkpoints] == [0]
        assert ckptr.delete(7) and not (tmp_path / "7").exists()
        assert [c.step for c in ckptr.checkpoints] == [0] and ckptr.delete(12, missing_ok=True) is False


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


def test_a_save_while_delete_async_deletes_a_step_is_decided_as_no_save_were_in_progress(tmp_path, monkeypatch):
    """Was: the deletion counted as a save in progress, so the default policy (ContinuousCheckpointingPolicy)
    skipped a save made while it ran: save returned False and the step was never written (Orbax's saves it)."""
    release, delete_step = threading.Event(), root.delete_step
    monkeypatch.setattr(root, "delete_step", lambda path, step: release.wait(10) and delete_step(path, step))
    sdp, seen = ckpt.training.save_decision_policies, []
    default = sdp.AnySavePolicy([sdp.InitialSavePolicy(), sdp.ContinuousCheckpointingPolicy(),
                                 sdp.PreemptionCheckpointingPolicy()])  # the default policy

    class ReleasingTheDeletion:  # the default policy, which lets the deletion end once it has decided
        def should_save(self, step, previous_steps, *, context):
            seen.append((step.step, context.is_saving_in_progress, ckptr.is_saving_in_progress()))
            decision = default.should_save(step, previous_steps, context=context)
            release.set()
            return decision

    with ckpt.training.Checkpointer(tmp_path, save_decision_policy=ReleasingTheDeletion()) as ckptr:
        for step in (0, 5):
            ckptr.save(step, {"w": np.full(3, step)}, force=True)
        response = ckptr.delete_async(5)
        assert ckptr.save(5, {"w": np.full(3, 7.0)})  # decided while step 5 is being deleted
        assert seen == [(5, False, False)] and response.result(timeout=60)
        assert ckptr.load(5)["w"].tolist() == [7, 7, 7]


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


@pytest.mark.parametrize("prefix, length", [("step", None), ("step", 0), ("step", 3), ("", None)])
def test_a_step_name_format_names_and_finds_steps_as_orbaxs_of_the_same_arguments(tmp_path, prefix, length):
    """Was: step_format_fixed_length=0 (Orbax's: no padding) raised ValueError 'must be a positive int', and
    step_prefix='' (Orbax's names: _23) 'not a plain directory-name prefix'."""
    step_lib = pytest.importorskip("orbax.checkpoint.experimental.v1", reason="needs orbax-checkpoint").path.step
    theirs = step_lib.standard_name_format(step_prefix=prefix, step_format_fixed_length=length)
    ours = ckpt.path.step.standard_name_format(step_prefix=prefix, step_format_fixed_length=length)
    names = [theirs.build_name(step) for step in (0, 7, 12345)]
    assert [ours.build_name(step) for step in (0, 7, 12345)] == names
    for name in (*names, f"{prefix}_07", f"{prefix}_0007", "7", f"{prefix}_x"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "commit_success.txt").write_text("Checkpoint commit was successful")  # (Orbax's mark)
    assert sorted(ours.parse_name(p.name) for p in tmp_path.iterdir() if ours.parse_name(p.name) is not None) == \
        sorted(m.step for m in theirs.find_all(tmp_path))
    assert ckpt.path.step.name_format_of(tmp_path) == ours  # (what ckpt ls lists such a root with)
