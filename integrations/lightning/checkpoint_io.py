"""Lightning's ``ckpt_path=`` for ckpt's step directories: ``trainer.test(ckpt_path="best")`` and the like.

Lightning reads every ``ckpt_path`` (``fit``, ``validate``, ``test``, ``predict``, and the ``"best"``
that ``trainer.test()`` picks after a fit) through its strategy's ``CheckpointIO``, which expects a
``torch.save`` file. The callback wraps that ``CheckpointIO`` in a :class:`StepCheckpointIO`, which
reads a step directory as the checkpoint dict Lightning would have saved (a root directory of steps,
the callback's ``directory``, as its latest step) and hands anything else (a ``.ckpt`` file) to the
``CheckpointIO`` it wraps. The weights of a step are checked against the module before Lightning loads
them, as the callback's own restore checks them: a value the module's tensor of another dtype cannot
hold (a saved float32 70000.0 into a float16 buffer, which ``load_state_dict`` makes inf) is refused.

Example (what the callback does in ``setup``)::

    install(trainer.strategy)
    trainer.strategy.load_checkpoint("runs/exp1/1200")    # {"state_dict": ..., "optimizer_states": ..., ...}
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from ckpt.path import step as step_lib

from ckpt.integrations.lightning import translate, weights

log = logging.getLogger(__name__)


class StepCheckpointIO:
    """A Lightning ``CheckpointIO`` that reads ckpt's step directories and passes all else to ``inner``."""

    def __init__(self, inner: Any, step_name_format: step_lib.NameFormat | None = None, strategy: Any = None) -> None:
        self.inner = inner
        self.step_name_format = step_name_format
        self.strategy = strategy  # whose next load_model_state_dict of a step read here is checked first

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint dict of the step directory ``path`` (tensors on the CPU, where Lightning's restore
        puts them on the model's device), of the latest step when ``path`` is a root of steps, or what
        ``inner`` reads from a file."""
        if is_step_directory(path, self.step_name_format):
            step, step_dir = weights.step_path(path, None, self.step_name_format)
            if step_dir != os.fspath(path):
                log.info("ckpt: %s is a directory of steps; reading its latest, step %d (%s)", path, step, step_dir)
            checkpoint = translate.read(step_dir)
            if self.strategy is not None:
                _check_weights_before_load(self.strategy, step_dir, checkpoint)
            return checkpoint
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def install(strategy: Any, step_name_format: step_lib.NameFormat | None = None) -> None:
    """Wraps ``strategy.checkpoint_io`` (once) so that its ``load_checkpoint`` reads step directories too
    (roots of steps named by ``step_name_format``).

    Strategies that load by themselves (FSDP, model parallel, DeepSpeed) do not call it: they read
    their own formats only."""
    current = strategy.checkpoint_io
    if not isinstance(current, StepCheckpointIO):
        strategy.checkpoint_io = StepCheckpointIO(current, step_name_format, strategy)


def _check_weights_before_load(strategy: Any, source: str, read: dict[str, Any]) -> None:
    """Has ``strategy``'s next ``load_model_state_dict`` (Lightning's restore of ``read``, the checkpoint read from
    ``source``, after the module's ``on_load_checkpoint``) first refuse, with :func:`weights.check_model`, weights the
    module cannot take as they are: keys or shapes that differ, values its tensors of other dtypes cannot hold. The
    strategy's method is shadowed on the instance until that call, which checks ``read`` only: a restore that never
    came (the module's ``on_load_checkpoint`` raised) leaves no check on another checkpoint's load, and ``read`` is let
    go by the next load of any (as Lightning lets it go at its next restore)."""
    _unshadow(strategy)
    own = strategy.__dict__.get("load_model_state_dict")
    load = strategy.load_model_state_dict

    def checked(checkpoint: Mapping[str, Any], strict: bool = True) -> Any:
        _unshadow(strategy)
        if checkpoint is read:
            weights.check_model(checkpoint["state_dict"], strategy.lightning_module, source=source, strict=strict)
        return load(checkpoint, strict=strict)

    checked.ckpt_own = own  # type: ignore[attr-defined]  # (what _unshadow puts back)
    strategy.load_model_state_dict = checked


def _unshadow(strategy: Any) -> None:
    """Puts back the ``load_model_state_dict`` that :func:`_check_weights_before_load` shadowed on ``strategy``."""
    shadow = strategy.__dict__.get("load_model_state_dict")
    if hasattr(shadow, "ckpt_own"):
        if shadow.ckpt_own is None:
            del strategy.load_model_state_dict
        else:
            strategy.load_model_state_dict = shadow.ckpt_own


def is_step_directory(path: Any, step_name_format: step_lib.NameFormat | None = None) -> bool:
    """Whether ``path`` is a directory (local), or holds a ckpt checkpoint or steps named by ``step_name_format``
    (``s3://``, ``gs://``, where a root of steps is no object of its own)."""
    path = os.fspath(path)
    if "://" not in path:
        return os.path.isdir(path)
    return weights.is_checkpoint(path) or bool(step_lib.find_all(path, step_name_format))
