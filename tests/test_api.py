"""The synchronous API of ``ckpt.training.Checkpointer`` and the free functions, member by member."""
from __future__ import annotations

import datetime
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import errors, training
from ckpt import format as fmt
from ckpt.training import Checkpointer
from ckpt.training import save_decision_policies as sdp
from tests import procs
from tests.fsutil import rewrite_tree, snapshot

ALWAYS = sdp.FixedIntervalPolicy(1)
BIG = (1 << 20) // 8 + 1  # float64 elements: just over the packing threshold


# ----------------------------------------------------------------------------------- names
def test_checkpointer_is_exported_under_the_orbax_import_paths():
    assert ckpt.Checkpointer is training.Checkpointer
    assert training.errors is ckpt.errors
    assert training.CheckpointMetadata is ckpt.CheckpointMetadata
    assert training.RootMetadata is ckpt.RootMetadata
    policies = training.save_decision_policies
    assert policies.PreemptionPolicy is policies.PreemptionCheckpointingPolicy
    assert issubclass(errors.StepNotFoundError, FileNotFoundError)
    assert issubclass(errors.StepAlreadyExistsError, FileExistsError)


# ------------------------------------------------------------------------- construction
def test_constructor_creates_the_directory_and_exposes_it_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Checkpointer(Path("a") / "b") as ckptr:
        assert ckptr.directory == tmp_path / "a" / "b"
        assert ckptr.directory.is_dir()
        assert ckptr.latest is None and ckptr.checkpoints == []


