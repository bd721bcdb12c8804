"""Lightning's checkpoint dict to ckpt checkpointables and back.

``dump_checkpoint`` returns tensors, numbers and strings inside dicts (some of them ``OrderedDict`` or
``AttributeDict``), lists and tuples. ckpt stores plain dicts, lists and tuples of tensors, arrays and
JSON values, and pickles nothing. This module makes the dict plain, refuses anything else with the key
that holds it, and splits it in two checkpointables: ``"model"`` (the module's ``state_dict``, which
:func:`ckpt.integrations.lightning.load_weights` reads on its own) and ``"trainer"`` (the rest).
Hyperparameters that are an omegaconf ``DictConfig`` (``save_hyperparameters(cfg)`` of a Hydra config), which
Lightning stores with their class, are stored as their plain container (interpolations kept) and the class's
name, and come back as that class. So do configs anywhere else in the dict, which Lightning pickles (held in the
hyperparameters: ``save_hyperparameters()`` in ``__init__(self, cfg: DictConfig)``; in a callback's state; added by
an ``on_save_checkpoint``): their key paths and classes are stored under ``omegaconf_configs_at``, which Lightning
never sees.

Example::

    items = to_checkpointables(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))
    ckptr.save_checkpointables(step, items, force=True)
    checkpoint = from_checkpointables(load(ckptr, ckptr.latest.step), source=str(ckptr.latest.path))  # torch tensors
"""
from __future__ import annotations

import importlib
import reprlib
import sys
from typing import Any

import numpy as np
import torch

import ckpt

MODEL = "model"
TRAINER = "trainer"
_STATE_DICT = "state_dict"
_SCALARS = (int, float, bool, str, bytes, type(None))


def to_checkpointables(checkpoint: dict) -> dict[str, Any]:
    """Splits a Lightning checkpoint dict into ``{"model": state_dict, "trainer": everything else}``.

    Raises:
      TypeError: a value is neither a tensor, an array nor a JSON value, or a dict key is neither str
        nor int; the message names its key, e.g. ``checkpoint['hyper_parameters']['net']``.
    """
    plain = _plain(_plain_configs(checkpoint), "checkpoint")
    model = plain.pop(_STATE_DICT, {})
    return {MODEL: model, TRAINER: plain}


def load(checkpointer: ckpt.Checkpointer, step: int) -> dict[str, Any]:
    """The model and trainer checkpointables of ``step``, tensors as torch tensors; with two tiers a damaged
    or vanished local copy falls back to the durable one."""
    return checkpointer.load_checkpointables(step, {MODEL: None, TRAINER: None})


def read(path: str) -> dict:
    """The checkpoint dict Lightning's restore functions read, from the step directory ``path``."""
    return from_checkpointables(ckpt.load_checkpointables(path, {MODEL: None, TRAINER: None}), source=path)


