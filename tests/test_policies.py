"""Save-decision and preservation policies: tables of decisions, with Orbax's semantics."""
from __future__ import annotations

import datetime
import random
import time

import numpy as np
import pytest

import ckpt
from ckpt import CheckpointMetadata
from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp

T0 = 1_700_000_000 * 10**9


def info(step: int, *, secs: float = 0.0, metrics=None) -> CheckpointMetadata:
    return CheckpointMetadata(step, f"/r/{step}", metrics=metrics, commit_timestamp_nsecs=T0 + int(secs * 1e9))


def decide(policy, step: int, previous=(), *, secs: float = 0.0, saving=False, preempted=False) -> bool:
    context = sdp.DecisionContext(is_saving_in_progress=saving, reached_preemption=preempted)
    return policy.should_save(info(step, secs=secs), list(previous), context=context)


def keep(policy, checkpoints) -> list[int]:
    flags = policy.should_preserve(checkpoints, context=pp.PreservationContext())
    return [c.step for c, k in zip(checkpoints, flags) if k]


def test_fixed_interval_saves_multiples_only():
    policy = sdp.FixedIntervalPolicy(5)
    assert [s for s in range(16) if decide(policy, s)] == [0, 5, 10, 15]


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_fixed_interval_rejects_non_positive_interval(bad):
    with pytest.raises(ValueError, match="interval"):
        sdp.FixedIntervalPolicy(bad)


def test_specific_steps_saves_exactly_those():
    policy = sdp.SpecificStepsPolicy({3, 7})
    assert [s for s in range(10) if decide(policy, s)] == [3, 7]


def test_continuous_policy_waits_for_the_save_in_flight_and_the_interval():
    policy = sdp.ContinuousCheckpointingPolicy(minimum_interval_secs=10)
    assert decide(policy, 1)  # nothing saved yet
    assert not decide(policy, 2, [info(1)], saving=True)
    assert not decide(policy, 2, [info(1)], secs=9.9)
    assert decide(policy, 2, [info(1)], secs=10)
    assert decide(sdp.ContinuousCheckpointingPolicy(), 5, [info(4)])


def test_preemption_policy_follows_the_context():
    policy = sdp.PreemptionCheckpointingPolicy()
    assert not decide(policy, 3)
    assert decide(policy, 3, preempted=True)
    assert sdp.PreemptionPolicy is sdp.PreemptionCheckpointingPolicy


def test_initial_policy_saves_only_without_previous_steps():
    policy = sdp.InitialSavePolicy()
    assert decide(policy, 7)
    assert not decide(policy, 8, [info(7)])


def test_any_save_policy_is_an_or_that_stops_at_the_first_yes():
    asked = []

    class Recorder:
        def __init__(self, answer):
            self.answer = answer

        def should_save(self, step, previous_steps, *, context):
            asked.append(self.answer)
            return self.answer

    policy = sdp.AnySavePolicy([Recorder(False), Recorder(True), Recorder(True)])
    assert decide(policy, 1)
    assert asked == [False, True]
    assert not decide(sdp.AnySavePolicy([]), 1)


def test_a_save_after_should_save_said_no_asks_again_once_the_interval_passed(tmp_path, monkeypatch):
    """Orbax's save asks the policy again: a no given before the interval passed does not skip the save."""
    policy = sdp.ContinuousCheckpointingPolicy(minimum_interval_secs=60)
    with Checkpointer(tmp_path, save_decision_policy=policy) as ckptr:
        ckptr.save(0, {"x": 0})
        assert not ckptr.should_save(1)  # too soon
        real = time.monotonic_ns
        monkeypatch.setattr(time, "monotonic_ns", lambda: real() + 61 * 10**9)  # the training step took 61 s
        assert ckptr.save(1, {"x": 1}) is True
        assert [c.step for c in ckptr.checkpoints] == [0, 1]