def test_context_manager_closes_and_a_closed_checkpointer_refuses_to_save(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": 1})
    with pytest.raises(RuntimeError, match="closed"):
        ckptr.save(1, {"a": 1}, force=True)
    ckptr.close()  # closing twice is fine
    assert ckptr.load(0) == {"a": 1}  # reading still works


def test_loading_in_the_background_goes_on_working_after_close_as_loading_does(tmp_path):
    """A load_async before close shut its thread down with the Checkpointer; the next one raised
    'cannot schedule new futures after shutdown'."""
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": 1})
        assert ckptr.load_async(0).result(timeout=60) == {"a": 1}
    assert ckptr.load_async(0).result(timeout=60) == {"a": 1}
    assert ckptr.load_checkpointables_async().result(timeout=60) == {"state": {"a": 1}}


# ------------------------------------------------------------------------------- listing
def test_checkpoints_are_ascending_and_latest_is_the_highest_step(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(5, {"a": 5})
        ckptr.save(2, {"a": 2}, force=True)
        ckptr.save(9, {"a": 9})
        assert [c.step for c in ckptr.checkpoints] == [2, 5, 9]
        assert ckptr.latest.step == 9
        assert ckptr.latest.path == tmp_path / "9"
        assert all(c.metadata is None for c in ckptr.checkpoints)


def test_a_step_may_be_a_0d_integer_array_of_numpy_jax_or_torch_as_a_train_states_step_is(tmp_path):
    import jax.numpy as jnp
    import torch

    steps = [np.int64(1), np.array(2, np.uint8), jnp.array(3), jnp.array(4, jnp.int64), torch.tensor(5)]
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        for step in steps:
            assert ckptr.should_save(step)
            assert ckptr.save(step, {"a": int(step)})
        assert ckptr.save_async(jnp.array(6), {"a": 6}).result()
        assert [c.step for c in ckptr.checkpoints] == [1, 2, 3, 4, 5, 6]
        assert all(type(c.step) is int for c in ckptr.checkpoints)
        assert ckptr.load(jnp.array(3)) == {"a": 3} and ckptr.metadata(torch.tensor(5)).step == 5
        assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "1", "2", "3", "4", "5", "6"]


def test_checkpoints_are_cached_until_reload(tmp_path):
    with Checkpointer(tmp_path) as writer:
        writer.save(0, {"a": 0})
        reader = Checkpointer(tmp_path)
        writer.save(1, {"a": 1})
        assert [c.step for c in reader.checkpoints] == [0]
        reader.reload()
        assert [c.step for c in reader.checkpoints] == [0, 1]
        assert reader.load() == {"a": 1}
        reader.close()


def test_checkpoint_metadata_has_utc_time_and_timestamps_of_the_save(tmp_path):
    before = time.time_ns()
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": np.ones(3)})
    after = time.time_ns()
    with Checkpointer(tmp_path) as ckptr:
        info = ckptr.latest
    assert before <= info.init_timestamp_nsecs <= info.commit_timestamp_nsecs <= after
    assert info.time.tzinfo == datetime.timezone.utc
    assert info.time == datetime.datetime.fromtimestamp(info.commit_timestamp_nsecs / 1e9, datetime.timezone.utc)


# ------------------------------------------------------------------------------ deciding
def test_should_save_follows_the_policy_and_is_false_up_to_latest(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=sdp.FixedIntervalPolicy(10)) as ckptr:
        assert [s for s in range(25) if ckptr.should_save(s)] == [0, 10, 20]
        ckptr.save(10, {"a": 1})
        assert not ckptr.should_save(0) and not ckptr.should_save(10)
        assert ckptr.should_save(20)
        assert ckptr.should_save(ckpt.CheckpointMetadata(20, None))


def test_save_returns_false_and_writes_nothing_when_the_policy_skips_the_step(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=sdp.FixedIntervalPolicy(10)) as ckptr:
        before = snapshot(tmp_path)
        assert ckptr.save(3, {"a": np.ones(BIG)}) is False
        assert ckptr.save_checkpointables(4, {"a": 1}) is False
        assert ckptr.checkpoints == []
        assert snapshot(tmp_path) == before


def test_force_saves_a_step_the_policy_would_skip(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=sdp.FixedIntervalPolicy(10)) as ckptr:
        ckptr.save(10, {"a": 10})
        assert ckptr.save(3, {"a": 3}, force=True) is True
        assert [c.step for c in ckptr.checkpoints] == [3, 10]
        assert ckptr.load(3) == {"a": 3}


def test_saving_an_existing_step_without_overwrite_raises_step_already_exists_as_orbax_does(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": "old"})
        with pytest.raises(errors.StepAlreadyExistsError, match="overwrite"):
            ckptr.save(0, {"a": "new"})
        assert ckptr.load(0) == {"a": "old"}
        ckptr.save(2, {"a": "two"})
        assert ckptr.save(1, {"a": "one"}) is False     # a missing step below the latest: skipped


def test_a_run_restarted_below_the_latest_step_is_told_once_that_its_saves_are_skipped(tmp_path, caplog):
    """Orbax skips such saves silently: a run restarted from step 0 without loading saved nothing (Orbax #527)."""
    with Checkpointer(tmp_path, save_decision_policy=sdp.FixedIntervalPolicy(2)) as ckptr:
        ckptr.save(4, {"a": 4})
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(tmp_path) as ckptr:
        assert ckptr.save(1, {"a": 1}) is False     # the default policy would save it, were it past step 4
        assert ckptr.save_async(3, {"a": 3}) is None
        assert ckptr.save(5, {"a": 5}) is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"step 1 is not saved, nor any step up to 4: {tmp_path} already holds step 4" \
        in warnings[0], warnings
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(tmp_path) as ckptr:
        caplog.clear()
        assert ckptr.should_save(2) is False and ckptr.save(7, {"a": 7}) is True  # asking alone says nothing
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_forcing_an_existing_step_raises_step_already_exists_and_keeps_the_old_one(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": "old"})
        before = snapshot(tmp_path)
        with pytest.raises(errors.StepAlreadyExistsError, match="overwrite") as info:
            ckptr.save(0, {"a": "new"}, force=True)
        assert info.value.step == 0 and info.value.path == tmp_path / "0"
        assert snapshot(tmp_path) == before
        assert ckptr.load(0) == {"a": "old"}


def test_overwrite_replaces_an_existing_step(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": "old", "x": np.zeros(BIG)}, metrics={"loss": 2.0})
        assert ckptr.save(0, {"a": "new"}, force=True, overwrite=True, metrics={"loss": 1.0}) is True
        assert ckptr.load(0) == {"a": "new"}
        assert [c.step for c in ckptr.checkpoints] == [0]
        assert ckptr.latest.metrics == {"loss": 1.0}
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "0"]


# -------------------------------------------------------------------------------- loading
@pytest.fixture
def three_steps(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        for step in (1, 2, 3):
            ckptr.save_checkpointables(step, {"model": {"w": np.full(3, step)}, "opt": {"count": step}})
    return tmp_path


def test_load_checkpointables_loads_latest_by_default_and_any_step_by_int_or_metadata(three_steps):
    with Checkpointer(three_steps) as ckptr:
        assert ckptr.load_checkpointables()["opt"] == {"count": 3}
        assert ckptr.load_checkpointables(2)["opt"] == {"count": 2}
        assert ckptr.load_checkpointables(ckptr.checkpoints[0])["opt"] == {"count": 1}
        assert np.array_equal(ckptr.load(1, checkpointable_name="model")["w"], np.full(3, 1))


def test_load_checkpointables_with_a_subset_of_keys_returns_only_those(three_steps):
    with Checkpointer(three_steps) as ckptr:
        assert ckptr.load_checkpointables(2, {"opt": None}) == {"opt": {"count": 2}}
        restored = ckptr.load_checkpointables(2, {"model": {"w": np.empty(3, np.int64)}})
        assert list(restored) == ["model"] and np.array_equal(restored["model"]["w"], np.full(3, 2))


def test_load_of_an_unknown_checkpointable_names_it_and_the_saved_ones(three_steps):
    with Checkpointer(three_steps) as ckptr:
        with pytest.raises(KeyError, match=r"'state'.*\['model', 'opt'\]"):
            ckptr.load(3)


def test_load_with_no_checkpoint_raises_step_not_found(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        with pytest.raises(errors.StepNotFoundError) as info:
            ckptr.load()
    assert info.value.step is None and info.value.path == tmp_path


def test_load_of_a_missing_step_raises_step_not_found_listing_the_steps(three_steps):
    with Checkpointer(three_steps) as ckptr:
        for call in (ckptr.load, ckptr.load_checkpointables, ckptr.metadata, ckptr.checkpointables_metadata):
            with pytest.raises(errors.StepNotFoundError, match=r"step 7.*\[1, 2, 3\]") as info:
                call(7)
            assert info.value.step == 7 and info.value.path == three_steps


# ------------------------------------------------------------------------------- metadata
def test_metadata_describes_the_saved_tree_with_shapes_and_dtypes(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(4, {"w": np.ones((2, 3), np.float32), "n": 3, "name": "x"}, metrics={"loss": 0.5},
                   custom_metadata={"epoch": 1})
        meta = ckptr.metadata()
        assert meta.step == 4 and meta.path == tmp_path / "4"
        assert meta.metrics == {"loss": 0.5} and meta.custom_metadata == {"epoch": 1}
        assert meta.metadata["w"] == ckpt.LeafMetadata("numpy", (2, 3), np.dtype(np.float32), 24)
        assert meta.metadata["n"].type == "int" and meta.metadata["name"].type == "str"
        assert ckptr.metadata(4).metadata == meta.metadata


def test_metadata_tree_loads_the_checkpoint_as_saved(tmp_path):
    state = {"w": np.arange(6.0).reshape(2, 3), "n": 3, "tags": ["a", b"b"]}
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, state)
        restored = ckptr.load(0, ckptr.metadata(0).metadata)
    assert np.array_equal(restored["w"], state["w"]) and restored["n"] == 3 and restored["tags"] == ["a", b"b"]


def test_checkpointables_metadata_maps_every_name_to_its_tree(three_steps):
    with Checkpointer(three_steps) as ckptr:
        meta = ckptr.checkpointables_metadata(2)
    assert meta.step == 2
    assert set(meta.metadata) == {"model", "opt"}
    assert meta.metadata["model"]["w"].shape == (3,)


def test_metrics_and_custom_metadata_are_kept_per_step_across_checkpointers(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, {"a": 0}, metrics={"loss": 3.0}, custom_metadata={"note": "first"})
        ckptr.save(1, {"a": 1})
        ckptr.save(2, {"a": 2}, metrics={"loss": 1.0, "acc": [0.5, 0.6]}, custom_metadata={"note": "third"})
    with Checkpointer(tmp_path) as ckptr:
        assert [c.metrics for c in ckptr.checkpoints] == [{"loss": 3.0}, None, {"loss": 1.0, "acc": [0.5, 0.6]}]
        assert [ckptr.metadata(s).custom_metadata for s in (0, 1, 2)] == [{"note": "first"}, {}, {"note": "third"}]


def test_custom_metadata_is_an_empty_dict_where_none_was_given_as_in_orbax(tmp_path):
    with Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save(0, {"w": np.ones(2)})
    with Checkpointer(tmp_path / "run") as ckptr:
        assert ckptr.root_metadata().custom_metadata == {}
        assert ckptr.metadata(0).custom_metadata == {} and ckptr.checkpointables_metadata(0).custom_metadata == {}
        assert ckptr.latest.custom_metadata == {}
    ckpt.save(tmp_path / "one", {"w": np.ones(2)})
    assert ckpt.metadata(tmp_path / "one").custom_metadata == {}
    assert ckpt.checkpointables_metadata(tmp_path / "one").custom_metadata == {}


def test_custom_metadata_may_hold_nan_and_inf_per_step_and_per_root_as_metrics_may(tmp_path):
    with Checkpointer(tmp_path, custom_metadata={"init_loss": math.inf, "note": "inf"}) as ckptr:
        ckptr.save(0, {"w": np.ones(2)}, metrics={"loss": math.nan}, custom_metadata={"last": [math.nan, "nan"]})
    with Checkpointer(tmp_path) as ckptr:
        assert ckptr.root_metadata().custom_metadata == {"init_loss": math.inf, "note": "inf"}
        for info in (ckptr.latest, ckptr.metadata(0), ckptr.checkpointables_metadata(0)):
            assert math.isnan(info.custom_metadata["last"][0]) and info.custom_metadata["last"][1] == "nan"
    ckpt.save(tmp_path / "one", {"w": np.ones(2)}, custom_metadata={"x": -math.inf})
    assert ckpt.metadata(tmp_path / "one").custom_metadata == {"x": -math.inf}


def test_metrics_may_be_numpy_jax_or_torch_scalars_and_are_kept_as_python_numbers(tmp_path):
    import jax.numpy as jnp
    import torch

    from ckpt.training import preservation_policies as pp

    losses = [jnp.float32(0.5), np.float32(0.25), torch.tensor(0.75), jnp.array(jnp.nan)]
    best = pp.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=2)  # the lowest losses
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS, preservation_policy=best) as ckptr:
        for step, loss in enumerate(losses):
            ckptr.save_async(step, {"a": step}, metrics={"loss": loss, "steps": [np.int64(step), torch.tensor(True)]})
    with Checkpointer(tmp_path) as ckptr:
        metrics = {c.step: c.metrics for c in ckptr.checkpoints}
    assert sorted(metrics) == [0, 1, 3]  # the two lowest losses, and the latest (its NaN loss is never best)
    assert metrics[1] == {"loss": 0.25, "steps": [1, True]} and math.isnan(metrics[3]["loss"])
    assert [type(v) for v in [metrics[0]["loss"], *metrics[0]["steps"]]] == [float, int, bool]


def test_root_metadata_is_written_once_and_kept_by_later_checkpointers(tmp_path):
    with Checkpointer(tmp_path, custom_metadata={"model": "resnet", "lr": 0.1}) as ckptr:
        assert ckptr.root_metadata() == ckpt.RootMetadata(directory=tmp_path,
                                                          custom_metadata={"model": "resnet", "lr": 0.1})
    with Checkpointer(tmp_path, custom_metadata={"model": "other"}) as ckptr:
        assert ckptr.root_metadata().custom_metadata == {"model": "resnet", "lr": 0.1}
    with Checkpointer(tmp_path / "plain") as ckptr:
        assert ckptr.root_metadata() == ckpt.RootMetadata(directory=tmp_path / "plain", custom_metadata={})


# ---------------------------------------------------------------------------- life cycle
def test_a_sync_save_leaves_nothing_in_progress(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        assert ckptr.is_saving_in_progress() is False
        ckptr.save(0, {"a": np.zeros(BIG)})
        assert ckptr.is_saving_in_progress() is False
        ckptr.wait()
        assert [c.step for c in ckptr.checkpoints] == [0]


@pytest.mark.parametrize("alias,call", [
    ("save_pytree", lambda c: c.save_pytree(1, {"a": 1}, force=True)),
    ("save_pytree_async", lambda c: c.save_pytree_async(1, {"a": 1}, force=True).result()),
    ("load_pytree", lambda c: c.load_pytree(0)),
    ("load_pytree_async", lambda c: c.load_pytree_async(0).result()),
    ("pytree_metadata", lambda c: c.pytree_metadata(0).metadata),
])
def test_deprecated_aliases_warn_and_do_what_the_new_name_does(tmp_path, alias, call):
    expected = {"save_pytree": True, "save_pytree_async": True, "load_pytree": {"a": 0},
                "load_pytree_async": {"a": 0}, "pytree_metadata": {"a": ckpt.LeafMetadata("int", None, None)}}
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": 0})
        new_name = {"save_pytree": "save", "save_pytree_async": "save_async", "load_pytree": "load",
                    "load_pytree_async": "load_async", "pytree_metadata": "metadata"}[alias]
        with pytest.warns(DeprecationWarning, match=f"^Use `{new_name}` instead.$") as record:  # Orbax's words
            assert call(ckptr) == expected[alias]
        assert record[0].filename == __file__  # the warning points at the caller
        if alias.startswith("save"):
            assert ckptr.load(1) == {"a": 1}


# ------------------------------------------------------------------------- initialization
def test_lightweight_initialize_lists_loads_and_saves_without_reading_manifests(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": 0}, metrics={"loss": 1.0})
        ckptr.save(3, {"a": 3}, force=True, metrics={"loss": 0.5})
    with Checkpointer(tmp_path, lightweight_initialize=True) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 3]
        assert ckptr.latest.step == 3 and ckptr.latest.metrics is None
        assert isinstance(ckptr.latest.time, datetime.datetime)
        assert ckptr.load() == {"a": 3}
        assert ckptr.metadata().metrics == {"loss": 0.5}
        assert not ckptr.should_save(3) and ckptr.should_save(4)
        assert ckptr.save(4, {"a": 4}, metrics={"loss": 0.1}) is True
        assert ckptr.latest.step == 4 and ckptr.latest.metrics == {"loss": 0.1}


def test_lightweight_initialize_does_not_make_a_time_based_save_decision_take_the_latest_for_an_old_step(tmp_path):
    """Listed without its manifest, the latest step had the time 1970: ContinuousCheckpointingPolicy(3600)
    said to save the step after a step saved a second before (with its time read, it says no, as without
    lightweight_initialize). Only the latest's manifest is read."""
    with Checkpointer(tmp_path) as ckptr:
        for step in (0, 1):
            ckptr.save(step, {"a": step}, force=True)
    policy = training.save_decision_policies.ContinuousCheckpointingPolicy(minimum_interval_secs=3600)
    with Checkpointer(tmp_path, lightweight_initialize=True, save_decision_policy=policy) as ckptr:
        assert not ckptr.should_save(2) and not ckptr.save(2, {"a": 2})
        assert [c.commit_timestamp_nsecs is None for c in ckptr.checkpoints] == [True, False]


def test_lightweight_initialize_lists_steps_whose_manifest_is_unread_with_their_directorys_time_not_1970(tmp_path):
    """Was: checkpoints[i].time was 1970-01-01 for each step whose manifest the listing did not read (Orbax gives
    datetime.min); it is the step directory's modification time, which the commit set, and commit_timestamp_nsecs
    stays None (unknown)."""
    with Checkpointer(tmp_path) as ckptr:
        for step in (0, 1):
            ckptr.save(step, {"a": step}, force=True)
        committed = [c.time for c in ckptr.checkpoints]
    with Checkpointer(tmp_path, lightweight_initialize=True) as ckptr:
        first = ckptr.checkpoints[0]
        assert first.commit_timestamp_nsecs is None
        assert abs((first.time - committed[0]).total_seconds()) < 60  # was: 56 years
        assert first.time == datetime.datetime.fromtimestamp(os.lstat(first.path).st_mtime_ns / 1e9, datetime.timezone.utc)


def test_lightweight_initialize_does_not_make_garbage_collection_take_recent_steps_for_old_ones(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        for step in range(3):
            ckptr.save(step, {"a": step})
    hour = training.preservation_policies.LatestDuration(datetime.timedelta(hours=1))
    with Checkpointer(tmp_path, lightweight_initialize=True, preservation_policy=hour) as ckptr:
        ckptr.save(3, {"a": 3})
        assert [c.step for c in ckptr.checkpoints] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]


def test_cleanup_tmp_directories_removes_leftovers_of_crashed_saves(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"a": 0})
    (tmp_path / "1.ckpt-tmp" / "arrays").mkdir(parents=True)
    (tmp_path / "1.ckpt-tmp" / "manifest.json").write_text("{}")
    (tmp_path / "1.ckpt-tmp" / fmt.MARKER).write_text("")  # what ckpt writes first into a temporary
    with Checkpointer(tmp_path) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
    assert (tmp_path / "1.ckpt-tmp").exists()
    with Checkpointer(tmp_path, cleanup_tmp_directories=True) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
        assert not (tmp_path / "1.ckpt-tmp").exists()
        assert ckptr.load(0) == {"a": 0}


# ------------------------------------------------------------------------ step name format
@pytest.mark.parametrize("kwargs,name", [
    ({}, "23"),
    ({"step_format_fixed_length": 4}, "0023"),
    ({"step_prefix": "step"}, "step_23"),
    ({"step_prefix": "step", "step_format_fixed_length": 4}, "step_0023"),
])
def test_standard_name_format_names_steps_and_parses_them_back(kwargs, name):
    name_format = ckpt.path.step.standard_name_format(**kwargs)
    assert name_format.build_name(23) == name
    assert name_format.parse_name(name) == 23
    assert name_format.parse_name(name + fmt.TMP_SUFFIX) is None


@pytest.mark.parametrize("kwargs,name", [
    ({}, "2\u0663"),                                              # 2 and ARABIC-INDIC DIGIT THREE: int() reads 23
    ({"step_format_fixed_length": 4}, "\u0660\u0660\u0662\u0663"),
    ({"step_prefix": "step"}, "step_2\uff13"),                    # FULLWIDTH DIGIT THREE
    ({"step_prefix": "step", "step_format_fixed_length": 4}, "step_00\u09e8\u09e9"),
    ({}, "23\n"),                                                 # a regex's $ matches before a final newline
])
def test_a_name_of_digits_other_than_ascii_is_no_step_and_is_never_listed_nor_deleted(tmp_path, kwargs, name):
    """build_name writes ASCII digits and nothing after them: any other name is a user's, though Python's
    int() reads it as a number."""
    from ckpt.training import preservation_policies as pp

    name_format = ckpt.path.step.standard_name_format(**kwargs)
    assert name_format.parse_name(name) is None
    with Checkpointer(tmp_path, step_name_format=name_format, preservation_policy=pp.LatestN(1)) as ckptr:
        ckptr.save(1, {"a": 1}, force=True)
        os.rename(ckptr.latest.path, tmp_path / name)  # a step's copy (whose manifest says step 1) by the user
        ckptr.reload()
        assert ckptr.checkpoints == []
        ckptr.save(30, {"a": 30}, force=True)
        ckptr.save(31, {"a": 31}, force=True)
        assert [c.step for c in ckptr.checkpoints] == [31]
    assert ckpt.load(tmp_path / name) == {"a": 1}


def test_step_name_format_names_the_step_directories_and_ignores_other_names(tmp_path):
    name_format = ckpt.path.step.standard_name_format(step_prefix="step", step_format_fixed_length=4)
    (tmp_path / "7").mkdir()
    (tmp_path / "notes").mkdir()
    with Checkpointer(tmp_path, step_name_format=name_format, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(3, {"a": 3})
        ckptr.save(12, {"a": 12})
        assert [c.path.name for c in ckptr.checkpoints] == ["step_0003", "step_0012"]
    with Checkpointer(tmp_path, step_name_format=name_format) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [3, 12]
        assert ckptr.load(3) == {"a": 3}


def test_a_checkpointer_whose_name_format_names_none_of_the_roots_steps_warns_naming_the_format_that_does(
        tmp_path, caplog):
    """A run resumed without the step_name_format it saved with (flax.training.checkpoints' checkpoint_100)
    lists nothing and starts from scratch: the warning names the steps and the format that lists them."""
    written_with = ckpt.path.step.standard_name_format(step_prefix="checkpoint", step_format_fixed_length=4)
    with Checkpointer(tmp_path, step_name_format=written_with) as ckptr:
        ckptr.save(100, {"a": 1}, force=True)
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(tmp_path) as ckptr:
        assert ckptr.latest is None
    assert "checkpoint_0100" in caplog.text
    assert "standard_name_format(step_prefix='checkpoint', step_format_fixed_length=4)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(tmp_path, step_name_format=written_with) as ckptr:
        assert ckptr.latest.step == 100
    assert "step_name_format" not in caplog.text


def test_a_root_holding_only_checkpoints_of_ckpt_save_named_like_steps_gets_no_step_name_format_warning(
        tmp_path, caplog):
    """ckpt.save(root / "best_10") names no step: the warning took them for a run's steps and told to pass
    step_prefix='best', under which a Checkpointer lists them as its steps, and its preservation policy
    deletes them."""
    for n in (10, 20):
        ckpt.save(tmp_path / f"best_{n}", {"a": n})
    with Checkpointer(tmp_path / "steps", step_name_format=ckpt.path.step.standard_name_format(step_prefix="best")) as c:
        c.save(30, {"a": 30}, force=True)
    (tmp_path / "steps" / "best_30").rename(tmp_path / "best_30")  # a Checkpointer's step among them: warned of
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(tmp_path) as ckptr:
        assert ckptr.latest is None
    assert "holds steps (best_30) that step_name_format" in caplog.text, caplog.text
    caplog.clear()
    (tmp_path / "best_30").rename(tmp_path / "steps" / "best_30")
    with caplog.at_level(logging.WARNING, logger="ckpt"), Checkpointer(tmp_path) as ckptr:
        assert ckptr.latest is None
    assert "step_name_format" not in caplog.text, caplog.text


def test_composite_name_format_writes_one_naming_and_reads_every_one_it_lists(tmp_path):
    step_names = ckpt.path.step
    old, new = step_names.standard_name_format(step_prefix="step"), step_names.standard_name_format(step_prefix="ckpt")
    with Checkpointer(tmp_path, step_name_format=old) as ckptr:
        ckptr.save(1, {"a": 1})
    with Checkpointer(tmp_path, step_name_format=step_names.composite_name_format(new, [new, old])) as ckptr:
        ckptr.save(2, {"a": 2})
        assert [(c.step, c.path.name) for c in ckptr.checkpoints] == [(1, "step_1"), (2, "ckpt_2")]
        assert ckptr.load(1) == {"a": 1}
    with pytest.raises(ValueError, match="must be one of read_name_formats"):
        step_names.composite_name_format(new, [old])


def test_overwrite_replaces_a_step_a_composite_name_format_reads_under_its_other_name(tmp_path):
    """overwrite=True of step 2, stored as step_2, wrote ckpt_2 beside it: once garbage collection deleted
    ckpt_2, step_2 came back as step 2, with the value the overwrite had replaced."""
    step_names = ckpt.path.step
    old, new = step_names.standard_name_format(step_prefix="step"), step_names.standard_name_format(step_prefix="ckpt")
    with Checkpointer(tmp_path, step_name_format=old) as ckptr:
        ckptr.save(2, {"a": 2})
    names = step_names.composite_name_format(new, [new, old])
    with Checkpointer(tmp_path, step_name_format=names,
                      preservation_policy=training.preservation_policies.LatestN(1)) as ckptr:
        ckptr.save(2, {"a": 20}, force=True, overwrite=True)
        assert [(c.step, c.path.name) for c in ckptr.checkpoints] == [(2, "ckpt_2")]
        ckptr.save(3, {"a": 3}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ckpt_3"]
    with Checkpointer(tmp_path, step_name_format=names) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [3]


def test_of_two_directories_of_one_step_a_composite_name_format_lists_the_one_committed_last(tmp_path):
    """step_2 (a composite format's run) then 2 (a run with the old format, which does not read step_2): the
    composite format listed and loaded step_2, the older, for it lists the name it writes first."""
    step_names = ckpt.path.step
    old, new = step_names.standard_name_format(), step_names.standard_name_format(step_prefix="step")
    names = step_names.composite_name_format(new, [new, old])
    with Checkpointer(tmp_path, step_name_format=names) as ckptr:
        ckptr.save(2, {"a": 1}, force=True)
    with Checkpointer(tmp_path, step_name_format=old) as ckptr:
        ckptr.save(2, {"a": 2}, force=True)
    with Checkpointer(tmp_path, step_name_format=names) as ckptr:
        assert [(c.step, c.path.name) for c in ckptr.checkpoints] == [(2, "2")] and ckptr.load(2) == {"a": 2}
        ckptr.save(3, {"a": 3}, force=True)  # its writer deletes step_2, which 2 replaced
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["2", "step_3"]


class EpochNames:
    """A step name format written to Orbax's protocol (build_name, find_all, find_step): no parse_name."""

    def __init__(self):
        self._std = ckpt.path.step.standard_name_format(step_prefix="epoch")

    def build_name(self, step):
        return self._std.build_name(step)

    def find_all(self, base_path):
        return self._std.find_all(base_path)

    def find_step(self, base_path, step):
        return self._std.find_step(base_path, step)


def test_a_step_name_format_written_to_orbaxs_protocol_names_and_finds_the_steps(tmp_path):
    (tmp_path / "epoch_9.txt").write_text("notes")
    with Checkpointer(tmp_path, step_name_format=EpochNames(), save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(3, {"a": 3})
        ckptr.save(5, {"a": 5})
    with Checkpointer(tmp_path, step_name_format=EpochNames()) as ckptr:
        assert [(c.step, c.path.name) for c in ckptr.checkpoints] == [(3, "epoch_3"), (5, "epoch_5")]
        assert ckptr.load(3) == {"a": 3}
    standard = ckpt.path.step.standard_name_format(step_prefix="epoch")
    assert [(m.step, m.path.name) for m in standard.find_all(tmp_path)] == [(3, "epoch_3"), (5, "epoch_5")]
    assert standard.find_step(tmp_path, 5).path == tmp_path / "epoch_5"
    with pytest.raises(ValueError, match="no committed step 4"):
        standard.find_step(tmp_path, 4)


# ----------------------------------------------------------------------------- bad input
# (the full table of bad input is in test_bad_input.py)
def test_an_unsupported_leaf_error_names_its_checkpointable_and_key_path_before_anything_is_written(tmp_path):
    class Opaque:
        pass

    with Checkpointer(tmp_path) as ckptr:
        before = snapshot(tmp_path)
        with pytest.raises(TypeError, match=r"checkpointable 'opt': leaf at \['layers'\]\[1\]\['act'\].*Opaque"):
            ckptr.save_checkpointables(0, {"model": {"big": np.zeros(BIG)},
                                           "opt": {"layers": [{"w": np.ones(2)}, {"act": Opaque()}]}})
        assert snapshot(tmp_path) == before and ckptr.checkpoints == []


# ------------------------------------------------------------------------- free functions
def test_free_functions_save_and_load_one_directory(tmp_path):
    path = tmp_path / "model"
    state = {"w": np.arange(4.0), "step": 3}
    ckpt.save(path, state, custom_metadata={"who": "me"})
    restored = ckpt.load(path)
    assert np.array_equal(restored["w"], state["w"]) and restored["step"] == 3
    assert ckpt.load(str(path), {"w": np.empty(4, np.float32), "step": 0})["w"].dtype == np.float32
    meta = ckpt.metadata(path)
    assert meta.metadata["w"].shape == (4,) and meta.custom_metadata == {"who": "me"}
    assert list(ckpt.checkpointables_metadata(path).metadata) == ["state"]


def test_free_functions_handle_several_checkpointables_and_a_custom_name(tmp_path):
    path = tmp_path / "c"
    ckpt.save_checkpointables(path, {"model": {"w": np.ones(2)}, "data": {"epoch": 4}})
    assert ckpt.load_checkpointables(path)["data"] == {"epoch": 4}
    assert list(ckpt.load_checkpointables(path, {"data": None})) == ["data"]
    assert ckpt.load(path, checkpointable_name="data") == {"epoch": 4}
    assert set(ckpt.checkpointables_metadata(path).metadata) == {"model", "data"}
    with pytest.raises(KeyError, match="state"):
        ckpt.metadata(path)


def test_orbax_top_level_names_are_there_after_import_ckpt_as_ocp(tmp_path):
    assert ckpt.StatefulCheckpointable is ckpt.handlers.StatefulCheckpointable
    assert ckpt.CheckpointableHandler is ckpt.handlers.CheckpointableHandler
    meta: ckpt.CheckpointMetadata[ckpt.PyTreeMetadata] = ckpt.metadata  # an annotation Orbax users write
    assert meta is ckpt.metadata
    path = tmp_path / "c"
    ckpt.save_checkpointables(path, {"params": {"w": np.ones(2)}})
    assert ckpt.load_checkpointables_async(path).result(timeout=60)["params"]["w"].tolist() == [1.0, 1.0]
    assert ckpt.is_orbax_checkpoint(path) and not ckpt.is_orbax_checkpoint(tmp_path / "none")
    (tmp_path / "notes").mkdir()
    assert not ckpt.is_orbax_checkpoint(tmp_path / "notes")
    with pytest.raises(ValueError, match="whole checkpoints"):
        ckpt.delete(path, checkpointable_name="params")
    assert ckpt.delete(path) is True and not path.exists()
    assert ckpt.delete(path, missing_ok=True) is False
    with pytest.raises(FileNotFoundError):
        ckpt.delete(path)
    with pytest.raises(errors.ForeignEntryError):
        ckpt.delete(tmp_path / "notes")  # not a checkpoint: left alone
    assert (tmp_path / "notes").is_dir()
    ckpt.save(path, {"w": 1})
    assert ckpt.delete_async(path).result(timeout=60) is True and not path.exists()
    assert sorted(os.listdir(tmp_path)) == ["notes"]


def test_free_save_refuses_an_existing_path_unless_overwrite(tmp_path):
    path = tmp_path / "c"
    ckpt.save(path, {"v": 1})
    with pytest.raises(errors.StepAlreadyExistsError) as info:
        ckpt.save(path, {"v": 2})
    assert info.value.path == path and info.value.step is None
    with pytest.raises(ValueError):  # Orbax's free save raises ValueError: an Orbax user's except still catches it
        ckpt.save(path, {"v": 2})
    with pytest.raises(FileExistsError):
        ckpt.save(path, {"v": 2})
    assert ckpt.load(path) == {"v": 1}
    ckpt.save(path, {"v": 2}, overwrite=True)
    assert ckpt.load(path) == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["c"]


@pytest.mark.parametrize("read", [ckpt.load, ckpt.load_checkpointables, ckpt.metadata, ckpt.checkpointables_metadata])
def test_free_functions_on_a_missing_path_raise_file_not_found_naming_it(tmp_path, read):
    with pytest.raises(FileNotFoundError, match="typo.*does not exist"):
        read(tmp_path / "typo")


def test_placeholder_skips_a_leaf_without_reading_it(tmp_path):
    path = tmp_path / "c"
    ckpt.save(path, {"big": np.ones(BIG), "small": np.ones(3), "keep": np.arange(3)})
    for chunk in (path / "arrays").rglob("c/*"):
        if chunk.is_file():
            chunk.write_bytes(b"damaged")  # would fail its checksum if read
    restored = ckpt.load(path, {"big": ckpt.PLACEHOLDER, "small": ckpt.PLACEHOLDER, "keep": np.empty(3, np.int64)})
    assert restored["big"] is ckpt.PLACEHOLDER and restored["small"] is ckpt.PLACEHOLDER
    assert np.array_equal(restored["keep"], np.arange(3))


def test_an_ellipsis_leaf_is_the_placeholder_and_skips_its_leaf_as_in_orbax(tmp_path):
    assert ckpt.PLACEHOLDER is ...
    path = tmp_path / "c"
    ckpt.save(path, {"a": np.arange(4.0), "b": np.ones(2, np.int32)})
    restored = ckpt.load(path, {"a": ..., "b": np.zeros(2, np.int32)})
    assert restored["a"] is ... and restored["b"].tolist() == [1, 1]


# ----------------------------------------------------------------------- sharded loading
SHARDED_LOAD = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
import ckpt
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
rows, cols = NamedSharding(mesh, P("x")), NamedSharding(mesh, P(None, "x"))
replicated = NamedSharding(mesh, P())
path = sys.argv[1]
state = {
    "small": np.arange(16, dtype=np.float32).reshape(8, 2),                   # packed
    "big": np.arange(400_000, dtype=np.float32).reshape(400, 1000),           # its own array
    "saved_sharded": jax.device_put(jnp.arange(8 * 40_000, dtype=jnp.float32).reshape(8, 40_000), rows),
    "keys": jax.random.split(jax.random.key(0), 4),
    "scalar": np.float32(2.5),
    "on_device_2": np.arange(3, dtype=np.float32),
    "one_device_mesh": np.arange(6, dtype=np.int32).reshape(2, 3),
    "default_device": jnp.asarray(1.5, jnp.bfloat16),
    "sharded_keys": jax.device_put(jax.random.split(jax.random.key(1), 4), rows),
    "step": jax.device_put(jnp.asarray(7, jnp.int32), replicated),            # a TrainState's, after a sharded step
}
ckpt.save(path, state)
as_saved = ckpt.load(path)  # no abstract tree: a saved NamedSharding is restored, keys' too
for key in ("saved_sharded", "sharded_keys"):
    assert as_saved[key].sharding == rows, (key, as_saved[key].sharding)
np.testing.assert_array_equal(jax.random.key_data(as_saved["sharded_keys"]), jax.random.key_data(state["sharded_keys"]))
abstract = {
    "small": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=rows),
    "big": jax.ShapeDtypeStruct((400, 1000), jnp.bfloat16, sharding=cols),    # cast while loading
    "saved_sharded": jax.ShapeDtypeStruct((8, 40_000), jnp.float32, sharding=cols),
    "keys": jax.ShapeDtypeStruct((4,), jax.random.key(0).dtype, sharding=rows),
    "scalar": jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
    "on_device_2": jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[2])),
    "one_device_mesh": jax.ShapeDtypeStruct((2, 3), jnp.int32, sharding=NamedSharding(Mesh(np.array(jax.devices()[3:]), ("x",)), P())),
    "default_device": jax.ShapeDtypeStruct((), jnp.bfloat16),
    "sharded_keys": None,
    "step": 0,  # a Python int, as TrainState.create gives it (was: TypeError, int() of a pending transfer)
}
restored = ckpt.load(path, abstract)
assert type(restored["step"]) is int and restored["step"] == 7, restored["step"]
del abstract["sharded_keys"], abstract["step"]
for key, want in abstract.items():
    got = restored[key]
    assert isinstance(got, jax.Array), key
    assert got.sharding == (want.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])), (key, got.sharding)
    assert got.committed == (want.sharding is not None), key
    assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape)
    assert len(got.addressable_shards) == len(got.sharding.device_set), key
    if key != "keys":
        np.testing.assert_array_equal(np.asarray(got), np.asarray(state[key]).astype(want.dtype), err_msg=key)
