"""When to save: each policy answers ``should_save(step, previous_steps, *, context)``.

``step`` and ``previous_steps`` are :class:`ckpt.CheckpointMetadata` (``.step``, ``.time``,
``.metrics``); ``previous_steps`` are the committed ones, ascending, including steps found on disk.
Combine policies with :class:`AnySavePolicy`. A policy of your own is any object with this method.

Example::

    policy = AnySavePolicy([FixedIntervalPolicy(1000), PreemptionCheckpointingPolicy()])
"""
from __future__ import annotations

import dataclasses
from typing import Container, Protocol, Sequence, runtime_checkable

from ckpt.metadata import CheckpointMetadata


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecisionContext:
    """What a policy may know beyond the steps.

    is_saving_in_progress: a save is still being written in the background.
    reached_preemption: this step is the one to save before the job is preempted.
    """

    is_saving_in_progress: bool = False
    reached_preemption: bool = False


@runtime_checkable
class SaveDecisionPolicy(Protocol):
    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        """Whether ``step`` should be saved."""


@dataclasses.dataclass(frozen=True)
class FixedIntervalPolicy:
    """Saves every step that is a multiple of ``interval``."""

    interval: int

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval <= 0:
            raise ValueError(f"FixedIntervalPolicy interval must be a positive int, got {self.interval!r}")

    def should_save(self, step, previous_steps, *, context) -> bool:
        return step.step % self.interval == 0


@dataclasses.dataclass(frozen=True)
class SpecificStepsPolicy:
    """Saves exactly the given steps."""

    steps: Container[int]

    def should_save(self, step, previous_steps, *, context) -> bool:
        return step.step in self.steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContinuousCheckpointingPolicy:
    """Saves whenever no save is in flight, and at least ``minimum_interval_secs`` after the last one."""

    minimum_interval_secs: float | None = None

    def should_save(self, step, previous_steps, *, context) -> bool:
        if context.is_saving_in_progress:
            return False
        if not previous_steps or self.minimum_interval_secs is None:
            return True
        return (step.time - previous_steps[-1].time).total_seconds() >= self.minimum_interval_secs


class PreemptionCheckpointingPolicy:
    """Saves the step at which a preemption was detected (SIGTERM, ``ckpt.preemption.notify()``, JAX)."""

    def should_save(self, step, previous_steps, *, context) -> bool:
        return context.reached_preemption

    def __repr__(self) -> str:
        return "PreemptionCheckpointingPolicy()"


PreemptionPolicy = PreemptionCheckpointingPolicy


class InitialSavePolicy:
    """Saves when there is no checkpoint yet."""

    def should_save(self, step, previous_steps, *, context) -> bool:
        return not previous_steps

    def __repr__(self) -> str:
        return "InitialSavePolicy()"


@dataclasses.dataclass(frozen=True)
class AnySavePolicy:
    """Saves when any of ``policies`` says so (asked in order, stopping at the first yes)."""

    policies: Sequence[SaveDecisionPolicy]

    def should_save(self, step, previous_steps, *, context) -> bool:
        return any(p.should_save(step, previous_steps, context=context) for p in self.policies)


def default_policy() -> AnySavePolicy:
    """Save the first step, then whenever no save is in flight, and on preemption (Orbax's default)."""
    return AnySavePolicy([InitialSavePolicy(), ContinuousCheckpointingPolicy(), PreemptionCheckpointingPolicy()])
