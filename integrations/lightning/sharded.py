"""Restoring models under strategies such as ``ModelParallelStrategy`` (FSDP2 in ``configure_model``: their
state dicts hold DTensors), which restore neither the model (``load_model_state_dict`` is a
no-op) nor the optimizers (``lightning_restore_optimizer`` is False) from a checkpoint dict: Lightning
leaves it to their own ``load_checkpoint``, which reads torch's DCP format. Here, each rank reads the
shards of its own DTensors from a ckpt step, at any number of devices, and hands them to torch's
``set_model_state_dict`` / ``set_optimizer_state_dict``.

Example (inside the callback)::

    loaded = load(trainer, path)                   # DTensors where this run's state dicts have them
    checkpoint = resume.restore_modules(trainer, from_checkpointables(loaded, source=path), source=path)
    resume.restore_training_state(trainer, checkpoint, source=path)
    set_states(trainer, from_checkpointables(loaded, source=path))
"""
from __future__ import annotations

from typing import Any

from ckpt import checkpointables_metadata, dtensor, load_checkpointables

from ckpt.integrations.lightning.translate import MODEL, TRAINER

_OPTIMIZERS = "optimizer_states"


def restores_itself(trainer: Any) -> bool:
    """Whether the strategy restores the model and optimizers itself, from its own ``load_checkpoint``
    (``lightning_restore_optimizer`` is False, and its ``load_model_state_dict`` does nothing): the callback
    then sets them with torch's ``set_model_state_dict`` / ``set_optimizer_state_dict``, whether
    ``configure_model`` sharded the module's parameters (DTensors) or left them plain."""
    return not getattr(trainer.strategy, "lightning_restore_optimizer", True)


def check_strategy(trainer: Any) -> None:
    """Raises ValueError, on every rank, for a model whose strategy gives its state to rank 0 alone:
    ``ModelParallelStrategy(save_distributed_checkpoint=False)`` gathers the whole model and optimizer
    state there (for a checkpoint file of Lightning's own) and none to the other ranks, where the
    callback saves and restores each rank's shards (its first save would find the ranks' trees differ)."""
    if restores_itself(trainer) and not getattr(trainer.strategy, "_save_distributed_checkpoint", True):
        raise ValueError(
            f"{type(trainer.strategy).__name__}(save_distributed_checkpoint=False) gives the state of the sharded "
            "model and its optimizers to rank 0 alone, whole, and none to the other ranks; CheckpointCallback saves "
            "each rank's shards (and restores them at any number of devices): leave save_distributed_checkpoint at "
            "its default, True (load_weights reads the full weights of a step into a plain model)")


def load(trainer: Any, path: str) -> dict[str, Any]:
    """The ``"model"`` and ``"trainer"`` checkpointables of step ``path``, the model's and optimizers'
    tensors as DTensors shaped like this run's (each rank reads its own shards), the rest as saved."""
    strategy = trainer.strategy
    saved = checkpointables_metadata(path).metadata[TRAINER]
    rest = {key: None for key in saved}
    rest[_OPTIMIZERS] = [_templates(strategy.optimizer_state(o)) for o in trainer.optimizers]
    return load_checkpointables(path, {MODEL: _templates(strategy.lightning_module_state_dict()),
                                            TRAINER: rest})


def set_states(trainer: Any, checkpoint: dict) -> None:
    """Puts the restored model and optimizer states into the sharded model and its optimizers."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    model = trainer.strategy.model
    strict = getattr(trainer.lightning_module, "strict_loading", True)
    set_model_state_dict(model, checkpoint["state_dict"], options=StateDictOptions(strict=strict))
    for optimizer, state in zip(trainer.optimizers, checkpoint[_OPTIMIZERS]):
        set_optimizer_state_dict(model, getattr(optimizer, "_optimizer", optimizer), state)


def _templates(tree: Any) -> Any:
    """``tree`` with its DTensors kept as templates and every other leaf None (loaded as saved)."""
    if isinstance(tree, dict):
        return {key: _templates(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(type(tree), "_fields"):
        return type(tree)(_templates(value) for value in tree)
    return tree if dtensor.is_dtensor(tree) else None
