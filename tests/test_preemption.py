"""Preemption without a framework: SIGTERM and ckpt.preemption.notify()."""
from __future__ import annotations

import signal

import numpy as np
import pytest

from ckpt import preemption
from ckpt.training import Checkpointer
from ckpt.training import save_decision_policies as sdp
from tests import procs

WORKER = """
import signal, sys, time
import numpy as np
from ckpt.training import Checkpointer, save_decision_policies as sdp
if sys.argv[2] == "with-handler":
    def user_handler(signum, frame):
        print("user handler ran", flush=True)
    signal.signal(signal.SIGTERM, user_handler)
policy = sdp.FixedIntervalPolicy(1000) if sys.argv[2] == "interval-only" else \
    sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000), sdp.PreemptionCheckpointingPolicy()])
with Checkpointer(sys.argv[1], save_decision_policy=policy) as ckptr:
    for step in range(1, 100000):
        state = {"w": np.full(8, step, np.float32)}
        if sys.argv[2] != "read-only":
            ckptr.save_async(step, state)
        print(f"step {step}", flush=True)
        if sys.argv[2] in ("plain", "with-handler") and ckptr.reached_preemption(step):
            print(f"stopped at {step}", flush=True)
            break
        time.sleep(0.01)
print("the loop ended", flush=True)
"""


def _run_until_sigterm(tmp_path, mode: str) -> tuple[str, int]:
    proc = procs.start(WORKER, str(tmp_path), mode)
    procs.wait_for_line(proc, "step 20")
    proc.send_signal(signal.SIGTERM)
    out = procs.output(proc, timeout=60)
    return out, proc.returncode


def test_sigterm_saves_the_current_step_and_the_loop_stops_cleanly(tmp_path):
    out, code = _run_until_sigterm(tmp_path, "plain")
    assert code == 0, out
    stopped = int(out.strip().splitlines()[-2].removeprefix("stopped at "))
    with Checkpointer(tmp_path) as ckptr:
        assert ckptr.latest.step == stopped
        np.testing.assert_array_equal(ckptr.load()["w"], np.full(8, stopped, np.float32))


def test_sigterm_still_reaches_a_handler_installed_before(tmp_path):
    out, code = _run_until_sigterm(tmp_path, "with-handler")
    assert code == 0, out
    assert "user handler ran" in out
    assert "stopped at" in out


def test_notify_makes_the_preemption_policy_save_the_next_step(tmp_path):
    policy = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(100), sdp.PreemptionCheckpointingPolicy()])
    with Checkpointer(tmp_path, save_decision_policy=policy) as ckptr:
        try:
            assert not ckptr.should_save(7)
            assert not ckptr.reached_preemption(7)
            preemption.notify()
            assert ckptr.should_save(7)
            assert ckptr.save(7, {"x": 1})
            assert ckptr.reached_preemption(7)
        finally:
            preemption.reset()
        assert not ckptr.should_save(8)
        assert [c.step for c in ckptr.checkpoints] == [7]


NOTICE_THEN_SIGTERM = """
import signal, sys
import numpy as np
from ckpt import preemption
from ckpt.training import Checkpointer, save_decision_policies as sdp
policy = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000), sdp.PreemptionCheckpointingPolicy()])
with Checkpointer(sys.argv[1], save_decision_policy=policy) as ckptr:
    for step in range(1, 100):
        if step == 20:
            preemption.notify()                       # a cloud's maintenance notice,
            for _ in range(int(sys.argv[2])):         # then the scheduler's SIGTERM (twice: kill now)
                signal.raise_signal(signal.SIGTERM)
        ckptr.save_async(step, {"w": np.full(8, step)})
        if ckptr.reached_preemption(step):
            print(f"stopped at {step}", flush=True)
            break
    if sys.argv[2] == "0":
        signal.raise_signal(signal.SIGTERM)           # after the step is saved: the last decision is past
print("closed", flush=True)
"""


@pytest.mark.parametrize("sigterms", [1, 2, 0])
def test_a_sigterm_right_after_a_notified_preemption_is_deferred_for_the_loop_to_save_a_second_is_not(tmp_path,
                                                                                                      sigterms):
    """The first SIGTERM after ``notify()`` was taken for a second one and terminated at once: the step the loop
    was about to save for the preemption (or was saving) was lost. One after that step's save decision ends the
    process when the Checkpointer closes, as any SIGTERM after the last save decision does."""
    done = procs.run_script(NOTICE_THEN_SIGTERM, str(tmp_path), str(sigterms))
    with Checkpointer(tmp_path) as ckptr:
        if sigterms == 1:
            assert done.returncode == 0 and "stopped at 20" in done.stdout and "closed" in done.stdout, done
            assert [c.step for c in ckptr.checkpoints] == [20]
        elif sigterms == 2:
            assert done.returncode == -signal.SIGTERM and "stopped" not in done.stdout, done
            assert ckptr.checkpoints == []
        else:
            assert done.returncode == -signal.SIGTERM and "stopped at 20" in done.stdout, done
            assert "closed" not in done.stdout and [c.step for c in ckptr.checkpoints] == [20]