np.testing.assert_array_equal(np.asarray(restored["small"]), state["small"])
np.testing.assert_array_equal(np.asarray(restored["big"]), state["big"].astype(jnp.bfloat16))
np.testing.assert_array_equal(np.asarray(restored["saved_sharded"]), np.asarray(state["saved_sharded"]))
np.testing.assert_array_equal(jax.random.key_data(restored["keys"]), jax.random.key_data(state["keys"]))
for shard in restored["big"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), state["big"][shard.index].astype(jnp.bfloat16))
print("SHARDED-OK")
"""


METADATA_SHARDING = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
import ckpt
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sharding = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y")), P("x", "y"))
with ckpt.Checkpointer(sys.argv[1]) as ckptr:
    keys = jax.device_put(jax.random.split(jax.random.key(0), 4).reshape(2, 2), sharding)
    ckptr.save(0, {"a": jax.device_put(jnp.arange(32.0).reshape(8, 4), sharding), "n": np.ones(3), "k": keys})
    meta = ckptr.metadata(0).metadata
    assert meta["a"].sharding == sharding and meta["n"].sharding is None
    assert meta["k"].sharding == sharding, meta["k"]  # typed keys' too, as a load without a tree restores it
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=m.sharding), meta)  # Orbax's idiom
    restored = ckptr.load(0, abstract)
    assert restored["a"].sharding == sharding and restored["k"].sharding == sharding
    np.testing.assert_array_equal(jax.random.key_data(restored["k"]), jax.random.key_data(keys))
print("METADATA-SHARDING-OK")
"""


