"""Restore a training state (a Linen TrainState, NNX objects, any pytree) into the target's structure."""
from __future__ import annotations

from typing import TypeVar

from ckpt.integrations.flax.nnx_objects import nnx_states, update_nnx_in_place
from ckpt.training import CheckpointMetadata, Checkpointer

T = TypeVar("T")


def restore_train_state(checkpointer: Checkpointer, target: T, *, step: int | CheckpointMetadata | None = None,
                        checkpointable_name: str = "state") -> T:
    """Loads checkpoint ``step`` (the latest when None) into ``target``'s structure and types.

    ``target`` says what to build. It is a concrete state, an abstract one from ``jax.eval_shape``
    (add a ``sharding`` to a ``jax.ShapeDtypeStruct`` to place that leaf; one over an ``AbstractMesh``,
    as ``nnx.eval_shape`` gives under ``jax.set_mesh``, places it on the mesh set there), or any pytree. The
    result has the target's exact tree: TrainState subclasses with their extra fields and their
    static ``apply_fn`` and ``tx``, optax NamedTuple states (``EmptyState`` included), typed PRNG
    keys, and each leaf's dtype and sharding. NNX objects in ``target`` (a model, an
    ``nnx.Optimizer``, ``nnx.Rngs``, or a tuple or dict of them) are updated in place and returned.

    Args:
      checkpointer: a ``ckpt.training.Checkpointer``.
      target: the state to restore into.
      step: the step to load (an int or a ``CheckpointMetadata``); None means the latest.
      checkpointable_name: the checkpointable holding the state (``"pytree"`` in steps Orbax wrote
        before 0.12).

    Returns:
      The restored state, or ``target`` itself, unchanged, when the checkpointer has no checkpoint
      and ``step`` is None: the restore-or-initialize pattern.

    Raises:
      ckpt.errors.StepNotFoundError: ``step`` was given and is not a committed checkpoint.
      ValueError: the checkpoint does not fit ``target`` (another model, another optimizer chain);
        the message lists every differing key path.

    Example:
        >>> state = create_train_state(jax.random.key(0))   # or jax.eval_shape(create_train_state, key)
        >>> state = restore_train_state(ckptr, state)
        >>> start_step = int(state.step)
    """
    if step is None and checkpointer.latest is None:
        return target
    abstract = nnx_states(target)
    return update_nnx_in_place(target, checkpointer.load(step, abstract, checkpointable_name=checkpointable_name))