def from_checkpointables(loaded: dict[str, Any], *, source: str) -> dict:
    """Inverse of :func:`to_checkpointables`: the dict Lightning's restore functions read, of the step at ``source``.

    Raises:
      CheckpointCorruptedError: hyperparameters that are no mapping, or whose class is no name, which Lightning
        would fail on without naming the step; those stored as an omegaconf config that no such config holds (a
        text, which omegaconf would read as YAML, or values it refuses); a record of the configs held elsewhere
        that does not lead to such values; a field Lightning's restore reads (the loops', callbacks', optimizers'
        and schedulers' states) that is not what Lightning stores there, which it failed on with a bare TypeError;
        a ``"model"`` checkpointable that is no state dict (see :func:`model_state`). The message names ``source``.
    """
    if not isinstance(loaded[TRAINER], dict):
        raise ckpt.errors.CheckpointCorruptedError(
            f"{source}: its {TRAINER!r} checkpointable is {type(loaded[TRAINER]).__name__!r}, where the callback "
            "stores Lightning's checkpoint, a dict", path=source)
    checkpoint = dict(loaded[TRAINER])
    checkpoint[_STATE_DICT] = model_state(loaded[MODEL], source=source)
    for field, (what, valid) in _FIELDS.items():
        if checkpoint.get(field) is not None and not valid(checkpoint[field]):
            raise ckpt.errors.CheckpointCorruptedError(
                f"{source}: its {field} is {reprlib.repr(checkpoint[field])}, where Lightning stores {what}",
                path=source)
    nested = checkpoint.pop(_CONFIGS_AT, None)
    if nested is not None:
        checkpoint = _nested_configs(checkpoint, nested, source)
    for values, kind in _HYPERPARAMETERS:
        stored, config_type = checkpoint.get(values), checkpoint.get(kind)
        if not isinstance(config_type, (str, type(None))):
            raise ckpt.errors.CheckpointCorruptedError(
                f"{source}: its {kind} is {config_type!r}, where Lightning stores the name of a class", path=source)
        omegaconf = _omegaconf() if config_type in _CONFIG_TYPES else None
        if omegaconf is not None:
            checkpoint[kind] = getattr(omegaconf, config_type)
            checkpoint[values] = _config(omegaconf, checkpoint[kind], stored, values, source)
        elif not isinstance(stored, (dict, type(None))):
            raise ckpt.errors.CheckpointCorruptedError(
                f"{source}: its {values} are {type(stored).__name__!r}, where Lightning stores a dict", path=source)
    return checkpoint


def model_state(model: Any, *, source: str) -> dict[str, Any]:
    """``model``, the ``"model"`` checkpointable of the step at ``source``: the module's ``state_dict``.

    Raises:
      CheckpointCorruptedError: it is no dict of texts (a forged step), which Lightning's and torch's loads failed on
        with a bare TypeError or AttributeError; the message names ``source``.
    """
    if not isinstance(model, dict) or not all(isinstance(key, str) for key in model):
        raise ckpt.errors.CheckpointCorruptedError(
            f"{source}: its {MODEL!r} checkpointable is {reprlib.repr(model)}, where the callback stores the module's "
            "state_dict, a dict of its keys", path=source)
    return model


def _is_optimizer_state(state: Any) -> bool:
    """Whether ``state`` is an optimizer's ``state_dict`` as torch makes it: the states of the parameters by their
    index (or name, of a sharded model) and the groups listing those."""
    return (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and all(isinstance(s, dict) for s in state["state"].values())
            and isinstance(state.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["param_groups"]))


# The fields of Lightning's checkpoint that its restore (and the callback's checks) read: what Lightning stores there,
# and the check of a value read
_FIELDS = {
    "epoch": ("a number", lambda v: type(v) is int),
    "global_step": ("a number", lambda v: type(v) is int),
    "loops": ("a dict of each loop's state", lambda v: isinstance(v, dict) and all(
        isinstance(s, dict) for s in v.values())),
    "callbacks": ("a dict of each callback's state by its key", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) for k in v)),
    "optimizer_states": ("a list of each optimizer's state_dict", lambda v: isinstance(v, list) and all(
        map(_is_optimizer_state, v))),
    "lr_schedulers": ("a list of each scheduler's state_dict", lambda v: isinstance(v, list) and all(
        isinstance(s, dict) for s in v)),
}


def _omegaconf() -> Any:
    """The omegaconf module, or None where it is not installed (Lightning then reads a config class's name as its
    AttributeDict)."""
    try:
        return importlib.import_module("omegaconf")
    except ImportError:
        return None


