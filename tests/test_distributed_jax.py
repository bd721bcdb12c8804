"""Multi-process JAX: two processes on 127.0.0.1 save sharded arrays, are killed, and resume."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest

from tests import procs

pytest.importorskip("jax")
WORKER = Path(__file__).with_name("jax_multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(directory: Path, mode: str, *, wait_for: str | None = None) -> list[str]:
    port = str(free_port())
    workers = [procs.start(WORKER, port, str(pid), str(directory), mode) for pid in range(2)]
    try:
        if wait_for is not None:
            return [procs.wait_for_line(w, f"process {pid} {wait_for}", timeout=120) for pid, w in enumerate(workers)]
        outs = [procs.output(w, timeout=120) for w in workers]
        assert all(w.returncode == 0 for w in workers), "\n".join(
            f"process {pid} (exit code {w.returncode}):\n{out}" for pid, (w, out) in enumerate(zip(workers, outs)))
        return outs
    finally:
        for w in workers:
            procs.stop(w)


def test_two_processes_save_sharded_arrays_are_killed_and_resume(tmp_path):
    saved = run_job(tmp_path, "save", wait_for="idle")  # both SIGKILLed once idle
    assert all("saved [1, 2]" not in line for line in saved)
    resumed = run_job(tmp_path, "resume")
    for pid in (0, 1):
        assert "resumed from 3 steps [1, 2, 3, 4]" in resumed[pid]
        # then custom checkpointables (a handler's, and one every process writes a file of) with a storage dtype
        assert f"process {pid} saved custom checkpointables [5, 6]" in resumed[pid]
        assert f"process {pid} restored sharded keys" in resumed[pid]  # typed PRNG keys over both processes
        # arrays on process 0's devices alone: process 1, holding no shard, gets them too (it raised 'damaged')
        assert f"process {pid} restored arrays of process 0 alone, {2 - 2 * pid} shards here" in resumed[pid]
        assert (f"process {pid} refused [\"state['only_on_0'] on process 0, not on process 1\", "
                f"\"state['only_on_1'] on process 1, not on process 0\"] steps [1, 2, 3, 4, 5, 6, 7, 8]") in resumed[pid]
        # (saved and committed with chunks 2 and 3 missing, written by neither process: 'chunk file ... is missing')
        refused = re.search(r"process \d mesh refused: (.*) steps \[1, 2, 3, 4, 5, 6, 7, 8\]", resumed[pid])
        assert refused and refused[1].count("['w']: a jax array of shape (8, 12), float32, in chunks of (2, 12) over "
                                            "devices [") == 2, resumed[pid]
        # (committed as bytes no load could read: 'an array without 'chunk_crc32' must use the crc32c codec')
        assert (f"process {pid} uint4 refused: checkpointable 'state': the array at ['q'] is spread over processes and "
                "has dtype uint4") in resumed[pid] and "steps [1, 2, 3, 4, 5, 6, 7, 8]\n" in resumed[pid]
    for step in ("5", "6"):
        assert sorted(p.name for p in (tmp_path / step / "counter").iterdir() if not p.name.startswith(".")) == [
            "process_0", "process_1"]


def test_a_checkpoint_of_two_processes_loads_in_one_process(tmp_path):
    run_job(tmp_path, "save", wait_for="idle")
    import ckpt

    with ckpt.Checkpointer(tmp_path) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [1, 2, 3]
        assert ckptr.checkpoints[1].metrics == {"loss": 0.5}
        restored = ckptr.load(2, {"w": np.zeros((8, 12), np.float32), "bias": None, "step": None})
    np.testing.assert_array_equal(restored["w"], np.arange(96, dtype=np.float32).reshape(8, 12) * 2)
    assert restored["step"] == 2


def test_the_flax_hook_refuses_a_metric_sharded_over_both_processes_naming_its_key(tmp_path):
    """It raised jax's RuntimeError ('Fetching value for `jax.Array` that spans non-addressable devices'), naming no
    metric. A replicated metric (a jitted step's loss) is stored."""
    outs = run_job(tmp_path, "metric")
    for pid in (0, 1):
        assert (f"process {pid} refused: metric ['vec'] is a jax.Array sharded over other processes' devices "
                f"(NamedSharding(") in outs[pid], outs[pid]
        assert (f"which process {pid} cannot read: pass a replicated value (a jitted step's output with a replicated "
                "sharding, or jax.experimental.multihost_utils.process_allgather of it) or a host value (a Python or "
                "numpy number); nothing was written steps []") in outs[pid], outs[pid]
        assert f"process {pid} stopped True metrics [(2, {{'loss': 0.5}})]" in outs[pid], outs[pid]


def test_two_tiers_each_process_keeps_its_shards_locally_and_a_replaced_host_restores_from_the_durable_tier(tmp_path):
    outs = run_job(tmp_path, "tiers")
    for pid, out in enumerate(outs):
        assert f"process {pid} lists [(2, ['durable', 'local'])]" in out  # local-only steps differ per process
        assert (f"process {pid} step 4 refused: [\"state['only0'] on process 0, not on process 1\", \"state['only1'] on "
                "process 1, not on process 0\"]") in out, out
        assert f"process {pid} restored 2" in out
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["process_0", "process_1"]
    import ckpt

    with ckpt.Checkpointer(tmp_path / "durable") as durable:  # every process's shards were promoted
        restored = durable.load(2, {"w": np.zeros((8, 12), np.float32), "bias": None, "step": None})
    np.testing.assert_array_equal(restored["w"], np.arange(96, dtype=np.float32).reshape(8, 12) * 2)



@pytest.fixture(scope="module")
def preempt_job(tmp_path_factory) -> list[str]:
    return run_job(tmp_path_factory.mktemp("preempt"), "preempt")


def test_a_sigterm_to_one_process_makes_every_process_save_at_jax_preemption_sync_point_and_stop(preempt_job):
    stops = [re.search(rf"process {pid} stopped at (\d+) steps \[(\d+)\]", out) for pid, out in enumerate(preempt_job)]
    assert all(stops), preempt_job
    assert stops[0].groups() == stops[1].groups() and int(stops[0][1]) < 59, preempt_job  # the same step, saved


def test_a_preemption_notified_on_one_process_alone_makes_every_process_save_the_same_step(tmp_path):
    """``ckpt.preemption.notify()`` on process 1 only never reached process 0, which decides for all."""
    outs = run_job(tmp_path, "notice")
    stops = [re.search(rf"process {pid} noticed at (\d+) steps \[(\d+)\]", out) for pid, out in enumerate(outs)]
    assert all(stops), outs
    assert stops[0].groups() == stops[1].groups() and int(stops[0][1]) in (3, 4), outs


def test_a_jax_array_loaded_without_a_sharding_is_on_each_process_own_default_device(preempt_job):
    assert all(f"process {pid} loaded on its own device" in out for pid, out in enumerate(preempt_job)), preempt_job


def test_a_save_only_one_process_makes_raises_ckpt_timeout_error_after_the_timeout(preempt_job):
    assert "process 0 timed out: process 0 of 2 waited 2 s for the other processes at" in preempt_job[0], preempt_job[0]


def test_a_checkpointer_opened_again_on_the_same_root_in_the_same_job_saves(preempt_job):
    """(should_save on process 0 alone before its save shifted the names of the decisions: the processes waited
    for each other at different barriers until the timeout.)"""
    assert "process 0 asked [True, True, True]" in preempt_job[0], preempt_job[0]
    assert all(f"process {pid} reopened and saved 100" in out for pid, out in enumerate(preempt_job)), preempt_job
