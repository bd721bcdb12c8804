"""Every example in the docstrings of Orbax v1's ``training.Checkpointer``, with ``orbax.checkpoint.v1``
replaced by ``ckpt`` (reference/orbax-training-checkpointer.py.txt), runs and does what its docstring says.

Each test keeps the example's code as written there; the lines around it supply what the example takes
as given (``directory``, ``tree``, ``init_from_scratch``...) and check the outcome.
"""
from __future__ import annotations

import numpy as np
import pytest

import ckpt
from ckpt import training


@pytest.fixture
def tree():
    return {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(4, np.float32)}, "step": 7}


def _assert_tree_equal(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_tree_equal(got[key], want[key])
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    else:
        assert got == want


# ------------------------------------------------------------------------ Checkpointer.__init__
def _init_example(directory, num_steps: int, rng=None):
    """The class example, verbatim but for ``ocp`` (orbax.checkpoint.v1), which is ``ckpt`` here."""
    def init_from_scratch(rng):
        return {"params": {"w": np.zeros(4, np.float32)}}

    def train_step(state):
        return {"params": {"w": state["params"]["w"] + 1}}

    abstract_model_state = {"params": {"w": np.empty(4, np.float32)}}
    loaded = []

    # Configure the frequency at which checkpoints are saved.
    save_decision_policies = ckpt.training.save_decision_policies
    # Save every 1000 steps, or when a preemption is detected.
    save_decision_policy = save_decision_policies.AnySavePolicy([
        save_decision_policies.FixedIntervalPolicy(1000),
        save_decision_policies.PreemptionPolicy(),
    ])
    # Configure the checkpoints to preserve (avoid garbage collection).
    preservation_policies = ckpt.training.preservation_policies
    # Avoid garbage collection on the latest 10, or every 10000 steps.
    preservation_policy = preservation_policies.AnyPreservationPolicy([
        preservation_policies.LatestN(10),
        preservation_policies.EveryNSteps(10000),
    ])
    with ckpt.training.Checkpointer(
        directory,
        save_decision_policy=save_decision_policy,
        preservation_policy=preservation_policy,
    ) as ckptr:
        if ckptr.latest is None:
            model_state = init_from_scratch(rng)
        else:
            model_state = ckptr.load()  # Loads latest checkpoint.
            loaded.append(model_state)
            # Note: prefer to specify the abstract tree if available.
            model_state = ckptr.load(
                ckptr.latest, abstract_state=abstract_model_state)
            loaded.append(model_state)
        start_step = ckptr.latest.step if ckptr.latest else 0
        for step in range(start_step, num_steps):
            model_state = train_step(model_state)
            # Saves a checkpoint if needed (according to `save_decision_policy`).
            ckptr.save(step, model_state)
    return loaded


def test_class_example_saves_every_1000_steps_and_resumes_from_latest(tmp_path):
    directory = tmp_path / "run"
    assert _init_example(directory, 2001) == []

    with training.Checkpointer(directory) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1000, 2000]
        assert np.array_equal(ckptr.load(2000)["params"]["w"], np.full(4, 2001, np.float32))

    # Resuming, the example re-enters its loop at latest.step, which is already saved: as in Orbax (whose
    # save raises for an existing step before it asks the policy), the save raises StepAlreadyExistsError
    # before anything is written. A loop resumes at latest.step + 1.
    with pytest.raises(ckpt.errors.StepAlreadyExistsError, match="step 2000 already exists") as info:
        _init_example(directory, 3001)
    assert info.value.step == 2000
    with training.Checkpointer(directory) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1000, 2000]
        assert np.array_equal(ckptr.load()["params"]["w"], np.full(4, 2001, np.float32))


def test_class_example_preservation_policy_keeps_latest_10_and_multiples_of_10000(tmp_path):
    policies = training.preservation_policies
    with training.Checkpointer(tmp_path, preservation_policy=policies.AnyPreservationPolicy([
        policies.LatestN(10), policies.EveryNSteps(10000)])) as ckptr:
        for step in range(0, 25000, 1000):
            ckptr.save(step, {"x": step}, force=True)
        assert [c.step for c in ckptr.checkpoints] == [0, 10000] + list(range(15000, 25000, 1000))


