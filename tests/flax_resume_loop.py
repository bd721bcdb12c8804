"""Runs the Linen training loop of examples/flax_train.py under ckpt, for the resume tests.

    python tests/flax_resume_loop.py DIRECTORY OUTPUT.npz --steps 12 --save-every 4 \
        [--sigkill-at 6 | --sigkill-saving-at 8 | --sigterm-at 6]

Restores the latest checkpoint in DIRECTORY (or starts fresh), prints ``start <step>``, trains with
the example's jitted, state-donating ``train_step`` and a CheckpointHook, and writes the final
state's leaves (typed keys as key data) to OUTPUT.npz keyed by key path. ``--sigkill-at S`` waits for
the pending checkpoint to commit after training step S, then kills the process with SIGKILL;
``--sigkill-saving-at S`` kills it with SIGKILL as soon as the hook returns at step S (a step it saves),
while that step's asynchronous save is still being written; ``--sigterm-at S`` sends SIGTERM to itself after training step S.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import flax_train  # noqa: E402

from ckpt.integrations.flax import CheckpointHook, restore_train_state  # noqa: E402
from ckpt.training import Checkpointer, save_decision_policies  # noqa: E402


def state_arrays(state) -> dict[str, np.ndarray]:
    """The state's leaves as numpy arrays keyed by key path; typed PRNG keys as their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, required=True)
    parser.add_argument("--sigkill-at", type=int)
    parser.add_argument("--sigkill-saving-at", type=int)
    parser.add_argument("--sigterm-at", type=int)
    args = parser.parse_args()

    policy = save_decision_policies.FixedIntervalPolicy(args.save_every)
    with Checkpointer(args.directory, save_decision_policy=policy) as ckptr:
        state = restore_train_state(ckptr, flax_train.create_state())
        start = int(state.step)
        print(f"start {start}", flush=True)
        hook = CheckpointHook(ckptr, final_step=args.steps)
        for step in range(start + 1, args.steps + 1):
            state, _ = flax_train.train_step(state, *flax_train.synthetic_batch(step))
            if step == args.sigkill_at:
                ckptr.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            stop = hook(step, state)
            if step == args.sigkill_saving_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                print(f"stop {step}", flush=True)
                break
    np.savez(args.output, **state_arrays(state))


if __name__ == "__main__":
    main()