def _config(omegaconf: Any, config_type: type, values: Any, name: str, source: str) -> Any:
    """``values`` (the plain container :func:`_plain_configs` stored as ``name`` in the step at ``source``) as a
    ``config_type`` (omegaconf's ``DictConfig`` or ``ListConfig``); CheckpointCorruptedError where no such config
    holds them."""
    container = dict if config_type is omegaconf.DictConfig else list
    what = f"{source}: its {name} are stored as a {config_type.__name__}"
    if not isinstance(values, container):  # (a text would be read as YAML)
        raise ckpt.errors.CheckpointCorruptedError(
            f"{what}, and hold {type(values).__name__!r}, not a {container.__name__}", path=source)
    try:
        return omegaconf.OmegaConf.create(values)
    except omegaconf.errors.OmegaConfBaseException as e:
        raise ckpt.errors.CheckpointCorruptedError(f"{what}, which cannot hold them: {e}", path=source) from None
    except RecursionError:  # (omegaconf makes a config recursively: a hundred levels exhaust the stack)
        raise ckpt.errors.CheckpointCorruptedError(f"{what}, nested deeper than omegaconf can make one",
                                                   path=source) from None


def _nested_configs(checkpoint: dict, nested: Any, source: str) -> dict:
    """``checkpoint`` (of the step at ``source``) with the configs that :func:`_plain_configs` recorded in ``nested``
    (``[[key path, class name], ...]``) made again (left plain where omegaconf is not installed)."""
    def damaged(why: str) -> ckpt.errors.CheckpointCorruptedError:
        return ckpt.errors.CheckpointCorruptedError(f"{source}: its {_CONFIGS_AT} {why}", path=source)

    if not isinstance(nested, list):
        raise damaged(f"is {type(nested).__name__!r}, where ckpt stores a list of [key path, class name]")
    omegaconf = _omegaconf()
    for entry in nested:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], (list, tuple))
                or not entry[0] or entry[1] not in _CONFIG_TYPES or not all(type(k) in (str, int) for k in entry[0])):
            raise damaged(f"holds {entry!r}, where ckpt stores [key path, one of {list(_CONFIG_TYPES)}]")
        path, config_type = list(entry[0]), entry[1]
        where = "checkpoint" + "".join(f"[{k!r}]" for k in path)

        def make(plain: Any) -> Any:
            if omegaconf is None:
                return plain
            return _config(omegaconf, getattr(omegaconf, config_type), plain, where, source)

        try:
            checkpoint = _replace_at(checkpoint, path, make)
        except (KeyError, IndexError, TypeError):
            raise damaged(f"names {where}, which it does not hold") from None
    return checkpoint


def _replace_at(tree: Any, path: list[Any], make: Any) -> Any:
    """``tree`` with the value at the key path ``path`` (keys and indices of dicts, lists and tuples) replaced by
    ``make(value)``; KeyError, IndexError or TypeError where ``path`` leads nowhere."""
    if not path:
        return make(tree)
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, key: _replace_at(tree[key], rest, make)}
    if isinstance(tree, (list, tuple)) and type(key) is int and 0 <= key < len(tree):
        items = list(tree)
        items[key] = _replace_at(items[key], rest, make)
        return type(tree)(items)
    raise TypeError(key)


# Lightning's keys of a module's and a datamodule's hyperparameters, and of their class where they are an omegaconf
# config (Lightning stores the class itself)
_HYPERPARAMETERS = (("hyper_parameters", "hparams_type"), ("datamodule_hyper_parameters", "datamodule_hparams_type"))
_CONFIG_TYPES = ("DictConfig", "ListConfig")
_BULK = (_STATE_DICT, "optimizer_states")  # the parts of the checkpoint that hold its many tensors
_CONFIGS_AT = "omegaconf_configs_at"  # ckpt's key (beside Lightning's) of the configs :func:`_plain_configs` records


