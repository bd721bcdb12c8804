"""When to save: each policy answers ``should_save(step, previous_steps, *, context)``.

``step`` and ``previous_steps`` are :class:`ckpt.CheckpointMetadata` (``.step``, ``.time``,
``.metrics``); ``previous_steps`` are the committed ones, ascending, including steps found on disk.
Combine policies with :class:`AnySavePolicy`. A policy of your own is any object with this method.

Example::

    policy = AnySavePolicy([FixedIntervalPolicy(1000), PreemptionCheckpointingPolicy()])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Container, Protocol, Sequence, runtime_checkable

from ckpt import arguments
from ckpt.context import MultiprocessingOptions
from ckpt.metadata import CheckpointMetadata


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecisionContext:
    """What a policy may know beyond the steps.

    is_saving_in_progress: a save is still being written in the background.
    reached_preemption: this step is the one to save before the job is preempted.
    multiprocessing_options: the Checkpointer's :class:`ckpt.MultiprocessingOptions` (``primary_host``).

    Example::

        context = DecisionContext(reached_preemption=True)
        step = ckpt.CheckpointMetadata(7, None)
        assert PreemptionCheckpointingPolicy().should_save(step, [], context=context)
    """

    is_saving_in_progress: bool = False
    reached_preemption: bool = False
    multiprocessing_options: MultiprocessingOptions = dataclasses.field(default_factory=MultiprocessingOptions)


@runtime_checkable
class SaveDecisionPolicy(Protocol):
    """Any object with this ``should_save`` method is a save-decision policy.

    Example::

        class EveryStepWhenIdle:                     # a policy of your own
            def should_save(self, step, previous_steps, *, context):
                return not context.is_saving_in_progress
        with ckpt.Checkpointer("runs/exp1", save_decision_policy=EveryStepWhenIdle()) as ckptr:
            assert ckptr.should_save(0)
    """

    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        """Whether ``step`` should be saved."""


@dataclasses.dataclass(frozen=True)
class FixedIntervalPolicy:
    """Saves every step that is a multiple of ``interval``.

    Example::

        with ckpt.Checkpointer("runs/exp1", save_decision_policy=FixedIntervalPolicy(1000)) as ckptr:
            assert ckptr.should_save(2000) and not ckptr.should_save(2001)
    """

    interval: int

    def __post_init__(self):
        interval = arguments.count(self.interval, "FixedIntervalPolicy interval", positive=True)
        object.__setattr__(self, "interval", interval)

    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        return step.step % self.interval == 0


@dataclasses.dataclass(frozen=True)
class SpecificStepsPolicy:
    """Saves exactly the given steps.

    Example::

        with ckpt.Checkpointer("runs/exp1", save_decision_policy=SpecificStepsPolicy({10, 500})) as ckptr:
            assert ckptr.should_save(10) and not ckptr.should_save(11)
    """

    steps: Container[int]

    def __post_init__(self):
        arguments.step_numbers(self.steps, "SpecificStepsPolicy steps")

    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        return step.step in self.steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContinuousCheckpointingPolicy:
    """Saves whenever no save is in flight, and at least ``minimum_interval_secs`` after the last one.

    The interval is measured on the monotonic clock between steps committed in this process (see
    ``CheckpointMetadata.monotonic_nsecs``), so that a wall clock set back or forward changes nothing;
    from a step found on disk, by wall time, and a wall clock that went back counts as the interval passed.

    Example::

        policy = ContinuousCheckpointingPolicy(minimum_interval_secs=600)   # at most one save per 10 min
        with ckpt.Checkpointer("runs/exp1", save_decision_policy=policy) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
            assert not ckptr.should_save(1)                               # too soon after step 0
    """

    minimum_interval_secs: float | None = None

    def __post_init__(self):
        arguments.number(self.minimum_interval_secs, "ContinuousCheckpointingPolicy minimum_interval_secs",
                         optional=True)

    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        if context.is_saving_in_progress:
            return False
        if not previous_steps or self.minimum_interval_secs is None:
            return True
        return _seconds_between(previous_steps[-1], step) >= self.minimum_interval_secs


def _seconds_between(earlier: CheckpointMetadata, later: CheckpointMetadata) -> float:
    """Seconds from one step to a later one: by the monotonic clock when this process stamped both, else by
    wall time; infinite when the wall clock went back (the interval cannot be known, so it has passed)."""
    if earlier.monotonic_nsecs is not None and later.monotonic_nsecs is not None:
        return (later.monotonic_nsecs - earlier.monotonic_nsecs) / 1e9
    seconds = (later.time - earlier.time).total_seconds()
    return seconds if seconds >= 0 else math.inf


class PreemptionCheckpointingPolicy:
    """Saves the step at which a preemption was detected (SIGTERM, ``ckpt.preemption.notify()``, JAX).

    Example::

        policy = AnySavePolicy([FixedIntervalPolicy(1000), PreemptionCheckpointingPolicy()])
        with ckpt.Checkpointer("runs/exp1", save_decision_policy=policy) as ckptr:
            ckpt.preemption.notify()                     # what a SIGTERM does
            assert ckptr.save(1234, {"w": np.ones(3)}) and ckptr.reached_preemption(1234)
    """

    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        return context.reached_preemption

    def __repr__(self) -> str:
        return "PreemptionCheckpointingPolicy()"


PreemptionPolicy = PreemptionCheckpointingPolicy


class InitialSavePolicy:
    """Saves when there is no checkpoint yet.

    Example::

        policy = AnySavePolicy([InitialSavePolicy(), FixedIntervalPolicy(1000)])
        with ckpt.Checkpointer("runs/exp1", save_decision_policy=policy) as ckptr:
            assert ckptr.should_save(7)                  # a run's first step, wherever it starts
    """

    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        return not previous_steps

    def __repr__(self) -> str:
        return "InitialSavePolicy()"


@dataclasses.dataclass(frozen=True)
class AnySavePolicy:
    """Saves when any of ``policies`` says so (asked in order, stopping at the first yes).

    Example::

        policy = AnySavePolicy([FixedIntervalPolicy(1000), SpecificStepsPolicy({1, 10})])
        with ckpt.Checkpointer("runs/exp1", save_decision_policy=policy) as ckptr:
            assert ckptr.should_save(10) and ckptr.should_save(3000) and not ckptr.should_save(11)
    """

    policies: Sequence[SaveDecisionPolicy]

    def __post_init__(self):
        arguments.each_implements(self.policies, SaveDecisionPolicy, "AnySavePolicy.policies")

    def should_save(self, step: CheckpointMetadata, previous_steps: Sequence[CheckpointMetadata], *,
                    context: DecisionContext) -> bool:
        return any(p.should_save(step, previous_steps, context=context) for p in self.policies)


def saves_on_preemption(policy: SaveDecisionPolicy) -> bool:
    """Whether ``policy`` may save the step at which a preemption arrives: True unless it is made only of
    built-in policies that never look at one (a policy of the user's may read ``context.reached_preemption``).

    Example::

        assert saves_on_preemption(default_policy()) and not saves_on_preemption(FixedIntervalPolicy(100))
    """
    if isinstance(policy, AnySavePolicy):
        return any(map(saves_on_preemption, policy.policies))
    return not isinstance(policy, (FixedIntervalPolicy, SpecificStepsPolicy, ContinuousCheckpointingPolicy,
                                   InitialSavePolicy))


def decides_by_step_numbers(policy: SaveDecisionPolicy) -> bool:
    """Whether ``policy``'s answers depend on step numbers only (the step's and the previous steps'), so
    that what it chose can be asked again later: True for built-in policies made only of
    :class:`FixedIntervalPolicy`, :class:`SpecificStepsPolicy` and :class:`InitialSavePolicy`; False
    where the clock, a save in flight, a preemption or a policy of the user's may have answered.

    Example::

        assert decides_by_step_numbers(AnySavePolicy([InitialSavePolicy(), FixedIntervalPolicy(100)]))
        assert not decides_by_step_numbers(default_policy())
    """
    if isinstance(policy, AnySavePolicy):
        return all(map(decides_by_step_numbers, policy.policies))
    return isinstance(policy, (FixedIntervalPolicy, SpecificStepsPolicy, InitialSavePolicy))


def default_policy() -> AnySavePolicy:
    """Save the first step, then whenever no save is in flight, and on preemption (Orbax's default).

    Example::

        with ckpt.Checkpointer("runs/exp1", save_decision_policy=default_policy()) as ckptr:   # = no policy
            ckptr.save(0, {"w": np.ones(3)})
            assert ckptr.should_save(1)                  # no save is in flight
    """
    return AnySavePolicy([InitialSavePolicy(), ContinuousCheckpointingPolicy(), PreemptionCheckpointingPolicy()])
