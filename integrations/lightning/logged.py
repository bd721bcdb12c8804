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