def test_leaf_metadata_has_the_saved_sharding_where_the_devices_can_hold_it_else_none(tmp_path):
    pytest.importorskip("jax")
    result = procs.run_script(METADATA_SHARDING, str(tmp_path / "run"), timeout=120, JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "METADATA-SHARDING-OK" in result.stdout, result.stdout + result.stderr
    import jax
    if jax.device_count() < 4:  # this process: the saved mesh's devices are not all here
        with Checkpointer(tmp_path / "run") as ckptr:
            assert ckptr.metadata(0).metadata["a"].sharding is None


AXIS_TYPES = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
import ckpt
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

for types in [(AxisType.Explicit, AxisType.Explicit), (AxisType.Auto, AxisType.Explicit)]:
    mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=types)
    x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("x", "y")))
    path = os.path.join(sys.argv[1], types[0].name)
    ckpt.save(path, {"x": x})
    loaded = ckpt.load(path)["x"]
    assert loaded.sharding == x.sharding and ckpt.metadata(path).metadata["x"].sharding == x.sharding, loaded.sharding
    np.testing.assert_array_equal(np.asarray(loaded + x), 2 * np.asarray(x))  # jax refuses meshes of other axis types
print("AXIS-TYPES-OK")
"""


def test_loading_without_a_tree_keeps_the_saved_meshs_axis_types_so_the_arrays_combine_with_the_originals(tmp_path):
    pytest.importorskip("jax")
    result = procs.run_script(AXIS_TYPES, str(tmp_path), timeout=120, JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "AXIS-TYPES-OK" in result.stdout, result.stdout + result.stderr



KEYS_OFF_THE_CONTEXT_MESH = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
import ckpt
from jax.sharding import NamedSharding, PartitionSpec as P

if not hasattr(jax, "set_mesh"):
    print("KEYS-OK (this jax has no jax.set_mesh)")
    sys.exit(0)
stage = jax.make_mesh((2,), ("stage",), devices=jax.devices()[2:])  # a pipeline stage's devices
keys = jax.device_put(jax.random.split(jax.random.key(0), 4), NamedSharding(stage, P("stage")))
ckpt.save(sys.argv[1], {"keys": keys})
with jax.set_mesh(jax.make_mesh((2, 2), ("data", "model"))):  # the whole job's mesh
    for target in (None, {"keys": keys}, {"keys": jax.ShapeDtypeStruct((4,), keys.dtype, sharding=keys.sharding)}):
        restored = ckpt.load(sys.argv[1], target)["keys"]
        assert restored.sharding == keys.sharding, restored.sharding
        np.testing.assert_array_equal(jax.random.key_data(restored), jax.random.key_data(keys))
print("KEYS-OK")
"""


