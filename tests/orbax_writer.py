"""Writes real Orbax runs (orbax-checkpoint, in this process) in every layout ckpt reads, for test_orbax_runs.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/orbax_writer.py DIRECTORY

DIRECTORY/flax:   v1 training.Checkpointer (OCDBT, zarr3): the Linen TrainState of examples/flax_train.py
                  (AdamW: EmptyStates, a typed dropout key), saved at steps 2, 4, 6 with their loss
DIRECTORY/v1:     v1 save_checkpointables: ``state`` (:func:`mixed_state`) and ``extra``, steps 0 and 1, with
                  custom metadata for the root and each step
DIRECTORY/single: v0 CheckpointManager, one item (default/), names step_0003, step_0005 (prefix, zero padding)
DIRECTORY/named:  v0 CheckpointManager, named items: model (PyTreeCheckpointHandler, use_ocdbt=False),
                  cfg (JsonCheckpointHandler), std (StandardCheckpointHandler), step 7
DIRECTORY/nnx:    v1 training.Checkpointer: ``nnx.state((model, optimizer))`` of examples/nnx_train.py after
                  :func:`nnx_run`, step 1 (Orbax stores its int keys, 0 and 1 and the optax chain's, as text)
DIRECTORY/keys:   v0 CheckpointManager, named items ocdbt and files (PyTreeCheckpointHandler, OCDBT on and off):
                  ``HAIKU_PARAMS``, whose keys hold '/' as Haiku's do; ints: ``INT_KEYS``, a dict of int keys; step 1
DIRECTORY/array:  v0 CheckpointManager, named items: arr (ArrayCheckpointHandler, ``ARRAY`` times the step)
                  and std (StandardCheckpointHandler), steps 1 and 2
DIRECTORY/direct: v0 direct checkpoints, one tree in the directory itself: 3 (StandardCheckpointer, without
                  the string) and 4 (PyTreeCheckpointer), :func:`mixed_state` of the step
DIRECTORY/direct_json: a v0 JSON item saved at a path of its own (JsonCheckpointHandler)
DIRECTORY/rich:   v1 training.Checkpointer with PyTreeMetadataOptions(support_rich_types=True): :func:`mixed_state`
                  of step 0 (optax's EmptyState stored as an empty NamedTuple)
DIRECTORY/leaf:   v1 checkpoints of a tree that is one leaf (``ocp.save(path, ARRAY)``): array (OCDBT), files
                  (``use_ocdbt=False``) and string (``"hello"``)
DIRECTORY/partial: a v1 checkpoint saved in two parts (``ocp.partial``): :data:`PARTS`, finalized
DIRECTORY/handled: v1 save_checkpointables_async, names ckpt_002: ``state``, ``vocab`` (a custom handler's,
                  registered globally) and ``counter`` (a StatefulCheckpointable), of tests/test_custom_checkpointables

The values are functions of the step (:func:`mixed_state`, :func:`flax_run`), so a test rebuilds them
without Orbax and compares bit for bit. Everything but ``main`` imports without orbax.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import flax_train  # noqa: E402
import nnx_train  # noqa: E402

FLAX_SAVES = (2, 4, 6)
ARRAY = np.arange(6, dtype=np.int32).reshape(2, 3)
HAIKU_PARAMS = {"mlp/~/linear_0": {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32)},
                "mlp/~/linear_1": {"w": np.arange(3, dtype=np.int16)}}
INT_KEYS = {"layers": {0: np.arange(2.0), 1: np.ones(2), 10: np.zeros(1)}}
PARTS = ({"w": np.arange(6.0).reshape(2, 3), "n": {"step": 5}}, {"b": np.ones(2, np.int32), "n": {"name": "mlp"}})


def mixed_state(step: int, *, string: bool = True) -> dict:
    """Leaves of every kind Orbax stores: jax arrays (bf16, a sharded one when there are 2 devices),
    numpy arrays, a typed PRNG key, Python scalars, a string, None, empty containers and optax's
    NamedTuple and EmptyState states. ``string=False`` leaves the string out (StandardSave refuses it)."""
    params = {"w": jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3) * (step + 1),
              "b": jnp.linspace(-1, 1, 5, dtype=jnp.bfloat16)}
    if len(jax.devices()) == 2:
        mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))  # Orbax records the axis types
        params["w"] = jax.device_put(params["w"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = {"params": params, "opt_state": tx.init(params), "key": jax.random.key(step),
             "table": np.arange(4 * step, 4 * step + 12, dtype=np.int16).reshape(3, 4), "step": step,
             "lr": 0.5 / (step + 1), "flag": True, "nothing": None, "empty": {}, "none_list": []}
    return {**state, "name": f"run-{step}"} if string else state


def mixed_abstract(step: int = 0, *, string: bool = True) -> dict:
    """:func:`mixed_state` with its jax arrays as ``jax.ShapeDtypeStruct`` (typed key included)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x,
                        mixed_state(step, string=string))


def flax_run(steps: int, start=None):
    """The TrainState of examples/flax_train.py after ``steps`` steps (from ``start``: a state and its step)."""
    state = flax_train.create_state() if start is None else start
    losses = {}
    for step in range(int(state.step) + 1, steps + 1):
        state, loss = flax_train.train_step(state, *flax_train.synthetic_batch(step))
        losses[step] = float(loss)
    return state, losses


