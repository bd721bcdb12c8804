"""A training loop with two checkpoint tiers, for the tier tests: ``python tiers_worker.py MODE DURABLE LOCAL``.

The local tier saves every step and keeps two; the durable tier (DURABLE, an s3:// root in the tests)
saves every ``DURABLE_EVERY`` steps. MODE ``run`` saves steps 0 to 13, waits for the promotions,
prints ``ready`` and waits to be killed. MODE ``preempt`` saves one step after another, printing
``saved N``, until a preemption notice (SIGTERM) reaches a save; it prints ``stopped at N`` and closes
the Checkpointer, which waits for the step's promotion within the grace period. MODE ``interrupt`` saves
steps 0 to 12 as ``run`` does, but the promotion of step 10 hangs once its files are copied, before its
manifest (an upload cut short): it prints ``saved`` once the local saves are committed and waits to be killed.
"""
from __future__ import annotations

import logging
import sys
import time

import numpy as np

import ckpt
from ckpt import distributed
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp

DURABLE_EVERY = 5
GRACE_SECS = 60.0


def state(step: int) -> dict:
    """Random float32 parameters (1.2 MB: an array of its own), small packed leaves and a Python scalar."""
    rng = np.random.default_rng(step)
    return {"params": rng.standard_normal((600, 500), dtype=np.float32),
            "opt": {"mu": rng.standard_normal(64).astype(np.float16), "count": np.int64(step)}, "step": step}


def checkpointer(durable: str, local: str, *, durable_every: int = DURABLE_EVERY) -> ckpt.Checkpointer:
    return ckpt.Checkpointer(
        durable, save_decision_policy=sdp.FixedIntervalPolicy(durable_every), preservation_policy=pp.LatestN(2),
        local=ckpt.LocalCheckpointOptions(local, save_decision_policy=sdp.FixedIntervalPolicy(1),
                                          preservation_policy=pp.LatestN(2), grace_period_secs=GRACE_SECS))


def main(mode: str, durable: str, local: str) -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    if mode == "run":
        with checkpointer(durable, local) as ckptr:
            for step in range(14):
                response = ckptr.save_async(step, state(step))
                if step % DURABLE_EVERY == 0:  # promoted before the next: a newer one would replace it waiting
                    response.result()
            ckptr.wait()
            print("ready", flush=True)
            time.sleep(600)
    if mode == "interrupt":
        settle = distributed.settle

        def hang_before_the_manifest_of_step_10(processes, name, part, timeout_secs, task):
            settle(processes, name, part, timeout_secs, task)  # step 10's files copied, then its manifest never
            if name.endswith("promote/10/written"):
                time.sleep(600)

        distributed.settle = hang_before_the_manifest_of_step_10
        with checkpointer(durable, local) as ckptr:
            for step in range(13):
                response = ckptr.save_async(step, state(step))
                if step in (0, DURABLE_EVERY):  # promoted before the next (step 10's hangs)
                    response.result()
            while ckptr.latest.step != 12:  # (wait() would wait for the hung promotion)
                time.sleep(0.01)
            print("saved", flush=True)
            time.sleep(600)
    with checkpointer(durable, local, durable_every=1000) as ckptr:
        step = 1
        while True:
            ckptr.save_async(step, state(step))
            print(f"saved {step}", flush=True)
            if ckptr.reached_preemption(step):
                print(f"stopped at {step}", flush=True)
                break
            step += 1


if __name__ == "__main__":
    main(*sys.argv[1:])