def test_a_save_after_should_save_said_yes_follows_it_without_asking_again(tmp_path):
    asked = []

    class EveryThird:
        def should_save(self, step, previous_steps, *, context):
            asked.append(step.step)
            return step.step % 3 == 0

    with Checkpointer(tmp_path, save_decision_policy=EveryThird()) as ckptr:
        assert ckptr.should_save(3) and ckptr.save(3, {"x": 3})
        assert asked == [3]  # once: a multi-process job decides once, a caller that prepared the save gets it
        assert not ckptr.should_save(4) and ckptr.save(4, {"x": 4}) is False
        assert asked == [3, 4, 4]  # a no is asked again
        assert ckptr.should_save(6)
        ckptr.reload()  # another listing: the yes is asked again
        assert ckptr.save(6, {"x": 6}) and asked == [3, 4, 4, 6, 6]


def test_a_user_policy_is_any_object_with_should_save(tmp_path):
    class Odd:
        def should_save(self, step, previous_steps, *, context):
            return step.step % 2 == 1

    with Checkpointer(tmp_path, save_decision_policy=Odd()) as ckptr:
        saved = [s for s in range(6) if ckptr.save(s, {"x": np.int32(s)})]
    assert saved == [1, 3, 5]


def test_latest_n_keeps_the_newest():
    cps = [info(s) for s in range(6)]
    assert keep(pp.LatestN(2), cps) == [4, 5]
    assert keep(pp.LatestN(0), cps) == []
    assert keep(pp.LatestN(None), cps) == list(range(6))
    assert keep(pp.LatestN(10), cps) == list(range(6))


def test_every_n_steps_exact_and_inexact_and_max_to_keep():
    cps = [info(s) for s in (0, 3, 4, 7, 8, 9, 12)]
    assert keep(pp.EveryNSteps(4), cps) == [0, 4, 8, 12]
    assert keep(pp.EveryNSteps(4, exact_interval=False), cps) == [0, 4, 8, 12]
    assert keep(pp.EveryNSteps(5, exact_interval=False), [info(s) for s in (1, 3, 6, 7, 12)]) == [1, 6, 12]
    assert keep(pp.EveryNSteps(4, max_to_keep=2), cps) == [8, 12]
    with pytest.raises(ValueError, match="interval_steps must not be 0"):   # when asked, as in Orbax
        keep(pp.EveryNSteps(0), cps)
    with pytest.raises(ValueError, match="interval_steps"):
        pp.EveryNSteps(-1)


@pytest.mark.parametrize("make", [lambda n: pp.EveryNSteps(10, max_to_keep=n),
                                  lambda n: pp.EveryNStepsClosest(10, max_to_keep=n)])
def test_max_to_keep_zero_is_no_limit_as_in_orbax(tmp_path, make):
    """Orbax trims with ``[:-max_to_keep]``, so 0 trims nothing: a config ported from it must not delete
    every step but the latest."""
    cps = [info(s) for s in range(0, 45, 5)]
    assert keep(make(0), cps) == keep(make(None), cps) == [0, 10, 20, 30, 40]
    with Checkpointer(tmp_path, preservation_policy=make(0)) as ckptr:
        for step in range(0, 45, 5):
            ckptr.save(step, {"w": np.full(2, step)}, force=True)
        assert [c.step for c in ckptr.checkpoints] == [0, 10, 20, 30, 40]
        assert ckptr.load(10)["w"][0] == 10


def test_every_n_steps_closest_keeps_the_step_nearest_each_multiple_and_the_latest():
    cps = [info(s) for s in (0, 4, 9, 13, 21, 23)]
    assert keep(pp.EveryNStepsClosest(10), cps) == [0, 9, 21, 23]
    assert keep(pp.EveryNStepsClosest(10, max_to_keep=2), cps) == [21, 23]
    assert keep(pp.EveryNStepsClosest(4), [info(s) for s in (0, 3, 5, 9)]) == [0, 5, 9]   # 3 and 5: the later
    with pytest.raises(ValueError, match="interval_steps must not be 0"):
        keep(pp.EveryNStepsClosest(0), cps)


