"""ckpt.integrations.flax: restore_train_state (Linen, NNX, sharded) and CheckpointHook."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx, struct  # noqa: E402
from flax.core import FrozenDict  # noqa: E402
from flax.training import train_state  # noqa: E402

import ckpt  # noqa: E402
from ckpt.integrations.flax import CheckpointHook, restore_train_state  # noqa: E402
from ckpt.training import Checkpointer, errors, save_decision_policies  # noqa: E402
from tests import procs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# Helpers


class Net(nn.Module):
    """Dense -> BatchNorm -> Dense: parameters plus batch statistics."""

    features: tuple[int, ...] = (8, 2)
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.features[0], param_dtype=self.param_dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, param_dtype=self.param_dtype)(x)
        for width in self.features[1:]:
            x = nn.Dense(width, param_dtype=self.param_dtype)(nn.relu(x))
        return x


class ExtendedState(train_state.TrainState):
    """A TrainState subclass with the extra fields real loops add."""

    batch_stats: Any
    rng: jax.Array  # a typed key
    raw_rng: jax.Array  # a legacy uint32 key


def schedule_chain() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(1e-2, 1e-3, 10)))


def create_state(seed: int = 0, *, model: Net = Net(), tx: optax.GradientTransformation | None = None) -> ExtendedState:
    variables = model.init(jax.random.key(seed), jnp.ones((1, 3)))
    return ExtendedState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx or schedule_chain(),
        batch_stats=variables["batch_stats"], rng=jax.random.key(seed + 1), raw_rng=jax.random.PRNGKey(seed + 2),
    )


def grads_like(state: train_state.TrainState, value: float = 0.5) -> Any:
    return jax.tree.map(lambda p: jnp.full_like(p, value), state.params)


def trained(state: ExtendedState, steps: int = 2) -> ExtendedState:
    """``steps`` updates that touch every field: params, opt state, batch stats, both keys, step."""
    for _ in range(steps):
        rng, _ = jax.random.split(state.rng)
        raw_rng, _ = jax.random.split(state.raw_rng)
        stats = jax.tree.map(lambda s: s + 1, state.batch_stats)
        state = state.apply_gradients(grads=grads_like(state), rng=rng, raw_rng=raw_rng, batch_stats=stats)
    return state


def physical(leaf: Any) -> np.ndarray:
    """The leaf's bits as numpy: typed keys as their key data."""
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def assert_same_leaves(actual: Any, expected: Any) -> None:
    """Same key paths, dtypes and bits (typed keys compared by key data)."""
    actual_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(actual)[0]}
    expected_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    assert actual_leaves.keys() == expected_leaves.keys()
    for path, want in expected_leaves.items():
        got = actual_leaves[path]
        assert getattr(got, "dtype", type(got)) == getattr(want, "dtype", type(want)), path
        assert physical(got).tobytes() == physical(want).tobytes(), path


@pytest.fixture(scope="module")
def run_script(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """Runs a Python script from the repository root, bounded by SCRIPT_TIMEOUT_S.

    The scripts share a JAX compilation cache, so only the first run of a loop pays for compiling it.
    """
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S, env={**os.environ, **cache, **(env or {})})

    return run


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"