def test_prng_keys_placed_off_the_jax_set_mesh_mesh_load_under_it_where_they_were(tmp_path):
    """Typed PRNG keys saved on devices other than those of the jax.set_mesh mesh a load ran under (a pipeline
    stage's, under the whole job's mesh) were called damaged ('jax refuses its key data ...: Received
    incompatible devices for jitted computation'): the keys were wrapped under the caller's mesh."""
    pytest.importorskip("jax")
    result = procs.run_script(KEYS_OFF_THE_CONTEXT_MESH, str(tmp_path / "c"), timeout=120, JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "KEYS-OK" in result.stdout, result.stdout + result.stderr

REDUCED_AXES = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
import ckpt
from jax.sharding import NamedSharding, PartitionSpec as P

if not hasattr(P(), "reduced"):
    print("REDUCED-OK (this jax has no reduced axes)")
    sys.exit(0)
mesh = jax.make_mesh((2, 2), ("x", "y"))
x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("x", reduced={"y"})))
ckpt.save(os.path.join(sys.argv[1], "reduced"), {"x": x})
loaded = ckpt.load(os.path.join(sys.argv[1], "reduced"))["x"]
assert loaded.sharding == x.sharding, loaded.sharding
np.testing.assert_array_equal(np.asarray(loaded), np.asarray(x))
try:
    unreduced = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("x", unreduced={"y"})))