def test_every_n_seconds_keeps_the_first_then_spaced_ones():
    cps = [info(s, secs=t) for s, t in [(0, 0), (1, 4), (2, 10), (3, 12), (4, 21)]]
    assert keep(pp.EveryNSeconds(10), cps) == [0, 2, 4]


def test_custom_steps_keeps_exactly_those():
    assert keep(pp.CustomSteps([1, 4]), [info(s) for s in range(6)]) == [1, 4]


def test_best_n_orders_like_orbax():
    cps = [info(s, metrics={"loss": loss}) for s, loss in enumerate([0.5, 0.1, 0.9, 0.3])]
    # reverse=False keeps the n largest values, reverse=True the n smallest (a loss).
    assert keep(pp.BestN(get_metric_fn=lambda m: m["loss"], n=2), cps) == [0, 2]
    assert keep(pp.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=2), cps) == [1, 3]
    assert keep(pp.BestN(get_metric_fn=lambda m: m["loss"], n=0), cps) == []
    assert keep(pp.BestN(get_metric_fn=lambda m: m["loss"], n=None), cps) == [0, 1, 2, 3]


def test_best_n_steps_without_metrics_are_kept_only_if_asked():
    cps = [info(0), info(1, metrics={"acc": 0.2}), info(2, metrics={"acc": 0.9}), info(3, metrics={"acc": 0.5})]
    fn = lambda m: m["acc"]  # noqa: E731
    assert keep(pp.BestN(get_metric_fn=fn, n=1), cps) == [0, 2]
    assert keep(pp.BestN(get_metric_fn=fn, n=1, keep_checkpoints_without_metrics=False), cps) == [2]


@pytest.mark.parametrize("metrics, kwargs, kept", [
    ([None, {"loss": 3}], dict(n=3, keep_checkpoints_without_metrics=False), [0, 1]),  # no more than n: all
    ([None, {"loss": 3}, {"loss": 1}], dict(n=3, keep_checkpoints_without_metrics=False), [0, 1, 2]),
    ([None, {"loss": 3}, {"loss": 1}], dict(n=0), []),  # n=0: none, those without metrics neither
    ([None, {"loss": 3}, {"loss": 1}], dict(n=0, keep_checkpoints_without_metrics=True), []),
    ([None, None, {"loss": 1}], dict(n=2, keep_checkpoints_without_metrics=False), [2]),
    ([None, {"loss": 3}, {"loss": 1}, {"loss": 2}], dict(n=3, keep_checkpoints_without_metrics=False), [1, 2, 3]),
])
def test_best_n_with_few_checkpoints_or_n_zero_decides_as_orbax(metrics, kwargs, kept):
    cps = [info(s, metrics=m) for s, m in enumerate(metrics)]
    assert keep(pp.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, **kwargs), cps) == kept


def test_best_n_keeps_a_step_without_metrics_while_there_are_no_more_steps_than_n(tmp_path):
    policy = pp.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=3, keep_checkpoints_without_metrics=False)
    with Checkpointer(tmp_path, preservation_policy=policy) as ckptr:
        ckptr.save(0, {"w": np.zeros(3)})  # the initial save, before any metric
        ckptr.save(1, {"w": np.ones(3)}, metrics={"loss": 3.0})
        assert [c.step for c in ckptr.checkpoints] == [0, 1]
        ckptr.save(2, {"w": np.ones(3)}, metrics={"loss": 2.0})
        ckptr.save(3, {"w": np.ones(3)}, metrics={"loss": 1.0})
        assert [c.step for c in ckptr.checkpoints] == [1, 2, 3]  # four steps: the best three with metrics


def test_latest_duration_keeps_recent_ones():
    now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    cps = [CheckpointMetadata(s, None, commit_timestamp_nsecs=int((now - age) * 1e9))
           for s, age in [(0, 7200), (1, 1800), (2, 5)]]
    assert keep(pp.LatestDuration(datetime.timedelta(hours=1)), cps) == [1, 2]