@pytest.fixture
def ckptr(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        yield checkpointer


@pytest.fixture
def no_preemption():
    ckpt.preemption.reset()
    yield
    ckpt.preemption.reset()


# ---------------------------------------------------------------------------------------------
# restore_train_state: Linen / any pytree


def test_restore_into_eval_shape_gives_train_state_whose_apply_gradients_works(ckptr):
    state = trained(create_state())
    ckptr.save(2, state, force=True)
    abstract = jax.eval_shape(create_state)

    restored = restore_train_state(ckptr, abstract)

    assert type(restored) is ExtendedState
    assert restored.tx is abstract.tx and restored.apply_fn == state.apply_fn
    assert isinstance(restored.step, jax.Array) and restored.step.dtype == jnp.int32  # saved as the int 2
    assert_same_leaves(restored.params, state.params)
    stepped = restored.apply_gradients(grads=grads_like(restored))
    expected = state.apply_gradients(grads=grads_like(state))
    assert_same_leaves((stepped.params, stepped.opt_state), (expected.params, expected.opt_state))
    assert int(stepped.step) == 3


def test_restore_keeps_subclass_fields_static_fields_and_optax_state_types(ckptr):
    state = trained(create_state())
    ckptr.save(2, state, force=True)
    target = create_state(seed=7)

    restored = restore_train_state(ckptr, target)

    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(target)
    assert restored.apply_fn is target.apply_fn and restored.tx is target.tx
    clip_state, (adam_state, decay_state, schedule_state) = restored.opt_state
    assert type(clip_state) is type(decay_state) is optax.EmptyState
    assert type(adam_state) is optax.ScaleByAdamState and type(schedule_state) is optax.ScaleByScheduleState
    assert_same_leaves(restored, state)


def test_typed_and_raw_keys_bfloat16_params_and_int32_step_round_trip_exactly(ckptr):
    def create_bf16_state(seed: int = 0) -> ExtendedState:
        return create_state(seed, model=Net(param_dtype=jnp.bfloat16)).replace(step=jnp.int32(0))

    state = trained(create_bf16_state(), steps=3)
    ckptr.save(3, state, force=True)

    for target in (create_bf16_state(seed=5), jax.eval_shape(create_bf16_state)):
        restored = restore_train_state(ckptr, target)

        assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
        assert restored.raw_rng.dtype == jnp.uint32 and restored.raw_rng.shape == (2,)
        assert {leaf.dtype for leaf in jax.tree.leaves(restored.params)} == {jnp.dtype(jnp.bfloat16)}
        assert restored.step.dtype == jnp.int32 and int(restored.step) == 3
        assert_same_leaves(restored, state)


@struct.dataclass
class StaticOnly:
    """A flax struct dataclass whose fields are all static: a pytree node without children."""

    name: str = struct.field(pytree_node=False, default="adam")


def test_registered_pytree_nodes_without_children_are_saved_and_restored_as_nodes(ckptr):
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    state = {"params": FrozenDict({"w": jnp.ones(2)}), "batch_stats": FrozenDict({}), "config": StaticOnly(),
             "nnx_stats": nnx.state(model, nnx.BatchStat)}  # a filter that matches nothing: an empty nnx.State
    ckptr.save(1, state, force=True)

    restored = restore_train_state(ckptr, state)

    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    assert restored["batch_stats"] == FrozenDict({}) and restored["config"] == StaticOnly()
    assert ckptr.load(1, None)["batch_stats"] is None  # without an abstract tree: as an optax EmptyState


def test_restore_without_checkpoint_returns_target_unchanged(ckptr):
    target = create_state()
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.kernel[...])

    assert restore_train_state(ckptr, target) is target
    assert restore_train_state(ckptr, model) is model
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), kernel)


def test_restore_of_missing_step_raises_step_not_found(ckptr):
    ckptr.save(1, {"w": np.zeros(2)}, force=True)
    with pytest.raises(errors.StepNotFoundError):
        restore_train_state(ckptr, {"w": np.ones(2)}, step=5)


def test_restore_into_another_model_raises_error_listing_differing_key_paths(ckptr):
    ckptr.save(1, create_state(model=Net(features=(8, 2))), force=True)
    target = create_state(model=Net(features=(4, 2, 2)))

    with pytest.raises(ValueError) as raised:
        restore_train_state(ckptr, target)

    message = str(raised.value)
    for path in ("['Dense_0']['kernel']", "['Dense_2']", "['BatchNorm_0']['mean']", ".mu['Dense_0']['bias']"):
        assert path in message, f"{path} missing from: {message}"


def test_restore_of_a_saved_str_into_an_array_leaf_raises_a_mismatch_naming_the_key_path(ckptr):
    ckptr.save(1, {"w": np.ones(2), "step": "3"}, force=True)
    target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}

    with pytest.raises(errors.TreeMismatchError, match=r"\['step'\]: saved a str value"):
        restore_train_state(ckptr, target)


def test_restore_with_another_optimizer_chain_raises_error_listing_differing_key_paths(ckptr):
    ckptr.save(1, create_state(tx=optax.adam(1e-3)), force=True)
    target = create_state(tx=optax.sgd(1e-3, momentum=0.9))

    with pytest.raises(ValueError) as raised:
        restore_train_state(ckptr, target)

    message = str(raised.value)
    paths = (".opt_state[0].count", ".opt_state[0].mu['Dense_0']['kernel']", ".opt_state[0].trace['Dense_1']['bias']")
    for path in paths:
        assert path in message, f"{path} missing from: {message}"


# ---------------------------------------------------------------------------------------------
# restore_train_state: NNX


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.norm(self.linear(x)))


