"""A per-step hook for a hand-written training loop: decide, save asynchronously, stop on preemption."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ckpt.integrations.flax.nnx_objects import nnx_states
from ckpt.training import Checkpointer


class CheckpointHook:
    """Call once per step after the update; returns True when the loop should stop.

    Each call first asks the checkpointer's policy (``should_save``); a step that does not save
    touches neither ``state`` nor ``metrics``, so it costs microseconds and no device-to-host
    transfer. A step that saves starts an asynchronous save, which copies the state to host memory
    before returning (so the loop may donate the state's buffers to the next step) and writes in
    the background. At ``final_step`` and once preemption is reached (SIGTERM,
    ``ckpt.preemption.notify()``, JAX's preemption sync point), the hook saves regardless of the
    policy (unless that step is already saved), waits until the checkpoint is committed, and returns True.

    ``state`` is any pytree the checkpointer can store: a TrainState, or NNX objects (a model, an
    ``nnx.Optimizer``, a tuple of them), which are saved as ``nnx.state(obj)`` (less the ``nnx.Intermediate``
    values ``sow`` recorded) so that ``restore_train_state`` restores them in place. ``metrics`` (scalars,
    jax or numpy ones included) are stored with the step for ``BestN``; in a multi-process job a jax metric must be
    replicated (a jitted step's loss is), as each process stores what it reads of it.

    Two tiers: build the checkpointer with a local directory,
    ``Checkpointer("gs://bucket/exp1", ..., local=ckpt.LocalCheckpointOptions("/mnt/ssd/exp1", ...))``.
    A step goes to the tiers whose policies want it; the final step and a preempted one go to both
    (the durable copy within the local options' grace period).

    Example:
        >>> hook = CheckpointHook(ckptr, final_step=num_steps)
        >>> for step in range(int(state.step) + 1, num_steps + 1):
        ...     state, loss = train_step(state, next(batches))
        ...     if hook(step, state, {"loss": loss}):
        ...         break
    """

    def __init__(self, checkpointer: Checkpointer, *, final_step: int | None = None):
        self._checkpointer = checkpointer
        self._final_step = final_step

    def __call__(self, step: int, state: Any, metrics: dict[str, Any] | None = None) -> bool:
        """Saves ``state`` as ``step`` when due; True when the loop should stop (final step, preemption)."""
        due = self._checkpointer.should_save(step)  # also where the checkpointer notices a preemption
        stop = bool(step == self._final_step) or self._checkpointer.reached_preemption(step)  # (a jax/numpy step)
        if due or (stop and self._is_new(step)):  # a step that is due follows should_save's decision
            self._checkpointer.save_async(step, nnx_states(state), force=stop, metrics=_to_python(metrics))
        if stop:
            self._checkpointer.wait()
        return stop

    def _is_new(self, step: int) -> bool:
        latest = self._checkpointer.latest
        return latest is None or step > latest.step


def _to_python(metrics: Any) -> Any:
    """``metrics`` with jax and numpy scalars (and arrays) turned into JSON-ready Python values.

    Raises:
      ValueError: a metric is a jax.Array sharded over other processes' devices, which this process cannot read
        (naming its key); before anything is written.
    """
    if metrics is None:
        return None
    for path, value in jax.tree_util.tree_flatten_with_path(metrics)[0]:
        if isinstance(value, jax.Array) and not (value.is_fully_addressable or value.is_fully_replicated):
            raise ValueError(
                f"metric {jax.tree_util.keystr(path)} is a jax.Array sharded over other processes' devices "
                f"({value.sharding}), which process {jax.process_index()} cannot read: pass a replicated value (a "
                "jitted step's output with a replicated sharding, or jax.experimental.multihost_utils."
                "process_allgather of it) or a host value (a Python or numpy number); nothing was written")
    return jax.tree.map(lambda v: np.asarray(v).tolist() if hasattr(v, "dtype") else v, jax.device_get(metrics))
