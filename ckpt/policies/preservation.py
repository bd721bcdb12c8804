"""What to keep: each policy answers ``should_preserve(checkpoints, *, context)`` with one bool per checkpoint.

``checkpoints`` are :class:`ckpt.CheckpointMetadata` in the order they were saved, as in Orbax: those
the Checkpointer found on disk, ascending by step, then those it committed, in the order it committed
them (ascending by step too, unless a step below the latest was saved with ``force``; an overwritten
step counts as saved anew). So ``LatestN(2)`` after saves of 10, 20, then 5 with ``force`` keeps 20
and 5, the two saved last. Steps no policy keeps are deleted after a commit; the latest step and the
one saved last are always kept, whatever the policy says (so ``BestN`` alone cannot break resuming,
and a save never deletes the step it wrote). Combine with :class:`AnyPreservationPolicy`.

Example::

    policy = AnyPreservationPolicy([LatestN(3), BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=2)])
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ckpt import arguments
from ckpt.metadata import CheckpointMetadata, now_nsecs


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreservationContext:
    """Reserved for what a preservation policy may need beyond the checkpoints.

    Example::

        checkpoints = [ckpt.CheckpointMetadata(step, None) for step in (0, 1, 2)]
        assert LatestN(1).should_preserve(checkpoints, context=PreservationContext()) == [False, False, True]
    """


@runtime_checkable
class PreservationPolicy(Protocol):
    """Any object with this ``should_preserve`` method is a preservation policy.

    Example::

        class KeepEven:                              # ckpt.Checkpointer(..., preservation_policy=KeepEven())
            def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
                return [c.step % 2 == 0 for c in checkpoints]
        checkpoints = [ckpt.CheckpointMetadata(step, None) for step in range(3)]
        assert KeepEven().should_preserve(checkpoints, context=PreservationContext()) == [True, False, True]
    """

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        """One bool per checkpoint: True keeps it."""


class PreserveAll:
    """Keeps every checkpoint.

    Example::

        with ckpt.Checkpointer("runs/exp1", preservation_policy=PreserveAll()) as ckptr:   # = no policy
            for step in range(3):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [0, 1, 2]
    """

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        return [True] * len(checkpoints)

    def __repr__(self) -> str:
        return "PreserveAll()"


@dataclasses.dataclass(frozen=True)
class LatestN:
    """Keeps the ``n`` newest checkpoints (all of them when ``n`` is None).

    Example::

        with ckpt.Checkpointer("runs/exp1", preservation_policy=LatestN(2)) as ckptr:
            for step in range(4):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [2, 3]
    """

    n: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "n", arguments.count(self.n, "LatestN n", optional=True))

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        if self.n is None:
            return [True] * len(checkpoints)
        cut = len(checkpoints) - self.n
        return [i >= cut for i in range(len(checkpoints))]


@dataclasses.dataclass(frozen=True)
class EveryNSeconds:
    """Keeps the first checkpoint, then each one at least ``interval_secs`` after the last kept.

    Example::

        with ckpt.Checkpointer("runs/exp1", preservation_policy=EveryNSeconds(3600)) as ckptr:   # one per hour
            for step in range(3):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [0, 2]       # 2: the latest is always kept
    """

    interval_secs: float

    def __post_init__(self):
        arguments.number(self.interval_secs, "EveryNSeconds interval_secs")
        if self.interval_secs == 0:
            raise ValueError(f"EveryNSeconds interval_secs must be positive, got {self.interval_secs!r}")

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        keep, last = [], None
        for c in checkpoints:
            ok = last is None or (c.time - last).total_seconds() >= self.interval_secs
            keep.append(ok)
            if ok:
                last = c.time
        return keep


@dataclasses.dataclass(frozen=True)
class EveryNSteps:
    """Keeps steps divisible by ``interval_steps`` (or, with ``exact_interval=False``, the first and then
    each one at least ``interval_steps`` after the last kept); ``max_to_keep`` trims to the newest kept
    (None or 0: no limit, as in Orbax).

    Example::

        with ckpt.Checkpointer("runs/exp1", preservation_policy=EveryNSteps(10)) as ckptr:
            for step in range(0, 25, 5):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [0, 10, 20]
    """

    interval_steps: int
    exact_interval: bool = True
    max_to_keep: int | None = None

    def __post_init__(self):
        _check_interval(self)

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        _refuse_zero(self.interval_steps)
        keep, last = [], None
        for c in checkpoints:
            if self.exact_interval:
                ok = c.step % self.interval_steps == 0
            else:
                ok = last is None or c.step - last >= self.interval_steps
            keep.append(ok)
            if ok:
                last = c.step
        return _newest(keep, self.max_to_keep)


def _check_interval(policy: Any) -> None:
    """ValueError for a negative or non-integer interval or max_to_keep (an interval of 0 raises when
    asked, as in Orbax); numpy integers are taken as ints."""
    name = type(policy).__name__
    object.__setattr__(policy, "interval_steps", arguments.count(policy.interval_steps, f"{name} interval_steps"))
    object.__setattr__(policy, "max_to_keep", arguments.count(policy.max_to_keep, f"{name} max_to_keep", optional=True))


def _refuse_zero(interval_steps: int) -> None:
    if interval_steps == 0:
        raise ValueError("interval_steps must not be 0.")


def _newest(keep: list[bool], max_to_keep: int | None) -> list[bool]:
    """``keep`` with only the newest ``max_to_keep`` of the kept checkpoints still kept; None or 0 keeps
    them all, as in Orbax (a config ported from it with 0 must not delete every step but the latest)."""
    if max_to_keep:
        kept = [i for i, k in enumerate(keep) if k]
        for i in kept[: max(0, len(kept) - max_to_keep)]:
            keep[i] = False
    return keep


@dataclasses.dataclass(frozen=True)
class EveryNStepsClosest:
    """Keeps, for each multiple of ``interval_steps``, the checkpoint closest to it (the later one of
    two as close), and the last one; ``max_to_keep`` trims to the newest kept (None or 0: no limit, as
    in Orbax). Unlike
    ``EveryNSteps(exact_interval=False)``, irregular steps do not make the kept ones drift.

    Example::

        with ckpt.Checkpointer("runs/exp1", preservation_policy=EveryNStepsClosest(10)) as ckptr:
            for step in (0, 4, 9, 13, 21, 23):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [0, 9, 21, 23]
    """

    interval_steps: int
    max_to_keep: int | None = None

    def __post_init__(self):
        _check_interval(self)

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        _refuse_zero(self.interval_steps)
        closest: dict[int, tuple[int, int]] = {}  # multiple -> (distance, index)
        for i, c in enumerate(checkpoints):
            k = round(c.step / self.interval_steps)
            distance = abs(c.step - k * self.interval_steps)
            if k not in closest or distance <= closest[k][0]:
                closest[k] = (distance, i)
        keep = [False] * len(checkpoints)
        for _, i in closest.values():
            keep[i] = True
        if keep:
            keep[-1] = True
        return _newest(keep, self.max_to_keep)


@dataclasses.dataclass(frozen=True)
class CustomSteps:
    """Keeps exactly the given steps (and the latest).

    Example::

        with ckpt.Checkpointer("runs/exp1", preservation_policy=CustomSteps([0, 2])) as ckptr:
            for step in range(4):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [0, 2, 3]
    """

    steps: Sequence[int]

    def __post_init__(self):
        arguments.step_numbers(self.steps, "CustomSteps steps")

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        steps = set(self.steps)
        return [c.step in steps for c in checkpoints]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BestN:
    """Keeps the ``n`` best checkpoints by ``get_metric_fn(metrics)``.

    As in Orbax, ``reverse=False`` keeps the n largest values and ``reverse=True`` the n smallest
    (a loss). NaN ranks worst either way. Checkpoints without metrics are kept if
    ``keep_checkpoints_without_metrics``. As in Orbax, ``n=None`` keeps all, so do no more checkpoints
    than ``n`` (with or without metrics), and ``n=0`` keeps none, not even those without metrics
    (a Checkpointer still keeps its latest step).

    Example::

        lowest_loss = BestN(get_metric_fn=lambda metrics: metrics["loss"], reverse=True, n=1)
        with ckpt.Checkpointer("runs/exp1", preservation_policy=lowest_loss) as ckptr:
            for step, loss in enumerate([0.9, 0.3, 0.5]):
                ckptr.save(step, {"w": np.full(3, step)}, metrics={"loss": loss})
            assert [c.step for c in ckptr.checkpoints] == [1, 2]       # the best, and the latest
    """

    get_metric_fn: Callable[[Any], float]
    reverse: bool = False
    n: int | None = None
    keep_checkpoints_without_metrics: bool = True

    def __post_init__(self):
        if not callable(self.get_metric_fn):
            raise TypeError(f"BestN get_metric_fn must be a function of a step's metrics, got {self.get_metric_fn!r}")
        object.__setattr__(self, "n", arguments.count(self.n, "BestN n", optional=True))

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        if self.n is None or len(checkpoints) <= self.n:
            return [True] * len(checkpoints)
        if self.n == 0:
            return [False] * len(checkpoints)
        with_metrics = [i for i, c in enumerate(checkpoints) if c.metrics is not None]
        keep = [c.metrics is None and self.keep_checkpoints_without_metrics for c in checkpoints]
        ranked = sorted(with_metrics, key=lambda i: self._rank(self.get_metric_fn(checkpoints[i].metrics)),
                        reverse=self.reverse)
        for i in ranked[-self.n:]:
            keep[i] = True
        return keep

    def _rank(self, value: float) -> tuple[bool, float]:
        """Sorts ``value`` so that NaN (a diverged run's loss) ranks worst whichever way is better."""
        nan = value != value
        return (nan, value) if self.reverse else (not nan, value)


@dataclasses.dataclass(frozen=True)
class LatestDuration:
    """Keeps the checkpoints committed within ``duration`` of now and, as in Orbax, every one after the first
    of them in the order given: once reopened, steps are listed by step, and a step saved again with
    ``overwrite=True`` may be newer than the steps listed after it, which are kept too.

    Example::

        last_day = LatestDuration(datetime.timedelta(days=1))
        with ckpt.Checkpointer("runs/exp1", preservation_policy=last_day) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
            ckptr.save(1, {"w": np.ones(3)})
            assert [c.step for c in ckptr.checkpoints] == [0, 1]
    """

    duration: datetime.timedelta

    def __post_init__(self):
        arguments.instance_of(self.duration, datetime.timedelta, "LatestDuration duration")

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        cutoff = now_nsecs() - self.duration // datetime.timedelta(microseconds=1) * 1000  # Orbax's clock
        first = next((i for i, c in enumerate(checkpoints) if (c.commit_timestamp_nsecs or 0) >= cutoff),
                     len(checkpoints))
        return [i >= first for i in range(len(checkpoints))]


@dataclasses.dataclass(frozen=True)
class AnyPreservationPolicy:
    """Keeps a checkpoint when any of ``policies`` keeps it.

    Example::

        policy = AnyPreservationPolicy([LatestN(2), EveryNSteps(100)])
        with ckpt.Checkpointer("runs/exp1", preservation_policy=policy) as ckptr:
            for step in range(0, 250, 50):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [0, 100, 150, 200]
    """

    policies: Sequence[PreservationPolicy]

    def __post_init__(self):
        arguments.each_implements(self.policies, PreservationPolicy, "AnyPreservationPolicy.policies")

    def should_preserve(self, checkpoints: Sequence[CheckpointMetadata], *,
                        context: PreservationContext) -> Sequence[bool]:
        keep = [False] * len(checkpoints)
        for policy in self.policies:
            keep = [a or b for a, b in zip(keep, policy.should_preserve(checkpoints, context=context))]
        return keep
