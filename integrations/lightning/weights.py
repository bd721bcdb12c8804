"""Reading what a step holds without a Trainer: its weights into a model, or the module it saved.

Example::

    model = MyLightningModule()
    step = load_weights(model, "runs/exp1")       # the latest step; load_weights(model, d, step=120)
    model.eval()
    best = load_from_checkpoint(MyLightningModule, callback.best_model_path)   # built from its hyperparameters
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Any, Mapping

import torch

import ckpt
from ckpt.path import step as step_lib

from ckpt.integrations.lightning import resume, translate
from ckpt.integrations.lightning.translate import MODEL


def load_weights(model: torch.nn.Module, directory: str | os.PathLike, step: int | None = None, *,
                 strict: bool = True, step_name_format: step_lib.NameFormat | None = None) -> int:
    """Loads the weights a :class:`CheckpointCallback` saved at ``step`` (the latest when None) into ``model``.

    Reads only the ``"model"`` checkpointable (no optimizer or trainer state), installs no signal
    handler and takes no lock, so it is safe in an inference process while training still writes.
    ``directory`` may be local, ``gs://`` or ``s3://``. A model compiled otherwise than the one saved
    (``torch.compile``, whose wrapper adds ``_orig_mod.`` to the keys of the module it wraps, around the
    model or a submodule, in either) gets the weights of its keys that differ only by that.

    Args:
      model: the LightningModule (or any ``nn.Module`` with the same ``state_dict`` keys) to fill.
      directory: the callback's directory, or one step's (``callback.best_model_path``).
      step: the step to load; None for the latest (or the step ``directory`` is).
      strict: as in ``nn.Module.load_state_dict``: every key must match.
      step_name_format: the callback's ``step_name_format``, if it was given one.

    Returns:
      The step that was loaded.

    Raises:
      ckpt.errors.StepNotFoundError: no such step (or no checkpoint at all) in ``directory``.
      ckpt.errors.CheckpointCorruptedError: the step's ``"model"`` is no state dict (a forged step).
      ValueError: the checkpoint holds a different model (the keys and shapes that differ are named).
    """
    step, path = step_path(directory, step, step_name_format)
    saved = translate.model_state(ckpt.load_checkpointables(path, {MODEL: None})[MODEL], source=str(path))
    state = _as_keys_of(saved, model.state_dict())
    check_model(state, model, source=f"step {step} in {directory}", strict=strict)
    model.load_state_dict(state, strict=strict)
    return step


_COMPILED = re.compile(r"(?:^|(?<=\.))_orig_mod\.")  # torch.compile's wrapper's segment of a key


def _as_keys_of(saved: dict[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` (a state dict) with each key that ``current`` (the model's) lacks renamed to the model's key that
    differs from it only by ``_orig_mod.`` segments (a model compiled otherwise than the one saved), where that key
    is neither saved itself nor taken by another saved key renamed (which then stays, unexpected)."""
    if all(key in current for key in saved):
        return saved
    plain = {_COMPILED.sub("", key): key for key in current}
    out = {}
    for key, value in saved.items():
        theirs = key if key in current else plain.get(_COMPILED.sub("", key), key)
        out[key if theirs in saved or theirs in out else theirs] = value
    return out


def load_from_checkpoint(cls: type, directory: str | os.PathLike, step: int | None = None, *,
                         strict: bool | None = None, step_name_format: step_lib.NameFormat | None = None,
                         **kwargs: Any) -> Any:
    """What ``cls.load_from_checkpoint(path)`` gives for a ``.ckpt`` file, for a step the callback saved:
    a ``cls`` made from the step's saved hyperparameters (``kwargs`` override them, as in Lightning),
    with its ``on_load_checkpoint`` called and the step's weights loaded, on the CPU; a LightningDataModule
    with the state its ``state_dict`` gave.

    Args:
      cls: the LightningModule or LightningDataModule class (``save_hyperparameters()`` in its ``__init__``
        stores the arguments).
      directory, step, step_name_format: as in :func:`load_weights`.
      strict: as in Lightning (None: the module's ``strict_loading``).

    Raises:
      ValueError: the step holds values that the tensors of the module as made (``self.half()`` in its
        ``__init__``) cannot hold in their dtypes, naming each key (Lightning's would load 70000.0 as inf).

    Example::

        model = load_from_checkpoint(MyLightningModule, "runs/exp1", step=120, dropout=0.0)
    """
    _, path = step_path(directory, step, step_name_format)
    package = next((c.__module__.split(".core.")[0] for c in getattr(cls, "__mro__", ())
                    if c.__name__ in ("LightningModule", "LightningDataModule")), None)
    if package is None:
        raise TypeError(f"load_from_checkpoint makes a LightningModule or LightningDataModule, and {cls!r} is "
                        "neither: read the weights into a module you made with load_weights(module, directory)")
    checkpoint = resume.migrate(package, translate.read(path), path)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    made = importlib.import_module(f"{package}.core.saving")._load_state(cls, checkpoint, strict=strict, **kwargs)
    if isinstance(made, torch.nn.Module):  # load_state_dict cast the weights into the dtypes the module was made with
        check_model(checkpoint["state_dict"], made, source=path, strict=False)
    return made


