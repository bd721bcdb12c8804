"""What ``self.log`` accumulated, and the state of the module's torchmetrics, as checkpointable values.

Lightning keeps the running values of ``self.log(..., on_epoch=True)`` in the training loop's result
collection, and the metrics it reports (``trainer.callback_metrics``, which schedulers, ``EarlyStopping``
and ``monitor`` read) in its logger connector; a torchmetrics ``Metric`` held by the module keeps its
state outside ``state_dict``. None of it is in Lightning's checkpoint, so a resumed epoch would
aggregate only the batches after the resume. This module captures them as tensors and JSON values
(nothing is pickled) and puts them back, using Lightning's private ``_ResultCollection``.

Example::

    state = capture(trainer)            # in the checkpoint, beside the loops' progress
    ...
    restore(trainer, state)             # in the resumed run, before its next batch
"""
from __future__ import annotations

import copy
import importlib
from typing import Any

import torch

_REDUCTIONS = ("mean", "sum", "max", "min")


def capture(trainer: Any, *, in_validation_end: bool = False) -> dict[str, Any]:
    """The training loop's logged values, the reported metrics and the module's torchmetrics states.

    ``in_validation_end``: taken in ``on_validation_end``, after which Lightning resets the torchmetrics
    that validation logged; they are recorded reset, as the run goes on with them."""
    connector = trainer._logger_connector
    reset = _validation_logged(trainer) if in_validation_end else set()
    return {
        "results": [_result_entry(key, metric) for key, metric in trainer.fit_loop.epoch_loop._results.items()],
        # as [name, value] pairs: metric names may hold "/" or "."
        "callback_metrics": _pairs(connector._callback_metrics),
        "logged_metrics": _pairs(connector._logged_metrics),
        "progress_bar_metrics": _pairs(connector._progress_bar_metrics),
        "first_loop_iter": connector._first_loop_iter,
        "current_fx": connector._current_fx,
        "torchmetrics": [[name, _metric_state(m, reset=name in reset)]
                         for name, m in _torchmetrics(trainer.lightning_module)],
    }


def restore(trainer: Any, state: dict[str, Any]) -> None:
    """Puts back what :func:`capture` took (in ``on_train_start``, after Lightning reset its own)."""
    connector = trainer._logger_connector
    module = trainer.lightning_module
    held = dict(_torchmetrics(module))
    for name, saved in state["torchmetrics"]:
        if name in held:
            _set_metric_state(held[name], saved)
    results = trainer.fit_loop.epoch_loop._results
    results_module = importlib.import_module(type(results).__module__)
    for entry in state["results"]:
        results[entry["key"]] = _result_metric(results_module, trainer, entry, held)
    connector._callback_metrics = {name: value for name, value in state["callback_metrics"]}
    connector._logged_metrics = {name: value for name, value in state["logged_metrics"]}
    connector._progress_bar_metrics = {name: value for name, value in state["progress_bar_metrics"]}
    connector._first_loop_iter = state["first_loop_iter"]
    connector._current_fx = state["current_fx"]


def is_state(state: Any) -> bool:
    """Whether ``state`` (read from a checkpoint, which may be forged) holds what :func:`capture` stores, of the types
    :func:`restore` puts back (a reduction by another name would be looked up in torch and called)."""
    if not isinstance(state, dict) or not all(_is(state.get(k), t) for k, t in _STATE_TYPES.items()):
        return False
    pairs = [p for k in _PAIRS for p in state[k]] + state["torchmetrics"]
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
        return False
    return (all(_is_result(e) for e in state["results"])
            and all(_is_metric_state(saved) for _, saved in state["torchmetrics"]))


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance(value, types), where a bool is no int."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _is_result(entry: Any) -> bool:
    """Whether ``entry`` is one :func:`_result_entry` makes (see :func:`is_state`)."""
    return (isinstance(entry, dict) and all(_is(entry.get(k), t) for k, t in _RESULT_TYPES.items())
            and entry["reduce_fx"] in _REDUCTIONS
            and (not entry["is_tensor"] or _is_tensors(entry.get("states"))))


def _is_metric_state(saved: Any) -> bool:
    """Whether ``saved`` is one :func:`_metric_state` makes (see :func:`is_state`)."""
    return (isinstance(saved, dict) and _is(saved.get("update_count"), (int,))
            and _is(saved.get("computed"), _TENSOR_OR_NONE) and _is_tensors(saved.get("states"), lists=True))


def _is_tensors(states: Any, *, lists: bool = False) -> bool:
    """Whether ``states`` maps names to tensors (``lists``: or to lists of them, a torchmetrics list state)."""
    return isinstance(states, dict) and all(
        isinstance(v, torch.Tensor) or (lists and isinstance(v, list) and all(isinstance(x, torch.Tensor) for x in v))
        for v in states.values())


_TENSOR_OR_NONE = (torch.Tensor, type(None))
_PAIRS = ("callback_metrics", "logged_metrics", "progress_bar_metrics")
_STATE_TYPES = {"results": (list,), **dict.fromkeys(_PAIRS, (list,)), "first_loop_iter": (bool, type(None)),
                "current_fx": (str, type(None)), "torchmetrics": (list,)}