# ------------------------------------------------------------------------------------- save
def test_save_basic_example_saves_tree_at_step_0(tmp_path, tree):
    directory = tmp_path

    # Initialize the checkpointer for a directory
    ckptr = training.Checkpointer(directory)
    # Save the tree at step 0.
    saved = ckptr.save(step=0, state=tree)
    # Clean up background threads gracefully when the training loop ends
    ckptr.close()

    assert saved is True
    assert (directory / "0").is_dir()
    with training.Checkpointer(directory) as reader:
        _assert_tree_equal(reader.load(0), tree)


def test_save_with_metrics_and_custom_metadata_example_stores_both_with_the_step(tmp_path, tree):
    directory = tmp_path

    ckptr = training.Checkpointer(directory)
    ckptr.save(
        step=1,
        state=tree,
        metrics={'loss': 0.12, 'accuracy': 0.95},
        custom_metadata={'description': 'Model after epoch 1'},
    )
    ckptr.close()

    with training.Checkpointer(directory) as reader:
        assert reader.latest.step == 1
        assert reader.latest.metrics == {'loss': 0.12, 'accuracy': 0.95}
        assert reader.metadata(1).custom_metadata == {'description': 'Model after epoch 1'}
        _assert_tree_equal(reader.load(1), tree)


# ------------------------------------------------------------------------ save_checkpointables
def test_save_checkpointables_basic_example_saves_named_items(tmp_path, tree):
    directory = tmp_path
    my_model_state, my_opt_state = tree["params"], {"mu": np.ones(3), "count": 4}

    # Initialize the checkpointer for a directory
    ckptr = training.Checkpointer(directory)
    # Save multiple items, such as model weights and optimizer state
    items_to_save = {
        'model': my_model_state,
        'optimizer': my_opt_state,
    }
    saved = ckptr.save_checkpointables(
        step=0,
        checkpointables=items_to_save
    )
    # Clean up background threads gracefully when the training loop ends
    ckptr.close()

    assert saved is True
    with training.Checkpointer(directory) as reader:
        restored = reader.load_checkpointables(0)
    assert list(restored) == ["model", "optimizer"]
    _assert_tree_equal(restored["model"], my_model_state)
    _assert_tree_equal(restored["optimizer"], my_opt_state)


def test_save_checkpointables_with_metrics_example_stores_them_with_the_step(tmp_path, tree):
    directory, my_model_state = tmp_path, tree["params"]

    ckptr = training.Checkpointer(directory)
    items_to_save = {'model': my_model_state}
    ckptr.save_checkpointables(
        step=1,
        checkpointables=items_to_save,
        metrics={'loss': 0.12, 'accuracy': 0.95},
        custom_metadata={'description': 'Model after epoch 1'},
    )
    ckptr.close()

    with training.Checkpointer(directory) as reader:
        info = reader.checkpointables_metadata(1)
        assert info.metrics == {'loss': 0.12, 'accuracy': 0.95}
        assert info.custom_metadata == {'description': 'Model after epoch 1'}
        assert list(info.metadata) == ["model"]
        _assert_tree_equal(reader.load_checkpointables(1)["model"], my_model_state)


# ------------------------------------------------------------------------------ async saving
def test_save_async_example_result_is_true_once_committed(tmp_path, tree):
    with training.Checkpointer(tmp_path) as ckptr:
        saved = None

        async_response = ckptr.save_async(step=0, state=tree)
        if async_response is not None:
            saved = async_response.result()

        assert saved is True
        assert [c.step for c in ckptr.checkpoints] == [0]
        _assert_tree_equal(ckptr.load(0), tree)


def test_save_checkpointables_async_example_result_is_true_once_committed(tmp_path, tree):
    items_to_save = {"model": tree["params"], "data": {"epoch": 3}}
    with training.Checkpointer(tmp_path) as ckptr:
        saved = None

        async_response = ckptr.save_checkpointables_async(
            step=0,
            checkpointables=items_to_save
        )
        if async_response is not None:
            saved = async_response.result()

        assert saved is True
        restored = ckptr.load_checkpointables(0)
    _assert_tree_equal(restored["model"], items_to_save["model"])
    assert restored["data"] == {"epoch": 3}


# -------------------------------------------------------------------------------------- load
def test_load_basic_example_loads_latest_step(tmp_path):
    directory = tmp_path
    with training.Checkpointer(directory) as writer:
        writer.save(0, {"w": np.zeros(3)})
        writer.save(5, {"w": np.ones(3)}, force=True)

    # Initialize the checkpointer for the directory
    ckptr = training.Checkpointer(directory)
    # Load the saved PyTree from latest step
    restored_tree = ckptr.load(step=None)

    ckptr.close()
    _assert_tree_equal(restored_tree, {"w": np.ones(3)})


