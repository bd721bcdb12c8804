"""The masks of pruned parameters (``torch.nn.utils.prune``, Lightning's ``ModelPruning``), which no
Lightning checkpoint gives back.

A pruned parameter ``weight`` is the product of a parameter ``weight_orig`` and a buffer ``weight_mask``,
by a forward pre-hook that no ``state_dict`` holds. ``ModelPruning`` saves ``weight`` with its mask
applied and without the mask (``make_pruning_permanent``, its default), or ``weight_orig`` and
``weight_mask``, which a module not pruned yet refuses to load. Restored either way, the pruned weights
trained again until the next pruning. The callback records the masks and prunes the restored module
by them before its weights are loaded.

Example (inside the callback)::

    state["pruning"] = masks(trainer.lightning_module)          # in state_dict()
    reapply(pl_module, saved["pruning"], checkpoint["state_dict"])  # before the weights are loaded
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import prune


def masks(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The mask of each pruned parameter of ``module`` (bool tensors on the CPU), by its name in
    ``module.state_dict()`` without the ``_orig`` suffix (``"net.0.weight"``)."""
    found = {}
    for path, submodule in module.named_modules():
        for hook in submodule._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                mask = getattr(submodule, name + "_mask")
                found[f"{path}.{name}" if path else name] = mask.detach().to("cpu", torch.bool)
    return found


def reapply(module: torch.nn.Module, saved: dict[str, Any] | None, state_dict: dict[str, Any]) -> None:
    """Prunes the parameters of ``module`` that ``saved`` (from :func:`masks`; None: not recorded) names
    by their masks, where they are not pruned yet, and gives ``state_dict`` (the weights to load into
    ``module``) the keys of a pruned parameter where it holds the parameter with its mask applied."""
    for key, mask in (saved or {}).items():
        path, _, name = key.rpartition(".")
        try:
            submodule = module.get_submodule(path)
        except AttributeError:  # another model: the check of its weights names what differs
            continue
        weight = getattr(submodule, name, None)
        if not isinstance(weight, torch.Tensor) or torch.nn.parameter.is_lazy(weight) or weight.shape != mask.shape:
            continue
        if not hasattr(submodule, name + "_mask"):
            prune.custom_from_mask(submodule, name, torch.as_tensor(mask).to(weight.device))
        if key in state_dict and key + "_orig" not in state_dict:  # (ModelPruning's make_pruning_permanent)
            saved_weight = state_dict.pop(key)
            state_dict[key + "_orig"] = saved_weight
            state_dict[key + "_mask"] = torch.as_tensor(mask).to(saved_weight.device, saved_weight.dtype)
