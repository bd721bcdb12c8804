"""Lightning's ``ckpt_path=`` for ckpt's step directories: ``trainer.test(ckpt_path="best")`` and the like.

Lightning reads every ``ckpt_path`` (``fit``, ``validate``, ``test``, ``predict``, and the ``"best"``
that ``trainer.test()`` picks after a fit) through its strategy's ``CheckpointIO``, which expects a
``torch.save`` file. The callback wraps that ``CheckpointIO`` in a :class:`StepCheckpointIO`, which
reads a step directory as the checkpoint dict Lightning would have saved and hands anything else (a
``.ckpt`` file) to the ``CheckpointIO`` it wraps.

Example (what the callback does in ``setup``)::

    install(trainer.strategy)
    trainer.strategy.load_checkpoint("runs/exp1/1200")    # {"state_dict": ..., "optimizer_states": ..., ...}
"""
from __future__ import annotations

import os
from typing import Any

from ckpt.integrations.lightning import translate, weights


class StepCheckpointIO:
    """A Lightning ``CheckpointIO`` that reads ckpt's step directories and passes all else to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint dict of the step directory ``path`` (tensors on the CPU, where Lightning's restore
        puts them on the model's device), or what ``inner`` reads from a file."""
        if is_step_directory(path):
            return translate.read(os.fspath(path))
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def install(strategy: Any) -> None:
    """Wraps ``strategy.checkpoint_io`` (once) so that its ``load_checkpoint`` reads step directories too.

    Strategies that load by themselves (FSDP, model parallel, DeepSpeed) do not call it: they read
    their own formats only."""
    current = strategy.checkpoint_io
    if not isinstance(current, StepCheckpointIO):
        strategy.checkpoint_io = StepCheckpointIO(current)


def is_step_directory(path: Any) -> bool:
    """Whether ``path`` is a directory (local) or holds a ckpt checkpoint (``s3://``, ``gs://``)."""
    path = os.fspath(path)
    return os.path.isdir(path) if "://" not in path else weights.is_checkpoint(path)