except Exception:  # (a jax that cannot make one here)
    pass
else:
    try:
        ckpt.save(os.path.join(sys.argv[1], "unreduced"), {"params": {"w": unreduced}})
    except TypeError as e:
        assert "['params']['w'] is unreduced over the mesh axes ['y']" in str(e), e
    else:
        raise AssertionError("saved an unreduced array")
    assert not os.path.exists(os.path.join(sys.argv[1], "unreduced"))
print("REDUCED-OK")
"""


def test_a_sharding_with_reduced_axes_round_trips_and_an_unreduced_array_is_refused_naming_its_key_path(tmp_path):
    """Both raised jax's ValueError ('Using *pspec is dangerous when PartitionSpec has non-empty unreduced/reduced
    set') from the save, naming no leaf; an unreduced array holds partial sums, not its values."""
    pytest.importorskip("jax")
    result = procs.run_script(REDUCED_AXES, str(tmp_path), timeout=120, JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "REDUCED-OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("forged", [{"device_ids": [0, 0], "mesh_shape": [2]}, {"spec": ["x", "x"]},
                                    {"axis_names": ["x", "x"], "mesh_shape": [1, 1]}, {"device_ids": [], "mesh_shape": [0]},
                                    {"spec": ["x", None, None]}])
def test_a_saved_sharding_these_devices_cannot_apply_loads_on_the_default_device_with_a_warning(tmp_path, forged):
    """jax takes such a mesh and spec, then fails to put an array on them (JaxRuntimeError, IndexError, its
    DuplicateSpecError), which a load raised as it is, naming no leaf; a spec longer than the array's rank
    was raised as damage (CheckpointCorruptedError), unlike the other shardings these devices cannot apply."""
    jax = pytest.importorskip("jax")
    ckpt.save(tmp_path / "c", {"a": jax.numpy.arange(4.0).reshape(2, 2)})
    sharding = {"mesh_shape": [1], "axis_names": ["x"], "device_ids": [jax.devices()[0].id], "spec": ["x", None], **forged}
    rewrite_tree(tmp_path / "c", lambda tree: tree["checkpointables"]["state"]["leaves"][0].update(sharding=sharding))
    with pytest.warns(UserWarning, match="cannot be restored on these devices"):
        assert ckpt.load(tmp_path / "c")["a"].tolist() == [[0, 1], [2, 3]]
    assert ckpt.metadata(tmp_path / "c").metadata["a"].sharding is None