def nnx_run() -> tuple:
    """The model and optimizer of examples/nnx_train.py after one training step."""
    model, optimizer = nnx_train.create()
    nnx_train.train_step(model, optimizer, *nnx_train.synthetic_batch(1))
    return model, optimizer


def main(directory: Path) -> None:
    import orbax.checkpoint as ocp
    from orbax.checkpoint.experimental.v1 import training

    state = flax_train.create_state()
    with training.Checkpointer(directory / "flax") as ckptr:
        for step in range(1, FLAX_SAVES[-1] + 1):
            state, loss = flax_train.train_step(state, *flax_train.synthetic_batch(step))
            if step in FLAX_SAVES:
                ckptr.save(step, state, metrics={"loss": float(loss)}, force=True)

    with training.Checkpointer(directory / "v1", custom_metadata={"model": "mixed"}) as ckptr:
        for step in (0, 1):
            ckptr.save_checkpointables(step, {"state": mixed_state(step), "extra": {"a": np.arange(3) + step}},
                                       metrics={"loss": 1.0 / (step + 1)}, custom_metadata={"at": step}, force=True)

    with training.Checkpointer(directory / "v1_pytree") as ckptr:  # Orbax before 0.12 named the state "pytree"
        ckptr.save_checkpointables(0, {"pytree": mixed_state(0)}, force=True)

    options = ocp.CheckpointManagerOptions(step_prefix="step", step_format_fixed_length=4,
                                           best_fn=lambda m: m["acc"], best_mode="max")
    with ocp.CheckpointManager(directory / "single", options=options) as manager:
        for step in (3, 5):
            manager.save(step, args=ocp.args.StandardSave(mixed_state(step, string=False)), metrics={"acc": step / 10})

    handlers = {"model": ocp.PyTreeCheckpointHandler(use_ocdbt=False), "cfg": ocp.JsonCheckpointHandler(),
                "std": ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(directory / "named", item_names=tuple(handlers), item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"])) as manager:
        manager.save(7, args=ocp.args.Composite(model=ocp.args.PyTreeSave(mixed_state(7)),
                                                cfg=ocp.args.JsonSave({"lr": 0.1, "layers": [64, 1], "name": "mlp"}),
                                                std=ocp.args.StandardSave({"x": np.arange(6.0).reshape(2, 3)})),
                     metrics={"loss": 0.25})

    from flax import nnx
    with training.Checkpointer(directory / "nnx") as ckptr:
        ckptr.save(1, nnx.state(nnx_run()), force=True)

    handlers = {"ocdbt": ocp.PyTreeCheckpointHandler(), "files": ocp.PyTreeCheckpointHandler(use_ocdbt=False)}
    with ocp.CheckpointManager(directory / "keys", item_names=(*handlers, "ints"),
                               item_handlers={**handlers, "ints": ocp.PyTreeCheckpointHandler()}) as manager:
        manager.save(1, args=ocp.args.Composite(**{name: ocp.args.PyTreeSave(HAIKU_PARAMS) for name in handlers},
                                                ints=ocp.args.PyTreeSave(INT_KEYS)))

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:  # a JSON item at a path of its own
        checkpointer.save(directory / "direct_json", {"lr": 0.1, "layers": [64, 1], "name": "mlp"})

    with ocp.CheckpointManager(directory / "array") as manager:
        for step in (1, 2):
            manager.save(step, args=ocp.args.Composite(arr=ocp.args.ArraySave(ARRAY * step),
                                                       std=ocp.args.StandardSave({"x": np.float32(step)})))

    from orbax.checkpoint import v1
    v1.save(directory / "leaf" / "array", ARRAY)
    with v1.Context(array_options=v1.options.ArrayOptions(saving=v1.options.ArrayOptions.Saving(use_ocdbt=False))):
        v1.save(directory / "leaf" / "files", ARRAY)
    v1.save(directory / "leaf" / "string", "hello")

    for part in PARTS:
        v1.partial.save(directory / "partial", part)
    v1.partial.finalize(directory / "partial")

    from orbax.checkpoint._src.metadata.pytree_metadata_options import PyTreeMetadataOptions
    rich = v1.options.PyTreeOptions.Saving(pytree_metadata_options=PyTreeMetadataOptions(support_rich_types=True))
    with training.Checkpointer(directory / "rich",
                               context=v1.Context(pytree_options=v1.options.PyTreeOptions(saving=rich))) as ckptr:
        ckptr.save(0, mixed_state(0), force=True)

    from tests.test_custom_checkpointables import Counter, Vocab, VocabHandler  # (importable by the same names in ckpt)
    v1.handlers.register_handler(VocabHandler)
    with training.Checkpointer(directory / "handled",
                               step_name_format=v1.path.step.standard_name_format(step_prefix="ckpt")) as ckptr:
        ckptr.save_checkpointables_async(2, {"state": {"w": np.arange(3.0)}, "vocab": Vocab(["a", "b"]),
                                             "counter": Counter(7)}, force=True).result()

    with ocp.StandardCheckpointer() as direct:
        direct.save(directory / "direct" / "3", mixed_state(3, string=False))
    with ocp.PyTreeCheckpointer() as direct:
        direct.save(directory / "direct" / "4", mixed_state(4))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
