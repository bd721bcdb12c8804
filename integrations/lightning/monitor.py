"""``monitor``/``mode``: the metrics stored with a step, and the best steps kept because of them.

Example::

    policy = preservation_policy(None, monitor="val_loss", mode="min")  # the best step plus the latest
    metrics = MeasuredMetrics("val_loss")(trainer.callback_metrics)     # {"val_loss": 0.31, ...}: measured since
                                                                        # the previous save, else without it
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping, Sequence

from ckpt.training import CheckpointMetadata
from ckpt.training import preservation_policies as pp


@dataclasses.dataclass(frozen=True)
class MonitoredMetric:
    """``get_metric_fn`` for BestN: the monitored value, or the worst one when a step lacks it."""

    key: str
    mode: str

    def __call__(self, metrics: Mapping[str, Any]) -> float:
        value = metrics.get(self.key)
        if value is None:
            return math.inf if self.mode == "min" else -math.inf
        return float(value)


def preservation_policy(policy: Any, monitor: str | None, mode: str) -> Any:
    """``policy`` when nothing is monitored; otherwise the best step by ``monitor`` plus what ``policy``
    keeps (by default the latest step)."""
    if monitor is None:
        return policy
    best = pp.BestN(get_metric_fn=MonitoredMetric(monitor, mode), reverse=mode == "min", n=1)
    return pp.AnyPreservationPolicy([best, policy or pp.LatestN(1)])


class MeasuredMetrics:
    """The metrics stored with each save, where ``monitor`` is kept only if it was measured since the
    previous save: Lightning keeps a metric in ``callback_metrics`` until it is logged again, so steps
    saved between two validations would carry the earlier validation's value, and one of them, never
    measured, could be kept as the best. Lightning logs a new tensor each time, so a value that is the
    same object as at the previous save is that save's, not this one's."""

    def __init__(self, monitor: str | None) -> None:
        self.monitor = monitor
        self._at_previous_save: Any = None

    def __call__(self, callback_metrics: Mapping[str, Any]) -> dict[str, float]:
        """The metrics of a save now (call once per save)."""
        metrics = step_metrics(callback_metrics)
        value = callback_metrics.get(self.monitor) if self.monitor is not None else None
        if value is not None and value is self._at_previous_save:
            metrics.pop(self.monitor, None)
        self._at_previous_save = value
        return metrics

    def start(self, callback_metrics: Mapping[str, Any]) -> None:
        """Records ``callback_metrics`` at the start of training (restored ones on resume) as the previous
        save's."""
        self._at_previous_save = callback_metrics.get(self.monitor) if self.monitor is not None else None


def step_metrics(callback_metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite scalar metrics, as floats (ckpt stores metrics as strict JSON)."""
    out = {}
    for key, value in callback_metrics.items():
        if getattr(value, "numel", lambda: 1)() != 1:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def never_logged(monitor: str | None, checkpoints: Sequence[CheckpointMetadata],
                 callback_metrics: Mapping[str, Any]) -> str | None:
    """Why no step is the best by ``monitor`` when none of ``checkpoints`` holds it (a misspelt
    name, or a metric logged under another), naming the metrics logged; None when one does."""
    if monitor is None or not checkpoints or any(c.metrics and monitor in c.metrics for c in checkpoints):
        return None
    logged = sorted(step_metrics(callback_metrics))
    close = difflib.get_close_matches(monitor, logged, n=1)
    return (f"monitor={monitor!r} is in the metrics of none of the steps, so none is kept as the best and "
            f"best_model_path is ''. Metrics logged: {logged}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def best_step(checkpoints: Sequence[CheckpointMetadata], monitor: str | None, mode: str) -> CheckpointMetadata | None:
    """The checkpoint with the best ``monitor`` value (the latest one when nothing is monitored)."""
    if monitor is None:
        return checkpoints[-1] if checkpoints else None
    scored = [c for c in checkpoints if c.metrics and monitor in c.metrics]
    if not scored:
        return None
    metric = MonitoredMetric(monitor, mode)
    pick = min if mode == "min" else max
    return pick(scored, key=lambda c: metric(c.metrics))
