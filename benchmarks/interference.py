"""How much a background save slows a compute loop on the main thread.

The loop is single-threaded numpy work (``sin``, a multiply, a reduction over ``compute_bytes`` of
float64, about a millisecond an iteration). Its mean iteration time while a save persists in the
background is compared with its mean iteration time just before and just after, on the same state;
the save's blocking part is not counted. On two cores the loop holds one; ``background_cpu_s`` (CPU
time the other threads of the process used meanwhile) shows how much of the second one the save needs.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _iteration(compute_bytes: int) -> Callable[[], float]:
    rng = np.random.default_rng(0)
    a, b = rng.random(compute_bytes // 8), rng.random(compute_bytes // 8)
    c = np.empty_like(a)

    def step() -> float:
        np.sin(a, out=c)
        np.multiply(c, b, out=c)
        return float(c.sum())

    return step


def _mean_iteration(step: Callable[[], float], until: Callable[[int, float], bool]) -> tuple[float, int]:
    start, iterations = time.perf_counter(), 0
    while not until(iterations, time.perf_counter() - start):
        step()
        iterations += 1
    return (time.perf_counter() - start) / max(iterations, 1), iterations


def measure(system: Any, root: Path, compute_bytes: int, alone_s: float) -> dict:
    """One save of the system's state (step 0 in a fresh ``root``) with the loop running meanwhile,
    and ``alone_s`` of the loop alone before and after."""
    step = _iteration(compute_bytes)
    step()
    os.sync()  # the writeback another system's repetition left is not this save's
    system.open(root)
    try:
        before, _ = _mean_iteration(step, lambda n, t: t >= alone_s)
        pending = system.save_async(0)
        start, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        during, iterations = _mean_iteration(step, lambda n, t: n > 0 and pending.done())
        pending.wait()
        persist = time.perf_counter() - start
        background_cpu = (time.process_time() - cpu) - (time.thread_time() - main_cpu)
        after, _ = _mean_iteration(step, lambda n, t: t >= alone_s)
    finally:
        system.close()
        shutil.rmtree(root, ignore_errors=True)
    alone = (before + after) / 2
    return {"iteration_alone_s": alone, "iteration_during_s": during, "slowdown": during / alone - 1,
            "persist_s": persist, "background_cpu_s": background_cpu, "iterations": iterations}