def test_a_loop_that_does_not_stop_after_the_preemption_save_is_ended_as_sigterm_would_end_it(tmp_path):
    """An Orbax-style loop that never asks ``reached_preemption``: the step is saved, and the next step's
    save ends the process by SIGTERM's default action (it ran on until a second signal before)."""
    out, code = _run_until_sigterm(tmp_path, "never-asks")
    assert code == -signal.SIGTERM, out
    assert "the loop ended" not in out
    last = int(out.strip().splitlines()[-1].removeprefix("step "))
    with Checkpointer(tmp_path) as ckptr:
        assert ckptr.latest.step in (last - 1, last)  # the step the SIGTERM arrived at, which the loop passed
        assert [c.step for c in ckptr.checkpoints] == [ckptr.latest.step]


AFTER_THE_LAST_DECISION = """
import sys, time
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    for step in range(1, 4):
        ckptr.save(step, {"w": np.full(8, step, np.float32)})   # each saved (ContinuousCheckpointingPolicy)
    print("the loop ended", flush=True)
    time.sleep(3)   # a final evaluation: the SIGTERM comes now, after the last save decision
    if sys.argv[2] == "raises":
        raise RuntimeError("the evaluation failed")
print("closed", flush=True)
"""


@pytest.mark.parametrize("then", ["closes", "raises"])
def test_a_sigterm_after_the_last_save_decision_terminates_once_the_checkpointer_closes(tmp_path, then):
    """Held back for a save decision that never came, the SIGTERM was swallowed: the script ran on after
    close() as if it had never been sent (until the scheduler's SIGKILL). An exception leaving the ``with``
    block ends the process itself, with its traceback."""
    proc = procs.start(AFTER_THE_LAST_DECISION, str(tmp_path), then)
    procs.wait_for_line(proc, "the loop ended")
    proc.send_signal(signal.SIGTERM)
    out = procs.output(proc, timeout=60)
    if then == "raises":
        assert proc.returncode == 1 and "RuntimeError: the evaluation failed" in out, out
    else:
        assert proc.returncode == -signal.SIGTERM and "closed" not in out, out
    with Checkpointer(tmp_path) as ckptr:
        assert ckptr.latest.step == 3


NEVER_CLOSED = """
import os, signal, sys
import numpy as np
import ckpt
ckptr = ckpt.Checkpointer(sys.argv[1])
for step in range(3):
    ckptr.save(step, {"w": np.full(1 << 20, step, np.float32)})
os.kill(os.getpid(), signal.SIGTERM)   # after the last save decision (a final evaluation, say)
print("the script ends without close()", flush=True)
"""


def test_a_sigterm_after_the_last_save_decision_of_a_script_that_never_closes_ends_it_at_exit(tmp_path):
    """It was swallowed: the script exited with status 0, which a scheduler takes for a job that finished
    (and does not requeue). The saves still writing are finished first."""
    out = procs.run_script(NEVER_CLOSED, str(tmp_path))
    assert out.returncode == -signal.SIGTERM and "the script ends without close()" in out.stdout, out
    with Checkpointer(tmp_path) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1, 2]
        np.testing.assert_array_equal(ckptr.load(2)["w"], np.full(1 << 20, 2, np.float32))


SERVED_THEN = """
import os, signal, sys
import numpy as np
import ckpt
with ckpt.Checkpointer(sys.argv[1]) as ckptr:
    for step in range(10):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        ckptr.save(step, {"w": np.full(8, step, np.float32)})
        if ckptr.reached_preemption(step):
            if sys.argv[2] == "reset":
                ckpt.preemption.reset()   # saved, and the job goes on after all
            break
    if sys.argv[2] == "reset":
        os.kill(os.getpid(), signal.SIGTERM)   # a second preemption, after the last save decision
print("the loop ended", flush=True)
with ckpt.Checkpointer(sys.argv[1]) as reader:   # the script goes on: a report of the last step
    print(f"latest {reader.latest.step}", flush=True)
print("done", flush=True)
"""