def test_latest_duration_keeps_every_checkpoint_after_the_first_recent_one_as_orbax_does():
    """Reopened, the steps are listed by step: step 10, saved again with overwrite a minute ago, comes before
    step 20, two hours old. Orbax keeps 20 (it keeps from the first recent checkpoint on); ckpt deleted it."""
    now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    cps = [CheckpointMetadata(s, None, commit_timestamp_nsecs=int((now - age) * 1e9))
           for s, age in [(0, 7200), (10, 60), (20, 7200), (30, 5)]]
    assert keep(pp.LatestDuration(datetime.timedelta(hours=1)), cps) == [10, 20, 30]


def test_any_preservation_policy_is_an_elementwise_or():
    cps = [info(s) for s in range(10)]
    policy = pp.AnyPreservationPolicy([pp.LatestN(2), pp.EveryNSteps(4)])
    assert keep(policy, cps) == [0, 4, 8, 9]


@pytest.mark.parametrize("make", [lambda: pp.LatestN(-1), lambda: pp.BestN(get_metric_fn=len, n=-1),
                                  lambda: pp.EveryNSeconds(0)])
def test_invalid_preservation_arguments_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_policy_sizes_computed_with_numpy_are_taken_as_ints():
    """A size from numpy (``np.ceil(n / batch).astype(int)`` is an np.int64) is an int, as in Orbax."""
    steps_per_epoch = np.ceil(1000 / 256).astype(int)
    made = [sdp.FixedIntervalPolicy(steps_per_epoch), pp.LatestN(np.int64(2)), pp.EveryNSteps(steps_per_epoch),
            pp.EveryNSteps(np.int32(4), max_to_keep=np.int64(1)), pp.EveryNStepsClosest(np.uint8(4)),
            pp.BestN(get_metric_fn=lambda m: m["loss"], n=np.int64(2))]
    assert [made[0].interval, made[1].n, made[2].interval_steps, made[3].max_to_keep, made[4].interval_steps,
            made[5].n] == [4, 2, 4, 1, 4, 2]
    assert all(type(v) is int for v in (made[0].interval, made[1].n, made[3].max_to_keep, made[5].n))
    assert [s for s in range(9) if decide(made[0], s)] == [0, 4, 8]
    assert keep(made[1], [info(s) for s in range(4)]) == [2, 3]
    for bad in (True, 2.0, np.float64(2), "2"):
        with pytest.raises(ValueError, match="LatestN n must be a non-negative int or None"):
            pp.LatestN(bad)


@pytest.mark.parametrize("make, names", [
    (lambda: sdp.SpecificStepsPolicy(500), "SpecificStepsPolicy steps"),
    (lambda: sdp.SpecificStepsPolicy("10"), "SpecificStepsPolicy steps"),
    (lambda: pp.CustomSteps([1.5]), "CustomSteps steps"),
    (lambda: sdp.ContinuousCheckpointingPolicy(minimum_interval_secs="600"), "minimum_interval_secs"),
    (lambda: pp.EveryNSeconds("3600"), "EveryNSeconds interval_secs"),
    (lambda: pp.LatestDuration(3600), "LatestDuration duration"),
    (lambda: pp.BestN(get_metric_fn="loss"), "BestN get_metric_fn"),
    (lambda: sdp.AnySavePolicy(sdp.FixedIntervalPolicy(2)), "AnySavePolicy.policies must be a list"),
    (lambda: sdp.AnySavePolicy([sdp.FixedIntervalPolicy(2), {"interval": 3}]), "AnySavePolicy.policies[1]"),
    (lambda: pp.AnyPreservationPolicy([pp.LatestN(1), None]), "AnyPreservationPolicy.policies[1]"),
    (lambda: ckpt.LocalCheckpointOptions("/mnt/ssd/exp1", preservation_policy=2),
     "LocalCheckpointOptions.preservation_policy"),
    (lambda: ckpt.Context(async_options={"timeout_secs": 600}), "Context async_options"),
])
def test_a_policy_of_wrong_arguments_names_them_when_made(make, names):
    with pytest.raises((TypeError, ValueError)) as raised:
        make()
    assert names in str(raised.value)