def _plain_configs(checkpoint: dict) -> dict:
    """``checkpoint`` with each omegaconf config in it as its plain container (interpolations kept, unresolved):
    hyperparameters that are one get their class as its name (Lightning records it); the key paths and classes of the
    others are recorded under ``omegaconf_configs_at`` (omegaconf is looked for only if it is imported; not among the
    weights and optimizer states, which hold thousands of tensors: a config there is refused)."""
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is None:
        return checkpoint
    found: list = []
    out = {key: value if key in _BULK else _without_configs(omegaconf, value, [key], found)
           for key, value in checkpoint.items()}
    for values, kind in _HYPERPARAMETERS:
        config_type = out.get(kind)
        if isinstance(config_type, type) and issubclass(config_type, omegaconf.Container):
            out[kind] = config_type.__name__
    nested = [entry for entry in found if entry[0] not in ([values] for values, _ in _HYPERPARAMETERS)]
    if nested:
        out[_CONFIGS_AT] = nested
    return out


def _without_configs(omegaconf: Any, x: Any, path: list[Any], found: list) -> Any:
    """``x`` with each omegaconf config in it, through dicts, lists and tuples, as its plain container
    (interpolations kept, unresolved), whose ``[key path, class name]`` is added to ``found``; the containers that
    hold none are ``x``'s own."""
    if isinstance(x, omegaconf.Container):
        found.append([path, type(x).__name__])
        return omegaconf.OmegaConf.to_container(x, resolve=False)
    containers = (dict, list, tuple, omegaconf.Container)
    if isinstance(x, dict):
        changed = {k: new for k, v in x.items() if isinstance(v, containers)
                   and (new := _without_configs(omegaconf, v, [*path, k], found)) is not v}
        return {**x, **changed} if changed else x
    if type(x) in (list, tuple):
        items = [_without_configs(omegaconf, v, [*path, i], found) if isinstance(v, containers) else v
                 for i, v in enumerate(x)]
        return type(x)(items) if any(new is not v for new, v in zip(items, x)) else x
    return x


def _plain(x: Any, where: str, fix: str = "") -> Any:
    """``x`` as plain dicts, lists, tuples and leaves ckpt stores; TypeError naming ``where`` otherwise, which ends
    with ``fix`` (what to do; by default, convert it or keep it out)."""
    if type(x) in _SCALARS or isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return x
    if isinstance(x, dict):
        out = {}
        owner = None if fix else _OWNERS.get(where)
        for key, value in x.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"{where} has the key {key!r} of type {type(key).__name__}; ckpt stores dicts "
                                "whose keys are str or int")
            out[key] = _plain(value, f"{where}[{key!r}]", fix if owner is None else _hyperparameter_fix(owner, key))
        return out
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
        return type(x)(*(_plain(v, f"{where}.{f}", fix) for f, v in zip(type(x)._fields, x)))
    if isinstance(x, (list, tuple)):
        values = [_plain(v, f"{where}[{i}]", fix) for i, v in enumerate(x)]
        return values if isinstance(x, list) else tuple(values)
    raise TypeError(
        f"{where} is a {type(x).__module__}.{type(x).__qualname__}: ckpt stores tensors, numpy arrays and "
        "JSON values (int, float, bool, str, bytes, None, dicts, lists, tuples) and pickles nothing. "
        + (fix or "Convert it to one of these in `on_save_checkpoint`, or keep it out of the checkpoint (for "
                  "example with `save_hyperparameters(ignore=[...])`).")
    )


# the owners of the hyperparameters at these places of the checkpoint
_OWNERS = {"checkpoint['hyper_parameters']": "LightningModule",
           "checkpoint['datamodule_hyper_parameters']": "LightningDataModule"}


def _hyperparameter_fix(owner: str, name: Any) -> str:
    """How to keep the hyperparameter ``name`` of the ``owner`` (see ``_OWNERS``) out of the checkpoint."""
    return (f"It is the {owner}'s hyperparameter {name!r}: leave it out with `self.save_hyperparameters(ignore="
            f"[{name!r}])` in its `__init__` (then pass it again to `load_from_checkpoint`, which cannot make it "
            "from the step), or make it a value ckpt stores (a name, a number, a dict of them).")