@pytest.mark.parametrize("then", ["stops", "reset"])
def test_closing_ends_the_process_only_for_a_sigterm_no_save_served(tmp_path, then):
    """A loop that saved the step a SIGTERM arrived at and stopped goes on as it chooses: a Checkpointer the
    script opened next (to read) ended the process as it closed (each Checkpointer asked whether it had saved
    since the preemption). After ``preemption.reset()``, a second SIGTERM after the last save decision was
    swallowed (the loop's Checkpointer had saved for the first)."""
    out = procs.run_script(SERVED_THEN, str(tmp_path), then)
    if then == "stops":
        assert out.returncode == 0 and "latest 5" in out.stdout and "done" in out.stdout, out
    else:
        assert out.returncode == -signal.SIGTERM and "the loop ended" not in out.stdout, out


@pytest.mark.parametrize("mode", ["interval-only", "read-only"])
def test_sigterm_terminates_at_once_where_no_save_would_be_made_for_it(tmp_path, mode):
    """A policy that never saves on a preemption, or a Checkpointer that only reads: SIGTERM does what it
    does without ckpt (the process ran on, its first SIGTERM swallowed)."""
    out, code = _run_until_sigterm(tmp_path, mode)
    assert code == -signal.SIGTERM, out
    assert "the loop ended" not in out and int(out.strip().splitlines()[-1].removeprefix("step ")) < 1000
    with Checkpointer(tmp_path) as ckptr:
        assert ckptr.checkpoints == []


CLOSED = """
import sys
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    ckptr.save(0, {"w": np.ones(2)})
"""
DROPPED = """
import gc, sys
import numpy as np
from ckpt.training import Checkpointer
def train():
    Checkpointer(sys.argv[1]).save(0, {"w": np.ones(2)})  # never closed
train()
gc.collect()
"""

ASKED_AFTER_CLOSE = """
import sys
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    pass
assert ckptr.should_save(0)  # a closed one still answers, as Orbax's does
assert not ckptr.reached_preemption(0)
"""


@pytest.mark.parametrize("script", [CLOSED, DROPPED, ASKED_AFTER_CLOSE],
                         ids=["closed", "dropped without close", "asked after close"])
def test_a_checkpointer_closed_or_dropped_leaves_sigterm_to_terminate(tmp_path, script):
    """A dropped one's listening outlived it: the first SIGTERM was deferred for a loop that no longer
    exists, for ever; so was it for one asked ``should_save`` or ``reached_preemption`` after ``close``."""
    then_wait = 'import time\nprint("done", flush=True)\ntime.sleep(60)\nprint("still running", flush=True)\n'
    proc = procs.start(script + then_wait, str(tmp_path))
    procs.wait_for_line(proc, "done")
    proc.send_signal(signal.SIGTERM)
    out = procs.output(proc, timeout=60)
    assert proc.returncode == -signal.SIGTERM and "still running" not in out


def test_only_built_in_policies_that_never_look_at_a_preemption_are_known_not_to_save_on_one():
    assert sdp.saves_on_preemption(sdp.AnySavePolicy([sdp.FixedIntervalPolicy(5), sdp.PreemptionCheckpointingPolicy()]))
    assert not sdp.saves_on_preemption(sdp.AnySavePolicy([sdp.FixedIntervalPolicy(5), sdp.InitialSavePolicy(),
                                                         sdp.ContinuousCheckpointingPolicy()]))

    class Mine:
        def should_save(self, step, previous_steps, *, context):
            return context.reached_preemption

    assert sdp.saves_on_preemption(Mine())


def test_a_loop_going_on_after_a_notified_preemption_is_reset_is_not_made_to_wait_at_each_step(tmp_path, monkeypatch):
    """Only a deferred SIGTERM ends a loop that goes on: after ``notify()`` and ``reset()`` (the job goes on
    after all), the next decisions do not wait for the save in flight (async saves would turn sync)."""
    policy = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(100), sdp.PreemptionCheckpointingPolicy()])
    with Checkpointer(tmp_path, save_decision_policy=policy) as ckptr:
        try:
            preemption.notify()
            assert ckptr.save(7, {"x": 1}) and ckptr.reached_preemption(7)
        finally:
            preemption.reset()
        waited = []
        monkeypatch.setattr(ckptr, "wait", lambda: waited.append(True))
        assert not ckptr.should_save(8) and not ckptr.should_save(9)
        assert waited == []


def test_a_process_forked_from_a_listening_loop_is_terminated_by_its_sigterm(tmp_path):
    # the child inherited the parent's listeners: Process.terminate() was deferred for a save it never makes
    script = """
import multiprocessing, sys, time
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    ckptr.save(0, {"w": np.ones(2)})  # the default policy saves on a preemption: this loop listens
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=lambda: started.set() or time.sleep(60))
    child.start()
    started.wait(30)
    child.terminate()
    child.join(30)
    print("child exit code", child.exitcode, flush=True)
    if child.is_alive():
        child.kill()
"""
    done = procs.run_script(script, str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"child exit code {-signal.SIGTERM}" in done.stdout, done.stdout