def test_steps_of_any_container_are_taken_without_iterating_it():
    class Even:
        def __contains__(self, step):
            return step % 2 == 0

    assert decide(sdp.SpecificStepsPolicy(Even()), 4) and not decide(sdp.SpecificStepsPolicy(Even()), 5)
    assert decide(sdp.SpecificStepsPolicy(range(0, 10**15, 1000)), 3000)


def test_policies_hydra_gave_back_as_configs_are_refused_naming_the_convert_option_to_set():
    """Hydra's instantiate, by default, hands ``AnySavePolicy`` the policies it made in a list as OmegaConf
    configs again (a dataclass becomes a structured config)."""
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    config = OmegaConf.create({"_target_": "ckpt.training.save_decision_policies.AnySavePolicy", "policies": [
        {"_target_": "ckpt.training.save_decision_policies.FixedIntervalPolicy", "interval": 2}]})
    with pytest.raises(Exception, match=r"policies\[0\] must be an object .* `_convert_: object`"):
        hydra_utils.instantiate(config)
    assert hydra_utils.instantiate(config, _convert_="object").policies == [sdp.FixedIntervalPolicy(2)]


@pytest.mark.parametrize("options, names", [
    (dict(save_decision_policy={"class_path": "ckpt.training.save_decision_policies.FixedIntervalPolicy"}),
     "save_decision_policy must be an object with a should_save method"),
    (dict(save_decision_policy=sdp.InitialSavePolicy), "pass an instance, InitialSavePolicy(...)"),
    (dict(save_decision_policy=[sdp.FixedIntervalPolicy(2)]), "save_decision_policy"),
    (dict(preservation_policy=3), "preservation_policy must be an object with a should_preserve method"),
    (dict(step_name_format="{step}"), "step_name_format must be an object with a build_name method"),
    (dict(context={"async_options": None}), "context must be an instance of Context"),
    (dict(local="/mnt/ssd/exp1"), "local must be an instance of LocalCheckpointOptions"),
])
def test_a_checkpointer_of_wrong_arguments_names_them_and_writes_nothing(tmp_path, options, names):
    with pytest.raises(TypeError) as raised:
        Checkpointer(tmp_path / "run", **options)
    assert names in str(raised.value)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- side by side with Orbax's policies
class _FixedClock(datetime.datetime):
    """Now is T0 + 40 s, for both libraries' clocks (``datetime.datetime.now``)."""

    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.fromtimestamp(T0 / 1e9 + 40, tz or datetime.timezone.utc)


def _random_preservation(rng, nested=True):
    """A random preservation policy, as a function of the module that holds the classes (ckpt's or Orbax's)."""
    kind = rng.choice(["PreserveAll", "LatestN", "EveryNSteps", "EveryNStepsClosest", "EveryNSeconds", "CustomSteps",
                       "BestN", "LatestDuration"] + ["AnyPreservationPolicy"] * nested)
    if kind == "AnyPreservationPolicy":
        parts = [_random_preservation(rng, False) for _ in range(rng.randint(1, 3))]
        return lambda module: module.AnyPreservationPolicy([part(module) for part in parts])
    size, interval = rng.choice([None, 0, 1, 2, 3]), rng.choice([1, 2, 5])
    args = {"LatestN": {"n": size},
            "EveryNSteps": {"interval_steps": interval, "exact_interval": rng.random() < 0.5, "max_to_keep": size},
            "EveryNStepsClosest": {"interval_steps": interval, "max_to_keep": size},
            "EveryNSeconds": {"interval_secs": rng.choice([0.5, 1, 3, 10])},
            "CustomSteps": {"steps": rng.sample(range(30), rng.randint(0, 5))},
            "BestN": {"get_metric_fn": lambda m: m["loss"], "reverse": rng.random() < 0.5, "n": size,
                      "keep_checkpoints_without_metrics": rng.random() < 0.5},
            "LatestDuration": {"duration": datetime.timedelta(seconds=rng.choice([2, 5, 10, 30]))}}.get(kind, {})
    return lambda module: getattr(module, kind)(**args)