def create_nnx(seed: int) -> tuple[NnxNet, nnx.Optimizer]:
    model = NnxNet(nnx.Rngs(params=seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@nnx.jit
def nnx_step(model: NnxNet, optimizer: nnx.Optimizer, x: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_model_optimizer_and_rngs_are_restored_in_place(ckptr):
    model, optimizer = create_nnx(seed=0)
    rngs = nnx.Rngs(data=0)  # a loop's own stream, e.g. for shuffling
    for _ in range(2):
        nnx_step(model, optimizer, jax.random.normal(rngs.data(), (5, 3)))
    assert CheckpointHook(ckptr, final_step=2)(2, (model, optimizer, rngs))
    other = (*create_nnx(seed=9), nnx.Rngs(data=9))

    restored = restore_train_state(ckptr, other)

    assert all(r is o for r, o in zip(restored, other))
    assert_same_leaves(nnx.state(other), nnx.state((model, optimizer, rngs)))
    assert int(other[0].dropout.rngs.count[...]) == int(model.dropout.rngs.count[...]) == 2
    losses = [float(nnx_step(m, o, jax.random.normal(r.data(), (5, 3))))
              for m, o, r in ((model, optimizer, rngs), other)]
    assert losses[0] == losses[1]  # same data and dropout mask: both Rngs streams continued where they were saved
    assert_same_leaves(nnx.state(other), nnx.state((model, optimizer, rngs)))


class SowingNet(NnxNet):
    def __call__(self, x):
        y = super().__call__(x)
        self.sow(nnx.Intermediate, "activations", y)  # (an auxiliary loss or a logged activation)
        return y


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside of 'nnx.capture\\(\\)':DeprecationWarning")  # (flax 0.12 deprecates it; models still sow)
def test_nnx_model_that_sows_intermediates_is_saved_without_them_and_restored_into_a_fresh_model(ckptr):
    """The hook saved nnx.state(model), the last call's nnx.Intermediate values included (outputs of a step,
    not state): a fresh model has none, and restore_train_state raised a TreeMismatchError."""
    model = SowingNet(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    nnx_step(model, optimizer, jnp.ones((5, 3)))
    assert nnx.state(model, nnx.Intermediate)  # the model holds what its call sowed
    assert CheckpointHook(ckptr, final_step=1)(1, (model, optimizer))
    fresh = SowingNet(nnx.Rngs(params=9, dropout=9))
    fresh_optimizer = nnx.Optimizer(fresh, optax.adamw(1e-2), wrt=nnx.Param)

    restore_train_state(ckptr, (fresh, fresh_optimizer))

    assert_same_leaves(nnx.state((fresh, fresh_optimizer), nnx.Not(nnx.Intermediate)),
                       nnx.state((model, optimizer), nnx.Not(nnx.Intermediate)))


def test_nnx_target_with_none_leaves_receives_the_values_as_saved_there(ckptr):
    """A None beside NNX objects (what the loop does not rebuild) failed with jax's 'pytree structure error'."""
    model, optimizer = create_nnx(seed=0)
    assert CheckpointHook(ckptr, final_step=1)(1, {"model": model, "optimizer": optimizer, "epoch": 3})
    fresh = create_nnx(seed=5)[0]

    restored = restore_train_state(ckptr, {"model": fresh, "optimizer": None, "epoch": None})

    assert restored["model"] is fresh and restored["epoch"] == 3
    assert_same_leaves(restored["optimizer"], ckptr.load(1)["optimizer"])
    assert_same_leaves(nnx.state(fresh), nnx.state(model))


def test_dicts_with_int_and_str_keys_are_saved_by_the_hook_and_restored_beside_nnx_objects(ckptr):
    """With flax.nnx imported, the hook and restore_train_state failed on such a dict ('Comparator raised
    exception while sorting pytree dictionary keys': jax sorts a dict's keys) before anything was saved."""
    model, _ = create_nnx(seed=0)
    assert CheckpointHook(ckptr, final_step=1)(1, {0: jnp.arange(2.0), "a": {1: model, "b": jnp.ones(3)}})
    fresh = create_nnx(seed=5)[0]

    restored = restore_train_state(ckptr, {0: jnp.zeros(2), "a": {1: fresh, "b": jnp.zeros(3)}})

    assert list(restored) == [0, "a"] and list(restored["a"]) == [1, "b"] and restored["a"][1] is fresh
    assert_same_leaves(nnx.state(fresh), nnx.state(model))
    assert_same_leaves([restored[0], restored["a"]["b"]], [jnp.arange(2.0), jnp.ones(3)])


def test_nnx_abstract_model_alone_is_restored_in_place(ckptr):
    model, _ = create_nnx(seed=0)
    ckptr.save(1, nnx.state(model), force=True)
    abstract_model = nnx.eval_shape(lambda: create_nnx(seed=3)[0])

    assert restore_train_state(ckptr, abstract_model) is abstract_model
    assert_same_leaves(nnx.state(abstract_model), nnx.state(model))


# ---------------------------------------------------------------------------------------------
# CheckpointHook


def deleted_arrays() -> tuple[dict, dict]:
    """A state and metrics whose buffers are gone: any host transfer of them raises."""
    state, metrics = {"w": jnp.ones((4,))}, {"loss": jnp.float32(0.5)}
    for leaf in jax.tree.leaves((state, metrics)):
        leaf.delete()
    return state, metrics

@pytest.mark.skipif(not hasattr(nnx, "var_defaults"), reason="flax before 0.12 has no ref or hijax Variables")
@pytest.mark.parametrize("mode", ["ref", "hijax"])
def test_nnx_model_built_with_ref_or_hijax_variables_is_saved_as_a_plain_model_and_restored_in_its_mode(
        ckptr, mode):
    """Under nnx.var_defaults(ref=True) (or hijax=True) a model's values are jax.Refs (or hijax Variables),
    which are not arrays: the hook raised UnregisteredTypeError naming '[0]['linear']['bias'].value', as
    Orbax refuses them too."""
    with nnx.var_defaults(**{mode: True}):
        model, optimizer = create_nnx(seed=0)
        fresh, fresh_optimizer = create_nnx(seed=5)
    plain_model, _ = create_nnx(seed=0)
    for variable in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        variable[...] = variable[...] + 1  # a training step's write (through the Ref in ref mode)
    assert CheckpointHook(ckptr, final_step=1)(1, (model, optimizer))
    kernel = fresh.linear.kernel

    restore_train_state(ckptr, (fresh, fresh_optimizer))

    assert fresh.linear.kernel is kernel and getattr(kernel, mode)
    assert (type(kernel.get_raw_value()).__name__ == "Ref") == (mode == "ref")  # (a fresh Ref, not the model's)
    assert_same_leaves(nnx.as_pure(nnx.state((fresh, fresh_optimizer))), nnx.as_pure(nnx.state((model, optimizer))))
    saved = ckptr.load(1, (nnx.state(plain_model), None))[0]  # a plain model's key paths
    assert_same_leaves(nnx.as_pure(saved), nnx.as_pure(nnx.state(model)))
    kernel[...] = kernel[...] * 0  # writes go to the fresh model alone
    assert not np.array_equal(np.asarray(kernel[...]), np.asarray(model.linear.kernel[...]))


def test_hook_decides_before_touching_state_or_metrics_on_steps_it_skips(tmp_path, no_preemption):
    policy = save_decision_policies.FixedIntervalPolicy(10)
    with Checkpointer(tmp_path, save_decision_policy=policy) as checkpointer:
        hook = CheckpointHook(checkpointer, final_step=100)
        state, metrics = deleted_arrays()

        assert [hook(step, state, metrics) for step in range(1, 10)] == [False] * 9
        assert checkpointer.latest is None


def test_hook_asks_flax_whether_a_leaf_is_an_nnx_object_once_per_type_not_once_per_leaf(tmp_path, no_preemption,
                                                                                        monkeypatch):
    """Each save of a Linen state asked nnx.graph.is_graph_node of every leaf (microseconds each, where flax.nnx
    is imported): 0.27 s of blocking per save of 50,000 leaves, about as long as the save's own."""
    asked = []
    is_graph_node = nnx.graph.is_graph_node
    monkeypatch.setattr(nnx.graph, "is_graph_node", lambda x: asked.append(type(x)) or is_graph_node(x))
    state = {"params": {f"w{i}": np.full(2, i, np.float32) for i in range(1000)}, "step": jnp.int32(1),
             "opt": (optax.EmptyState(), {"mu": jnp.zeros(2)})}
    with Checkpointer(tmp_path) as checkpointer:
        for step in (1, 2):
            CheckpointHook(checkpointer, final_step=step)(step, state)
        assert [c.step for c in checkpointer.checkpoints] == [1, 2]
    assert len(asked) == len(set(asked)) <= 6, asked[:10]  # (dict, ndarray, jax array, tuple, EmptyState)


def test_hook_saves_due_steps_asynchronously_from_a_snapshot_with_metrics(tmp_path, no_preemption):
    policy = save_decision_policies.FixedIntervalPolicy(10)
    with Checkpointer(tmp_path, save_decision_policy=policy) as checkpointer:
        hook = CheckpointHook(checkpointer)
        state = {"w": jnp.arange(4.0), "step": jnp.int32(10)}

        assert hook(10, state, {"loss": jnp.float32(0.25)}) is False
        for leaf in jax.tree.leaves(state):
            leaf.delete()  # as a jitted step with donate_argnums does
        checkpointer.wait()

        assert checkpointer.latest.step == 10 and checkpointer.latest.metrics == {"loss": 0.25}
        restored = checkpointer.load(10)
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))


def test_hook_forces_a_committed_save_at_final_step_and_stops(tmp_path, no_preemption):
    policy = save_decision_policies.FixedIntervalPolicy(100)
    with Checkpointer(tmp_path, save_decision_policy=policy) as checkpointer:
        hook = CheckpointHook(checkpointer, final_step=7)

        assert hook(6, {"w": np.zeros(2)}) is False
        assert hook(np.int64(6), {"w": np.zeros(2)}) is False  # a step of numpy's or jax's: still a bool
        assert hook(jnp.asarray(7), {"w": np.ones(2)}) is True
        assert not checkpointer.is_saving_in_progress()
        assert [c.step for c in checkpointer.checkpoints] == [7]


def test_hook_at_an_already_saved_final_step_stops_without_saving_again(tmp_path, no_preemption):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(7, {"w": np.zeros(2)}, force=True)
        hook = CheckpointHook(checkpointer, final_step=7)

        assert hook(7, {"w": np.ones(2)}) is True
        np.testing.assert_array_equal(checkpointer.load(7)["w"], np.zeros(2))


def test_hook_on_preemption_saves_the_step_waits_and_tells_the_loop_to_stop(tmp_path, no_preemption):
    policy = save_decision_policies.FixedIntervalPolicy(100)
    with Checkpointer(tmp_path, save_decision_policy=policy) as checkpointer:
        hook = CheckpointHook(checkpointer, final_step=1000)
        assert hook(3, {"w": np.zeros(2)}) is False

        ckpt.preemption.notify()

        assert hook(4, {"w": np.ones(2)}) is True
        assert not checkpointer.is_saving_in_progress()
        assert [c.step for c in checkpointer.checkpoints] == [4]


# ---------------------------------------------------------------------------------------------
# Whole loops in subprocesses: kill, preemption, resume; sharding; the examples


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, run_script) -> dict[str, np.ndarray]:
    """The final state of the Linen loop run from step 0 to 12 without interruption."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = run_script("tests/flax_resume_loop.py", str(directory / "ckpt"), str(directory / "final.npz"),
                        "--steps", "12", "--save-every", "4")
    assert result.returncode == 0, output_of(result)
    return dict(np.load(directory / "final.npz"))


def assert_same_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    assert any(".rng" in name for name in expected) and any(".opt_state" in name for name in expected)
    for name, want in expected.items():
        assert actual[name].dtype == want.dtype and actual[name].tobytes() == want.tobytes(), name


def test_jitted_donating_loop_killed_after_checkpoint_resumes_to_same_params_opt_state_and_rng(
        tmp_path, run_script, uninterrupted_run):
    loop = ("tests/flax_resume_loop.py", str(tmp_path / "ckpt"), str(tmp_path / "final.npz"),
            "--steps", "12", "--save-every", "4")

    killed = run_script(*loop, "--sigkill-at", "6")
    assert killed.returncode == -9, output_of(killed)
    resumed = run_script(*loop)

    assert resumed.returncode == 0, output_of(resumed)
    assert "start 4" in resumed.stdout
    assert_same_arrays(dict(np.load(tmp_path / "final.npz")), uninterrupted_run)


def test_jitted_donating_loop_killed_while_a_save_is_written_resumes_to_same_params_opt_state_and_rng(
        tmp_path, run_script, uninterrupted_run):
    loop = ("tests/flax_resume_loop.py", str(tmp_path / "ckpt"), str(tmp_path / "final.npz"),
            "--steps", "12", "--save-every", "4")

    killed = run_script(*loop, "--sigkill-saving-at", "8")  # step 8's save started, its commit not awaited
    assert killed.returncode == -9, output_of(killed)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        listed = [c.step for c in checkpointer.checkpoints]
    assert listed in ([4], [4, 8])  # step 8 committed whole or not listed
    resumed = run_script(*loop)

    assert resumed.returncode == 0, output_of(resumed)
    assert f"start {listed[-1]}" in resumed.stdout
    assert_same_arrays(dict(np.load(tmp_path / "final.npz")), uninterrupted_run)


def test_sigterm_saves_the_current_step_stops_and_resumes_to_same_state(tmp_path, run_script, uninterrupted_run):
    loop = ("tests/flax_resume_loop.py", str(tmp_path / "ckpt"), str(tmp_path / "final.npz"),
            "--steps", "12", "--save-every", "4")

    preempted = run_script(*loop, "--sigterm-at", "6")
    assert preempted.returncode == 0 and "stop 6" in preempted.stdout, output_of(preempted)
    resumed = run_script(*loop)

    assert resumed.returncode == 0, output_of(resumed)
    assert "start 6" in resumed.stdout
    assert_same_arrays(dict(np.load(tmp_path / "final.npz")), uninterrupted_run)


_LOOP_ENDING_UNCLOSED = """
import sys
import jax.numpy as jnp
from ckpt.integrations.flax import CheckpointHook
from ckpt.training import Checkpointer

ckptr = Checkpointer(sys.argv[1])
hook = CheckpointHook(ckptr, final_step=3)
for step in range(1, 4):
    hook(step, {"w": jnp.full(2, step)})
"""


def test_a_script_whose_global_checkpointer_is_never_closed_exits_without_an_error_printed(tmp_path):
    done = procs.run_script(_LOOP_ENDING_UNCLOSED, str(tmp_path))

    assert done.returncode == 0 and done.stderr == "", done.stderr
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest.step == 3


def test_restore_with_sharding_places_every_leaf_with_that_sharding(tmp_path, run_script):
    result = run_script("tests/flax_sharded_restore.py", str(tmp_path),
                        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), output_of(result)


def final_checkpoint(directory: Path, step: int) -> dict[str, np.ndarray]:
    with Checkpointer(directory) as checkpointer:
        loaded = checkpointer.load(step)
    return {jax.tree_util.keystr(p): physical(v) for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}


@pytest.mark.parametrize("example", ["flax_train.py", "nnx_train.py"])
def test_example_started_again_resumes_and_ends_like_an_uninterrupted_run(tmp_path, run_script, example):
    script = f"examples/{example}"
    first = run_script(script, "--directory", str(tmp_path / "resumed"), "--steps", "6", "--save-every", "3")
    assert first.returncode == 0 and "starting from scratch" in first.stdout, output_of(first)
    again = run_script(script, "--directory", str(tmp_path / "resumed"), "--steps", "12", "--save-every", "3")
    assert again.returncode == 0 and "resumed from step 6" in again.stdout, output_of(again)
    straight = run_script(script, "--directory", str(tmp_path / "straight"), "--steps", "12", "--save-every", "3")
    assert straight.returncode == 0, output_of(straight)

    resumed, uninterrupted = final_checkpoint(tmp_path / "resumed", 12), final_checkpoint(tmp_path / "straight", 12)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 4
    for name, want in uninterrupted.items():
        assert resumed[name].dtype == want.dtype and resumed[name].tobytes() == want.tobytes(), name


def test_hook_with_two_tiers_saves_each_step_where_its_policies_want_it_and_the_final_step_to_both(
        tmp_path, no_preemption):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=save_decision_policies.FixedIntervalPolicy(2))
    with Checkpointer(tmp_path / "durable", save_decision_policy=save_decision_policies.FixedIntervalPolicy(4),
                      local=local) as checkpointer:
        hook = CheckpointHook(checkpointer, final_step=7)
        assert [hook(step, {"w": jnp.full(3, step)}) for step in range(1, 8)] == [False] * 6 + [True]
        assert [(c.step, sorted(c.locations)) for c in checkpointer.checkpoints] == [
            (4, ["durable"]), (6, ["local"]), (7, ["durable", "local"])]
    with Checkpointer(tmp_path / "durable") as durable:
        np.testing.assert_array_equal(np.asarray(durable.load(7)["w"]), np.full(3, 7))