INDIVISIBLE = r"""
import os, sys, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
import ckpt

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = ckpt.load(sys.argv[1])["a"]
assert loaded.devices() == {jax.devices()[0]} and np.asarray(loaded).tolist() == [0, 1, 2, 3, 4, 5], loaded
assert any("cannot be restored on these devices" in str(w.message) and "evenly divide" in str(w.message)
           for w in caught), [str(w.message) for w in caught]
assert ckpt.metadata(sys.argv[1]).metadata["a"].sharding is None
print("INDIVISIBLE-OK")
"""


def test_a_saved_sharding_that_does_not_divide_the_array_loads_on_the_default_device_with_a_warning(tmp_path):
    """(It failed the load with CheckpointCorruptedError: jax's IndivisibleError from putting the array on it.)"""
    jax = pytest.importorskip("jax")
    ckpt.save(tmp_path / "c", {"a": jax.numpy.arange(6.0)})
    sharding = {"mesh_shape": [4], "axis_names": ["x"], "device_ids": [0, 1, 2, 3], "spec": ["x"]}  # 6 rows over 4
    rewrite_tree(tmp_path / "c", lambda tree: tree["checkpointables"]["state"]["leaves"][0].update(sharding=sharding))
    result = procs.run_script(INDIVISIBLE, str(tmp_path / "c"), timeout=120, JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "INDIVISIBLE-OK" in result.stdout, result.stdout + result.stderr


DEFAULT_DEVICE = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp
import ckpt

state = {"a": jnp.arange(3.0), "k": jax.random.key(0)}
abstract = jax.eval_shape(lambda: state)
ckpt.save(os.path.join(sys.argv[1], "single"), state)
with ckpt.Checkpointer(os.path.join(sys.argv[1], "root")) as ckptr:
    ckptr.save(0, state)
    with jax.default_device(jax.devices()[3]):
        loads = {"load": ckptr.load(0, abstract), "load_async": ckptr.load_async(0, abstract).result(),
                 "free load_async": ckpt.load_async(os.path.join(sys.argv[1], "single")).result()}
for how, loaded in loads.items():
    for key, leaf in loaded.items():
        assert leaf.devices() == {jax.devices()[3]}, (how, key, leaf.devices())
print("DEFAULT-DEVICE-OK")
"""


def test_a_load_in_the_background_puts_arrays_on_the_callers_default_device_as_a_load_does(tmp_path):
    pytest.importorskip("jax")
    result = procs.run_script(DEFAULT_DEVICE, str(tmp_path), timeout=120, JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "DEFAULT-DEVICE-OK" in result.stdout, result.stdout + result.stderr



def test_a_load_in_the_background_under_jax_enable_x64_gives_the_64_bit_values_a_load_does(tmp_path):
    """Inside `with jax.enable_x64(True):` (a setting of the caller's thread alone), load gave int64 values and
    load_async int32 ones, wrapped (2**40 + 5 became 5): the background thread had 64-bit types off."""
    jax = pytest.importorskip("jax")
    if not hasattr(jax, "enable_x64"):
        pytest.skip("jax.enable_x64 is newer than this jax")
    ckpt.save(tmp_path / "c", {"i": np.int64(2**40 + 5)})
    with jax.enable_x64(True), ckpt.Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save(0, {"i": np.int64(2**40 + 5)})
        abstract = {"i": jax.ShapeDtypeStruct((), jax.numpy.int64)}
        for loaded in (ckpt.load(tmp_path / "c", abstract), ckpt.load_async(tmp_path / "c", abstract).result(),
                       ckptr.load_async(0, abstract).result()):
            assert loaded["i"].dtype == np.int64 and int(loaded["i"]) == 2**40 + 5, loaded

def test_loading_into_shape_dtype_structs_places_every_leaf_with_its_named_sharding_and_as_saved_keeps_the_saved_one(tmp_path):

    pytest.importorskip("jax")
    result = procs.run_script(SHARDED_LOAD, str(tmp_path / "c"), timeout=120, JAX_PLATFORMS="cpu")
    assert result.returncode == 0 and "SHARDED-OK" in result.stdout, result.stdout + result.stderr


def test_find_all_lists_committed_steps_of_a_root_with_their_names(tmp_path):
    fmt_ = ckpt.path.step.standard_name_format(step_prefix="step", step_format_fixed_length=3)
    with Checkpointer(tmp_path, step_name_format=fmt_) as ckptr:
        ckptr.save(0, {"a": 1})
        ckptr.save(7, {"a": 2}, force=True)
    (tmp_path / "step_009.ckpt-tmp").mkdir()
    assert ckpt.path.step.find_all(tmp_path, fmt_) == {0: "step_000", 7: "step_007"}
    assert ckpt.path.step.find_all(tmp_path) == {}
