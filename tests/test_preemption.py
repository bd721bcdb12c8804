"""Preemption without a framework: SIGTERM and ckpt.preemption.notify()."""
from __future__ import annotations

import signal

import numpy as np

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
policy = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000), sdp.PreemptionCheckpointingPolicy()])
with Checkpointer(sys.argv[1], save_decision_policy=policy) as ckptr:
    for step in range(1, 100000):
        state = {"w": np.full(8, step, np.float32)}
        ckptr.save_async(step, state)
        print(f"step {step}", flush=True)
        if ckptr.reached_preemption(step):
            print(f"stopped at {step}", flush=True)
            break
        time.sleep(0.01)
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
    stopped = int(out.strip().splitlines()[-1].removeprefix("stopped at "))
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
