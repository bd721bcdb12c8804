"""A training loop that saves forever, for the crash tests: ``python crash_worker.py ROOT MODE``.

MODE is ``sync``, ``async`` or ``mixed`` (async on odd steps). It continues after the latest
committed step of ROOT, keeps the last two steps (``LatestN(2)``, so garbage collection runs after
every commit), and prints ``ready``, then ``begin N`` before each save and ``committed N`` once step N
is committed. The test kills it with SIGKILL at a random moment.
"""
from __future__ import annotations

import sys

import numpy as np

from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp

KEEP = 2


def state(step: int) -> dict:
    """The state saved at ``step``: small leaves (packed), one leaf above 1 MiB (its own array), inline values."""
    return {
        "step": step,
        "name": f"step-{step}",
        "big": np.full(300_000, step, np.float32),
        "small": {f"p{i}": np.arange(64, dtype=np.int32) + step * i for i in range(6)},
        "bytes": bytes([step % 256]) * 33,
    }


def metrics(step: int) -> dict:
    return {"loss": 1.0 / (step + 1)}


def say(line: str) -> None:
    """Prints one whole line (the writer thread prints too: ``print`` would interleave its parts)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def checkpointer(root: str) -> Checkpointer:
    return Checkpointer(root, preservation_policy=pp.LatestN(KEEP))


def main(root: str, mode: str) -> None:
    with checkpointer(root) as ckptr:
        step = 0 if ckptr.latest is None else ckptr.latest.step + 1
        say("ready")
        while True:
            say(f"begin {step}")
            if mode == "sync" or (mode == "mixed" and step % 2 == 0):
                ckptr.save(step, state(step), force=True, metrics=metrics(step))
                say(f"committed {step}")
            else:
                response = ckptr.save_async(step, state(step), force=True, metrics=metrics(step))
                response.on_complete(lambda _, s=step: say(f"committed {s}"))
            step += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
