"""Fixed costs of a Checkpointer on a root that already holds thousands of steps: opening it (and
reading ``latest``), and a training step whose save the policy declines.

Both use the system's ``training`` module (``ckpt.training`` or ``orbax.checkpoint.v1.training``,
which share the API), so ckpt and Orbax run the same code.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any


def fixed_costs(system: Any, tree: Any, root: Path, *, steps: int, reps: int, seconds: float) -> dict:
    """Seconds to open a root of ``steps`` committed steps and read ``latest`` (default and
    ``lightweight_initialize=True``), then per ``save(step, tree)`` and per ``should_save(step)`` that
    ``FixedIntervalPolicy`` declines (each called for about ``seconds``). The steps are hard-linked
    copies of one real save of ``tree``."""
    training = system.training
    with training.Checkpointer(root) as checkpointer:
        checkpointer.save(0, tree, force=True)
    for step in range(1, steps):
        shutil.copytree(root / "0", root / str(step), copy_function=os.link)
    out: dict[str, Any] = {"steps": steps}
    for label, kwargs in (("init_s", {}), ("init_lightweight_s", {"lightweight_initialize": True})):
        try:
            out[label] = statistics.median(_open_latest(training, root, kwargs, steps) for _ in range(reps))
        except Exception as e:  # Orbax 0.12.8: lightweight_initialize breaks `latest` (year 0 timestamps)
            out[label], out[label.removesuffix("_s") + "_error"] = None, f"{type(e).__name__}: {e}"
    policy = training.save_decision_policies.FixedIntervalPolicy(1 << 40)
    with training.Checkpointer(root, save_decision_policy=policy) as checkpointer:
        for label, call in (("declined_save_s", lambda s: checkpointer.save(s, tree)),
                            ("should_save_s", checkpointer.should_save)):
            start, step = time.perf_counter(), steps
            while time.perf_counter() - start < seconds:
                if call(step):
                    raise AssertionError(f"{system.name}: step {step} was saved; the policy declines it")
                step += 1
            out[label] = (time.perf_counter() - start) / (step - steps)
    shutil.rmtree(root, ignore_errors=True)
    return out


def _open_latest(training: Any, root: Path, kwargs: dict, steps: int) -> float:
    start = time.perf_counter()
    with training.Checkpointer(root, **kwargs) as checkpointer:
        latest = checkpointer.latest
    seconds = time.perf_counter() - start
    if latest is None or latest.step != steps - 1:
        raise AssertionError(f"latest is {latest}, expected step {steps - 1}")
    return seconds
