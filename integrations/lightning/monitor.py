"""``monitor``/``mode``: the metrics stored with a step, and the best steps kept because of them.

Example::

    policy = preservation_policy(None, monitor="val_loss", mode="min")  # the best step plus the latest
    metrics = step_metrics(trainer.callback_metrics)                    # {"val_loss": 0.31, ...}
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
