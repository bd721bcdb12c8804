"""Flax helpers for ckpt: restore a train state into its target's structure, and a training-loop hook.

Works with Linen (``flax.training.train_state.TrainState`` and subclasses, optax states) and NNX
(models, ``nnx.Optimizer``, ``nnx.Rngs``, restored in place).

Example:
    >>> from ckpt.training import Checkpointer
    >>> from ckpt.integrations.flax import CheckpointHook, restore_train_state
    >>> with Checkpointer("runs/exp1") as ckptr:
    ...     state = restore_train_state(ckptr, create_train_state())   # latest checkpoint, or the initial state
    ...     hook = CheckpointHook(ckptr, final_step=num_steps)
    ...     for step in range(int(state.step) + 1, num_steps + 1):
    ...         state, loss = train_step(state, next(batches))
    ...         if hook(step, state, {"loss": loss}):
    ...             break
"""
from ckpt.integrations.flax.hook import CheckpointHook
from ckpt.integrations.flax.restore import restore_train_state

__all__ = ["CheckpointHook", "restore_train_state"]