def step_path(directory: str | os.PathLike, step: int | None,
              step_name_format: step_lib.NameFormat | None = None) -> tuple[int, str]:
    """The committed step (latest when None) of ``directory`` and its path, found without a Checkpointer;
    ``directory`` may be that step's own directory."""
    if step is None and is_checkpoint(directory):
        return ckpt.checkpointables_metadata(directory).step, os.fspath(directory)
    found = step_lib.find_all(directory, step_name_format)
    if step is None and found:
        step = max(found)
    if step not in found:
        what = f"no checkpoint at step {step} (steps: {sorted(found)})" if found else "no checkpoints"
        hint = "" if found else _named_otherwise(directory, step_name_format)
        raise ckpt.errors.StepNotFoundError(f"{what} in {directory}{hint}", step=step, path=directory)
    return step, f"{os.fspath(directory).rstrip('/')}/{found[step]}"


def _named_otherwise(directory: str | os.PathLike, step_name_format: step_lib.NameFormat | None) -> str:
    """What to pass when ``directory``'s steps are named by a standard format other than ``step_name_format``
    (the callback's was given one: ``step_000120``); "" when none names any."""
    try:
        other = step_lib.name_format_of(directory)
    except OSError:  # no such directory
        return ""
    given = step_name_format or step_lib.standard_name_format()
    named = step_lib.find_all(directory, other) if other != given else {}
    if not named:
        return ""
    names = sorted(named.values())
    return (f"; it holds steps named {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}, which another step "
            f"name format names: pass step_name_format=ckpt.path.step.{other!r}")


def check_model(saved: Mapping[str, Any], model: torch.nn.Module, *, source: str, strict: bool = True) -> None:
    """Raises ValueError naming every key that ``saved`` (a state dict) lacks, adds, holds as no tensor, or shapes
    differently (of the model's tensors: a module's extra state, ``get_extra_state``, may be any value; a lazy module's
    parameters, not yet initialized, take their shapes from ``saved``), or whose values the model's tensor of
    another dtype cannot hold (``load_state_dict`` would make 70000.0 inf in float16)."""
    current = model.state_dict()
    problems = []
    if strict:
        missing = [k for k in current if k not in saved]
        unexpected = [k for k in saved if k not in current]
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
    for key, value in saved.items():
        target = current.get(key)
        # None: not in the model, not a tensor there, or a lazy module's (its load gives it the saved shape)
        want = None if torch.nn.parameter.is_lazy(target) else getattr(target, "shape", None)
        have = tuple(getattr(value, "shape", ()))
        if isinstance(target, torch.Tensor) and not isinstance(value, torch.Tensor):  # (load_state_dict's RuntimeError)
            problems.append(f"{key!r} is of type {type(value).__name__} there, no tensor")
        elif want is not None and have != tuple(want):
            problems.append(f"{key!r} has shape {have} there and {tuple(want)} in the model")
    if problems:
        raise ValueError(f"{source} holds a different model than this {type(model).__name__}: "
                         + "; ".join(problems) + ". Use the directory this model was trained in, or a new one.")
    lost = [f"{key!r}: {why}" for key, value in saved.items()
            if (why := resume.cast_refusal(value, getattr(current.get(key), "dtype", None))) is not None]
    if lost:
        raise ValueError(f"{source} holds values that this {type(model).__name__}'s tensors cannot hold (their "
                         "dtypes differ): " + "; ".join(lost) + ". Load it into a model of the dtypes it was saved with.")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one checkpoint's directory (not a root of steps, nor a file)."""
    try:
        ckpt.checkpointables_metadata(path)
    except ckpt.errors.InvalidLayoutError:
        return False
    return True