_RESULT_TYPES = {
    **dict.fromkeys(("key", "fx", "name", "reduce_fx"), (str,)),
    **dict.fromkeys(("prog_bar", "logger", "on_step", "on_epoch", "enable_graph", "add_dataloader_idx", "sync_dist",
                     "rank_zero_only", "is_tensor", "has_reset"), (bool,)),
    "dataloader_idx": (int, type(None)), "metric_attribute": (str, type(None)), "update_count": (int,),
    "forward_cache": _TENSOR_OR_NONE, "computed": _TENSOR_OR_NONE}


def _result_entry(key: str, metric: Any) -> dict[str, Any]:
    meta = metric.meta
    reduce_fx = getattr(meta.reduce_fx, "__name__", "")
    if reduce_fx not in _REDUCTIONS:
        raise TypeError(f"self.log({meta.name!r}, reduce_fx={meta.reduce_fx!r}) cannot be checkpointed: "
                        f"ckpt restores the reductions {_REDUCTIONS}")
    if meta.sync.group is not None:
        raise TypeError(f"self.log({meta.name!r}, sync_dist_group=...) cannot be checkpointed: a process group "
                        "is not a value ckpt stores; leave sync_dist_group unset")
    entry = {
        "key": key, "fx": meta.fx, "name": meta.name, "prog_bar": meta.prog_bar, "logger": meta.logger,
        "on_step": meta.on_step, "on_epoch": meta.on_epoch, "reduce_fx": reduce_fx,
        "enable_graph": meta.enable_graph, "add_dataloader_idx": meta.add_dataloader_idx,
        "dataloader_idx": meta.dataloader_idx, "metric_attribute": meta.metric_attribute,
        "sync_dist": meta.sync.should, "rank_zero_only": meta.sync.rank_zero_only,
        "is_tensor": metric.is_tensor, "has_reset": metric.has_reset, "update_count": metric._update_count,
        "forward_cache": _tensor_or_none(metric._forward_cache),
        "computed": _tensor_or_none(metric._computed) if metric.is_tensor else None,
    }
    if metric.is_tensor:
        entry["states"] = {name: getattr(metric, name) for name in metric._defaults}
    return entry


def _result_metric(results_module: Any, trainer: Any, entry: dict[str, Any], held: dict[str, Any]) -> Any:
    """A ``_ResultMetric`` whose metadata equals what the next ``self.log`` of the key will make."""
    meta = results_module._Metadata(
        fx=entry["fx"], name=entry["name"], prog_bar=entry["prog_bar"], logger=entry["logger"],
        on_step=entry["on_step"], on_epoch=entry["on_epoch"], reduce_fx=getattr(torch, entry["reduce_fx"]),
        enable_graph=entry["enable_graph"], add_dataloader_idx=entry["add_dataloader_idx"],
        dataloader_idx=entry["dataloader_idx"], metric_attribute=entry["metric_attribute"])
    meta.sync = results_module._Sync(_should=entry["sync_dist"], fn=trainer.strategy.reduce,
                                     rank_zero_only=entry["rank_zero_only"])
    metric = results_module._ResultMetric(meta, entry["is_tensor"])
    if entry["is_tensor"]:
        for name, value in entry["states"].items():
            setattr(metric, name, value)
        metric._computed = entry["computed"]
    else:
        attribute = entry["metric_attribute"]
        if attribute not in held:
            raise ValueError(f"the checkpoint logged the torchmetrics Metric {attribute!r} as {entry['name']!r}, "
                             "but the LightningModule has no such Metric")
        metric.value = held[attribute]
    metric._update_count = entry["update_count"]
    metric.has_reset = entry["has_reset"]
    metric._forward_cache = entry["forward_cache"]
    return metric


def _torchmetrics(module: Any) -> list[tuple[str, Any]]:
    """The module's torchmetrics ``Metric`` objects with their attribute names (none without torchmetrics)."""
    try:
        from torchmetrics import Metric
    except ImportError:
        return []
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Metric) and name]


def _validation_logged(trainer: Any) -> set[str]:
    """The attribute names of the torchmetrics ``Metric`` objects the validation under way logged."""
    results = trainer.fit_loop.epoch_loop.val_loop._results
    return {metric.meta.metric_attribute for metric in results.values() if not metric.is_tensor}


def _metric_state(metric: Any, reset: bool = False) -> dict[str, Any]:
    """``metric``'s state, or (``reset``) the one ``metric.reset()`` gives it, which is left unchanged."""
    if reset:
        return {"update_count": 0, "computed": None, "states": copy.deepcopy(metric._defaults)}
    return {"update_count": metric._update_count, "computed": _tensor_or_none(metric._computed),
            "states": {name: getattr(metric, name) for name in metric._defaults}}


def _set_metric_state(metric: Any, saved: dict[str, Any]) -> None:
    for name, value in saved["states"].items():
        setattr(metric, name, list(value) if isinstance(value, (list, tuple)) else value)
    metric._update_count = saved["update_count"]
    metric._computed = saved["computed"]


def _pairs(metrics: dict[str, Any]) -> list[list[Any]]:
    return [[name, value] for name, value in metrics.items()]


def _tensor_or_none(value: Any) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None