def _random_save_decision(rng, nested=True):
    """A random save-decision policy, as a function of the module that holds the classes."""
    kind = rng.choice(["FixedIntervalPolicy", "SpecificStepsPolicy", "InitialSavePolicy",
                       "ContinuousCheckpointingPolicy", "PreemptionCheckpointingPolicy"] + ["AnySavePolicy"] * nested)
    if kind == "AnySavePolicy":
        parts = [_random_save_decision(rng, False) for _ in range(rng.randint(1, 3))]
        return lambda module: module.AnySavePolicy([part(module) for part in parts])
    args = {"FixedIntervalPolicy": {"interval": rng.choice([1, 2, 5])},
            "SpecificStepsPolicy": {"steps": set(rng.sample(range(30), 4))},
            "ContinuousCheckpointingPolicy": {"minimum_interval_secs": rng.choice([None, 0, 1, 3])}}.get(kind, {})
    return lambda module: getattr(module, kind)(**args)


def _random_checkpoints(rng) -> list[CheckpointMetadata]:
    """Up to 8 checkpoints in the order saved: mostly ascending steps and times, sometimes not (a step saved
    again with overwrite, listed by step once reopened; a wall clock set back)."""
    steps = rng.sample(range(30), rng.randint(0, 8))
    if rng.random() < 0.6:
        steps.sort()
    nsecs, out = T0 + rng.choice([0, 20, 30]) * 10**9, []
    for step in steps:
        nsecs += int(rng.choice([0, 0.5, 1, 2, 3, 7, -2, -5, -10]) * 1e9)
        metrics = rng.choice([None, {"loss": 0.1}, {"loss": 0.2}, {"loss": float(step)}, {"loss": -float(step)}])
        out.append(info(step, secs=(nsecs - T0) / 1e9, metrics=metrics))
    return out


def test_policies_decide_as_orbaxs_do_on_seeded_random_checkpoints(monkeypatch):
    """Differential: the same checkpoints (steps, times, metrics) handed to each ckpt policy and to Orbax's of
    the same name and arguments give the same answers."""
    orbax_training = pytest.importorskip("orbax.checkpoint.experimental.v1.training",
                                         reason="needs orbax-checkpoint (the dev extra): its policies are the reference")
    from orbax.checkpoint import options as orbax_options

    monkeypatch.setattr(datetime, "datetime", _FixedClock)
    rng = random.Random(0)
    for case in range(400):
        checkpoints = _random_checkpoints(rng)
        preserve = _random_preservation(rng)
        answers = [list(preserve(module).should_preserve(checkpoints, context=module.PreservationContext()))
                   for module in (pp, orbax_training.preservation_policies)]
        assert answers[0] == answers[1], (case, preserve(pp), [(c.step, c.time, c.metrics) for c in checkpoints])

        save_policy = _random_save_decision(rng)
        last = (checkpoints[-1].commit_timestamp_nsecs - T0) / 1e9 if checkpoints else 0
        step = info(rng.randint(0, 35), secs=last + rng.choice([0, 1, 2, 5]))
        saving, preempted = rng.random() < 0.2, rng.random() < 0.2
        contexts = [sdp.DecisionContext(is_saving_in_progress=saving, reached_preemption=preempted),
                    orbax_training.save_decision_policies.DecisionContext(
                        is_saving_in_progress=saving, reached_preemption=preempted,
                        multiprocessing_options=orbax_options.MultiprocessingOptions())]
        answers = [save_policy(module).should_save(step, checkpoints, context=context) for module, context in
                   zip((sdp, orbax_training.save_decision_policies), contexts)]
        assert answers[0] == answers[1], (case, save_policy(sdp), step.step, [(c.step, c.time) for c in checkpoints])