def _save_model_and_optimizer(directory, step=1):
    rng = np.random.default_rng(0)
    items = {
        "model": {"weights": rng.standard_normal((128, 128), np.float32),
                  "bias": rng.standard_normal(128, np.float32)},
        "optimizer": {"momentum": rng.standard_normal((128, 128), np.float32)},
    }
    with training.Checkpointer(directory) as writer:
        writer.save_checkpointables(step, items, force=True)
    return items


def test_load_with_abstract_pytree_example_returns_jax_arrays_of_target_shapes(tmp_path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    directory = tmp_path
    model = _save_model_and_optimizer(directory)["model"]
    with training.Checkpointer(directory) as writer:
        writer.save(1, model, overwrite=True, force=True)

    ckptr = training.Checkpointer(directory)
    # Define the expected structure (shapes and dtypes) to restore into
    target_structure = {
        'weights': jax.ShapeDtypeStruct((128, 128), dtype=jnp.float32),
        'bias': jax.ShapeDtypeStruct((128,), dtype=jnp.float32)
    }
    # Restore exactly matching the target structure
    restored_tree = ckptr.load(
        step=1,
        abstract_state=target_structure
    )
    ckptr.close()

    assert set(restored_tree) == {"weights", "bias"}
    for key, target in target_structure.items():
        assert isinstance(restored_tree[key], jax.Array)
        assert restored_tree[key].shape == target.shape and restored_tree[key].dtype == target.dtype
        assert np.array_equal(np.asarray(restored_tree[key]), model[key])


# ------------------------------------------------------------------------ load_checkpointables
def test_load_checkpointables_basic_example_loads_all_items_of_latest(tmp_path):
    directory = tmp_path
    items = _save_model_and_optimizer(directory)

    # Initialize the checkpointer for the directory
    ckptr = training.Checkpointer(directory)
    # Load all checkpointables saved at the latest step
    restored_items = ckptr.load_checkpointables(step=None)
    # Access the individual components by their original string keys
    my_model = restored_items["model"]
    my_opt = restored_items["optimizer"]
    ckptr.close()

    _assert_tree_equal(my_model, items["model"])
    _assert_tree_equal(my_opt, items["optimizer"])


def test_load_checkpointables_with_abstract_example_matches_target_structures(tmp_path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    directory = tmp_path
    items = _save_model_and_optimizer(directory)

    ckptr = training.Checkpointer(directory)
    # Define the expected structure for each named item using JAX arrays
    target_items = {
        "model": {
            'weights': jax.ShapeDtypeStruct((128, 128), jnp.float32),
            'bias': jax.ShapeDtypeStruct((128,), jnp.float32)
        },
        "optimizer": {
            'momentum': jax.ShapeDtypeStruct((128, 128), jnp.float32)
        }
    }
    # Restore exactly matching the target structures
    restored_items = ckptr.load_checkpointables(
        step=1,
        abstract_checkpointables=target_items
    )
    ckptr.close()

    assert jax.tree.structure(restored_items) == jax.tree.structure(target_items)
    for name, tree in target_items.items():
        for key, target in tree.items():
            got = restored_items[name][key]
            assert isinstance(got, jax.Array) and got.shape == target.shape and got.dtype == target.dtype
            assert np.array_equal(np.asarray(got), items[name][key])


def test_load_checkpointables_partial_example_loads_only_the_given_items(tmp_path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    directory = tmp_path
    items = _save_model_and_optimizer(directory)

    ckptr = training.Checkpointer(directory)
    # Define abstract structure for ONLY the items to load
    target_items = {
        "model": {
            'weights': jax.ShapeDtypeStruct((128, 128), jnp.float32),
            'bias': jax.ShapeDtypeStruct((128,), jnp.float32)
        },
    }
    # Load only "model", omitting "optimizer"
    restored_items = ckptr.load_checkpointables(
        step=1,
        abstract_checkpointables=target_items
    )
    my_model = restored_items["model"]
    ckptr.close()

    assert list(restored_items) == ["model"]
    assert np.array_equal(np.asarray(my_model["weights"]), items["model"]["weights"])
    assert np.array_equal(np.asarray(my_model["bias"]), items["model"]["bias"])
