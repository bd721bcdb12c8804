"""Async saves block only for the snapshot; failures surface on the next call; async loads work."""
from __future__ import annotations

import errno
import os
import re
import threading

import numpy as np
import pytest

import ckpt
from ckpt import errors, host_memory, saving
from ckpt.training import Checkpointer
from ckpt.training import save_decision_policies as sdp
from tests import procs

ALWAYS = sdp.FixedIntervalPolicy(1)
BIG = (1 << 20) // 4 + 3  # float32 elements: just over the packing threshold, so stored as its own array


def state(step: float) -> dict:
    return {"small": np.full(16, step, np.float32), "big": np.full(BIG, step, np.float32), "n": int(step)}


@pytest.fixture
def gate(monkeypatch):
    """Holds every background write until ``gate.set()``; the caller's side runs normally."""
    event = threading.Event()
    original = saving.StepWriter.run

    def run(self, step):
        assert event.wait(30), "the test never opened the gate"
        return original(self, step)

    monkeypatch.setattr(saving.StepWriter, "run", run)
    yield event
    event.set()


def test_numpy_arrays_mutated_after_save_async_do_not_reach_the_checkpoint(tmp_path, gate):
    s = state(1)
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        response = ckptr.save_async(1, s)
        s["small"] += 100
        s["big"][:] = -1
        gate.set()
        assert response.result(timeout=30) is True
        loaded = ckptr.load(1)
    np.testing.assert_array_equal(loaded["small"], np.full(16, 1, np.float32))
    np.testing.assert_array_equal(loaded["big"], np.full(BIG, 1, np.float32))


def test_torch_tensors_updated_in_place_after_save_async_do_not_reach_the_checkpoint(tmp_path, gate):
    torch = pytest.importorskip("torch")
    s = {"w": torch.ones(BIG, dtype=torch.bfloat16), "b": torch.zeros(4)}
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        response = ckptr.save_async(0, s)
        with torch.no_grad():
            s["w"].mul_(3)
            s["b"].add_(5)
        gate.set()
        response.result(timeout=30)
        loaded = ckptr.load(0, {"w": torch.empty(BIG, dtype=torch.bfloat16), "b": torch.empty(4)})
    assert loaded["w"].dtype == torch.bfloat16 and bool((loaded["w"] == 1).all())
    assert bool((loaded["b"] == 0).all())


def test_donated_jax_buffers_after_save_async_do_not_reach_the_checkpoint(tmp_path, gate):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    step_fn = jax.jit(lambda p: jax.tree.map(lambda x: x * 2 + 1, p), donate_argnums=0)
    params = {"w": jnp.ones(BIG), "b": jnp.arange(8.0)}
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        response = ckptr.save_async(0, params)
        params = step_fn(params)  # the saved buffers are donated and overwritten
        params = step_fn(params)
        gate.set()
        response.result(timeout=30)
        loaded = ckptr.load(0)
    assert isinstance(loaded["w"], jax.Array)
    np.testing.assert_array_equal(np.asarray(loaded["w"]), np.ones(BIG, np.float32))
    np.testing.assert_array_equal(np.asarray(loaded["b"]), np.arange(8.0, dtype=np.float32))


def test_a_second_save_waits_for_the_first_and_both_commit_in_order(tmp_path, gate):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        first = ckptr.save_async(1, state(1))
        assert ckptr.is_saving_in_progress()
        assert ckptr.latest is None
        gate.set()
        second = ckptr.save_async(2, state(2))  # waits for the first before starting
        assert first.done()
        second.result(timeout=30)
        assert not ckptr.is_saving_in_progress()
        assert [c.step for c in ckptr.checkpoints] == [1, 2]


def test_a_no_from_should_save_while_a_save_was_in_flight_is_asked_again_by_the_save_after_it(tmp_path, gate):
    """Orbax's save asks the policy again; a cached no skipped step 1 silently once step 0 was written."""
    with Checkpointer(tmp_path) as ckptr:  # the default policy: not while a save is in flight
        ckptr.save_async(0, state(0))
        assert not ckptr.should_save(1)
        gate.set()
        ckptr.wait()
        assert ckptr.save(1, state(1)) is True
        assert [c.step for c in ckptr.checkpoints] == [0, 1] and ckptr.load(1)["n"] == 1


@pytest.fixture
def written_once_waited_for(gate, monkeypatch):
    """The background write goes on only once the caller waits for it."""
    original = Checkpointer.wait

    def wait(self):
        if self.is_saving_in_progress():
            gate.set()
        original(self)

    monkeypatch.setattr(Checkpointer, "wait", wait)
    return gate


def test_loading_the_step_an_async_save_is_writing_waits_for_it(tmp_path, written_once_waited_for):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save_async(2, state(2))
        assert ckptr.latest is None and not written_once_waited_for.is_set()
        np.testing.assert_array_equal(ckptr.load(2)["big"], np.full(BIG, 2, np.float32))
        assert ckptr.metadata(2).step == 2
        with pytest.raises(ckpt.errors.StepNotFoundError, match="no checkpoint at step 3"):
            ckptr.load(3)


def test_with_two_tiers_loading_the_step_an_async_save_is_writing_waits_for_it(tmp_path, written_once_waited_for):
    """The local tier's save in flight was not waited for: load(2) and metadata(2) raised StepNotFoundError."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=ALWAYS)
    with Checkpointer(tmp_path / "durable", save_decision_policy=sdp.FixedIntervalPolicy(1000), local=local) as ckptr:
        ckptr.save_async(2, state(2))
        assert ckptr.latest is None and not written_once_waited_for.is_set()
        np.testing.assert_array_equal(ckptr.load(2)["big"], np.full(BIG, 2, np.float32))  # was: StepNotFoundError
        ckptr.save_async(3, state(3))
        assert ckptr.metadata(3).step == 3


def test_with_two_tiers_a_step_below_the_one_an_async_save_is_writing_is_not_saved(tmp_path, gate):
    """should_save(6) while step 7 was written on the local tier was True (the durable policy wanted step 6, and the
    local tier's latest committed step was below it): step 6 was saved on both tiers, below the latest."""
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=ALWAYS)
    with Checkpointer(tmp_path / "durable", save_decision_policy=ALWAYS, local=local) as ckptr:
        ckptr.save_async(7, state(7))
        assert not ckptr.should_save(6)  # was: True
        gate.set()
        assert not ckptr.save(6, state(6))
        ckptr.wait()
        assert [c.step for c in ckptr.checkpoints] == [7]


def test_overwriting_the_step_an_async_save_is_writing_waits_for_it_then_replaces_it(tmp_path,
                                                                                      written_once_waited_for):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save_async(1, state(1))
        assert ckptr.save(1, state(7), overwrite=True) is True  # was False, and step 1 kept the old values
        assert written_once_waited_for.is_set()
        assert [c.step for c in ckptr.checkpoints] == [1] and ckptr.load(1)["n"] == 7
        np.testing.assert_array_equal(ckptr.load(1)["big"], np.full(BIG, 7, np.float32))


def test_loading_the_step_an_async_overwrite_is_writing_waits_for_it_and_gets_the_new_values(
        tmp_path, written_once_waited_for):
    """The old version of the step was read (and its metadata given) while the new one was written."""
    with Checkpointer(tmp_path) as ckptr:
        written_once_waited_for.set()
        ckptr.save(1, state(1))
        written_once_waited_for.clear()
        ckptr.save_async(1, state(7), overwrite=True)
        assert ckptr.load(1)["n"] == 7 and written_once_waited_for.is_set()  # was 1


def test_saving_the_step_an_async_save_is_writing_without_overwrite_raises_step_already_exists(
        tmp_path, written_once_waited_for):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save_async(1, state(1))
        with pytest.raises(ckpt.errors.StepAlreadyExistsError, match="step 1 already exists") as raised:
            ckptr.save_async(1, state(7))  # was None, silently
        assert raised.value.step == 1
        assert ckptr.load(1)["n"] == 1


def test_on_complete_is_called_with_the_result(tmp_path):
    seen = []
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        response = ckptr.save_async(3, state(3))
        response.on_complete(seen.append)
        ckptr.wait()
    assert seen == [True]


def test_wait_times_out_per_async_options(tmp_path, gate):
    ctx = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=0.05))
    with Checkpointer(tmp_path, context=ctx, save_decision_policy=ALWAYS) as ckptr:
        first = ckptr.save_async(1, state(1))
        said = f"the save of step 1 ({tmp_path / '1'}) is still running after 0.05 s"  # (it named no step)
        with pytest.raises(TimeoutError, match=re.escape(said)):
            ckptr.wait()
        with pytest.raises(TimeoutError):
            ckptr.save_async(2, state(2))
        gate.set()
        assert first.result(timeout=30)
        assert [c.step for c in ckptr.checkpoints] == [1]



def test_close_times_out_per_async_options_and_the_save_keeps_the_directory_until_it_ends(tmp_path, gate):
    # close() raised its TimeoutError only once the save had ended, however long that took
    ctx = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=0.05))
    ckptr = Checkpointer(tmp_path, context=ctx, save_decision_policy=ALWAYS)
    response = ckptr.save_async(1, state(1))
    with pytest.raises(TimeoutError, match="still running"):
        ckptr.close()
    assert not response.done()
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as other:
        with pytest.raises(errors.DirectoryLockedError):
            other.save(2, state(2))
        gate.set()
        assert response.result(timeout=30)
        other.reload()
        other.save(2, state(2))  # the save has ended: the directory is free
        assert [c.step for c in other.checkpoints] == [1, 2]

@pytest.fixture
def disk_full(monkeypatch):
    """The second manifest write (the first async save's, in the background) fails as on a full disk."""
    original = saving.StepWriter.write_manifest
    calls = []

    def write_manifest(self, step, extra=None):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp_dir))
        return original(self, step, extra)

    monkeypatch.setattr(saving.StepWriter, "write_manifest", write_manifest)


@pytest.mark.parametrize("surface", ["save", "wait", "close", "result"])
def test_a_background_failure_is_raised_by_the_next_call_and_the_step_is_never_listed(tmp_path, disk_full, surface):
    ckptr = Checkpointer(tmp_path, save_decision_policy=ALWAYS)
    ckptr.save(0, state(0))
    response = ckptr.save_async(1, state(1))
    with pytest.raises(OSError, match="No space left"):
        if surface == "save":
            ckptr.save_async(2, state(2))
        elif surface == "wait":
            ckptr.wait()
        elif surface == "close":
            ckptr.close()
        else:
            response.result(timeout=30)
    ckptr.wait()  # reported once only
    assert [c.step for c in ckptr.checkpoints] == [0]
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "0"]  # the temporary directory is gone
    ckptr.close()
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as again:
        assert [c.step for c in again.checkpoints] == [0]
        again.save(1, state(1))
        assert again.load(1)["n"] == 1


def test_a_background_save_that_timed_out_raises_its_own_timeout_error_once(tmp_path, monkeypatch):
    """(A write that timed out, an object store's socket.timeout or a barrier's TimeoutError naming the step and
    rank, reached result() as 'the background operation did not finish within None s', and the next wait
    raised it again.)"""
    def write_manifest(self, step, extra=None):
        raise TimeoutError("timed out writing to the object store")

    monkeypatch.setattr(saving.StepWriter, "write_manifest", write_manifest)
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        with pytest.raises(TimeoutError, match="^timed out writing to the object store$"):
            ckptr.save_async(1, state(1)).result(timeout=30)
        ckptr.wait()  # reported once only
        assert not ckptr.checkpoints


def test_sync_save_is_save_async_then_result(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        assert ckptr.save(0, state(0)) is True
        assert not ckptr.is_saving_in_progress()
        assert ckptr.save_async(0, state(0), force=True, overwrite=True).result() is True


def test_a_bounded_inflight_budget_writes_large_leaves_before_returning(tmp_path, gate):
    ctx = ckpt.Context(memory_options=ckpt.MemoryOptions(max_inflight_bytes=1024))
    s = state(4)
    with Checkpointer(tmp_path, context=ctx, save_decision_policy=ALWAYS) as ckptr:
        response = ckptr.save_async(4, s)
        assert os.path.isdir(tmp_path / "4.ckpt-tmp" / "arrays" / "0")  # written in the caller
        s["big"][:] = -7
        s["small"][:] = -7
        gate.set()
        response.result(timeout=30)
        loaded = ckptr.load(4)
    np.testing.assert_array_equal(loaded["big"], np.full(BIG, 4, np.float32))
    np.testing.assert_array_equal(loaded["small"], np.full(16, 4, np.float32))


def test_load_async_returns_what_load_returns(tmp_path):
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(5, state(5))
        ckptr.save_checkpointables(6, {"a": {"x": np.arange(4)}, "b": [1, 2]})
        latest = ckptr.load_checkpointables_async().result(timeout=30)
        np.testing.assert_array_equal(latest["a"]["x"], np.arange(4))
        loaded = ckptr.load_async(5).result(timeout=30)
        np.testing.assert_array_equal(loaded["big"], ckptr.load(5)["big"])
        parts = ckptr.load_checkpointables_async(6, {"b": None}).result(timeout=30)
        assert parts == {"b": [1, 2]}


def test_free_function_save_async_and_load_async(tmp_path):
    s = state(9)
    response = ckpt.save_async(tmp_path / "one", s)
    s["big"][:] = 0
    response.result(timeout=30)
    loaded = ckpt.load_async(tmp_path / "one").result(timeout=30)
    np.testing.assert_array_equal(loaded["big"], np.full(BIG, 9, np.float32))
    assert loaded["n"] == 9


def test_consecutive_async_saves_reusing_snapshot_buffers_each_keep_their_own_values(tmp_path):
    s = state(0)
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        for step in range(1, 5):
            s["big"][:] = step
            s["small"][:] = step
            response = ckptr.save_async(step, s)
            s["big"][:] = -step  # after the snapshot: never saved
            response.result(timeout=30)
        for step in range(1, 5):
            loaded = ckptr.load(step)
            np.testing.assert_array_equal(loaded["big"], np.full(BIG, step, np.float32))
            np.testing.assert_array_equal(loaded["small"], np.full(16, step, np.float32))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def new_memory(monkeypatch) -> list[int]:
    """The sizes of the buffers ckpt.host_memory makes afresh (not those it hands out again)."""
    made: list[int] = []
    original = host_memory._new

    def counted(nbytes, make):
        made.append(nbytes)
        return original(nbytes, make)

    monkeypatch.setattr(host_memory, "_new", counted)
    return made


def test_a_load_after_an_async_save_reads_into_its_snapshot_buffers_and_neither_sees_the_others_bytes(
        tmp_path, new_memory):
    x, y, z = ({"big": np.full(4 * BIG, v, np.float32), "w": np.full(300, v, np.float32), "n": v} for v in (1, 2, 3))
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, x)
        ckptr.save_async(1, y).result(timeout=30)
        ckptr.save_async(2, y).result(timeout=30)  # the steady state: the snapshot buffers hold y's bytes
        new_memory.clear()
        loaded = ckptr.load(0, abstract_state=x)
        assert max(new_memory, default=0) < x["big"].nbytes  # its reads went into the snapshot buffers
        assert same(loaded, x)
        ckptr.save_async(3, z).result(timeout=30)  # into new snapshot buffers, not the loaded arrays
        assert max(new_memory) >= x["big"].nbytes
        ckptr.save_async(4, y).result(timeout=30)
        assert same(loaded, x)
        assert same(ckptr.load(3, abstract_state=z), z) and same(ckptr.load(4), y)


@pytest.mark.parametrize("prepared", [True, False])
def test_a_first_async_save_after_prepare_async_save_copies_into_the_prepared_memory(tmp_path, prepared, new_memory):
    s = {"small": np.ones(16, np.float32), "big": np.full(4 * BIG, 1, np.float32)}
    with Checkpointer(tmp_path, save_decision_policy=ALWAYS) as ckptr:
        if prepared:
            assert ckptr.prepare_async_save({"state": s}).result(timeout=30) is None
        new_memory.clear()
        ckptr.save_async(1, s)
        ckptr.wait()
        if prepared:
            assert max(new_memory, default=0) < s["big"].nbytes // 4
        else:  # what the preparation saves: the snapshot's own buffers
            assert max(new_memory) >= s["big"].nbytes
        np.testing.assert_array_equal(ckptr.load(1)["big"], s["big"])


_ENDS_AFTER_SAVE_ASYNC = """
import sys
import time
import numpy as np
import ckpt
from ckpt import saving

root, how = sys.argv[1], sys.argv[2]
state = {"w": np.full((1 << 20) + 3, 3, np.float32), "b": np.arange(10), "n": 3}
write = saving.StepWriter.run
saving.StepWriter.run = lambda self, step: time.sleep(0.5) or write(self, step)  # still writing at the exit
if how == "function":
    ckpt.save_async(root + "/one", state)
elif how == "two tiers":  # the local save, then its promotion to the durable root, both still running
    ckpt.Checkpointer(root, local=ckpt.LocalCheckpointOptions(root + "-local")).save_async(0, state, force=True)
elif how == "two promotions":  # step 0's promotion waited for, step 1's queued behind it
    ckptr = ckpt.Checkpointer(root, local=ckpt.LocalCheckpointOptions(root + "-local"))
    first = ckptr.save_async(0, state, force=True)
    ckptr.save_async(1, state, force=True)
    first.result()
else:
    ckpt.Checkpointer(root).save_async(0, state)
if how == "raises":
    raise RuntimeError("the training loop broke after the save")
"""


@pytest.mark.parametrize("how", ["returns", "raises", "function", "two tiers", "two promotions"])
def test_a_script_that_ends_after_save_async_without_waiting_commits_the_step(tmp_path, how):
    # concurrent.futures stops every thread pool at exit: the save, mid-write, used to fail there silently (and
    # a promotion queued behind one that ended, which the exit took for no promotion left, was lost)
    done = procs.run_script(_ENDS_AFTER_SAVE_ASYNC, str(tmp_path), how, timeout=120)
    assert done.returncode == (1 if how == "raises" else 0), done.stderr
    # (two tiers: the exit waits for each tier's writer in turn, and names what is unfinished at its turn)
    unfinished = {"returns": [f"the save of step 0 ({tmp_path}/0)"], "raises": [f"the save of step 0 ({tmp_path}/0)"],
                  "function": [f"the save of {tmp_path}/one"],
                  "two tiers": [f"the save of step 0 ({tmp_path}-local/0)",
                                f"the promotion of step 0 to the durable tier {tmp_path}"],
                  "two promotions": [f"the save of step 1 ({tmp_path}-local/1)",
                                     f"the promotion of step 1 to the durable tier {tmp_path}"]}[how]
    said = re.findall(r"ckpt: the interpreter is exiting with background work unfinished \((.*)\): finishing it first",
                      done.stderr)
    assert said and all(any(what in line for what in unfinished) for line in said), done.stderr
    assert "failed" not in done.stderr
    if how == "function":
        loaded = ckpt.load(tmp_path / "one")
    else:
        with Checkpointer(tmp_path) as ckptr:
            assert [c.step for c in ckptr.checkpoints] == ([0, 1] if how == "two promotions" else [0])
            loaded = ckptr.load()
    if how == "two tiers":
        assert ckpt.load(f"{tmp_path}-local/0")["n"] == 3
    np.testing.assert_array_equal(loaded["w"], np.full((1 << 20) + 3, 3, np.float32))
    assert loaded["n"] == 3


_ENDS_AFTER_DELETE_ASYNC = """
import sys
import time
import numpy as np
import ckpt
from ckpt import root


def slow_delete(*args):  # still deleting at the exit
    time.sleep(0.5)
    if sys.argv[2] == "fails":
        raise PermissionError("read-only")
    delete(*args)


delete, root.delete_step = root.delete_step, slow_delete
ckptr = ckpt.Checkpointer(sys.argv[1])
for step in (0, 1):
    ckptr.save(step, {"w": np.ones(3)}, force=True)
ckptr.delete_async(0)
"""


@pytest.mark.parametrize("how", ["succeeds", "fails"])
def test_a_deletion_still_running_at_exit_is_finished_and_named_as_a_deletion(tmp_path, how):
    """(The exit said 'a save is still being written', and of a failed deletion 'a background save failed'.)"""
    done = procs.run_script(_ENDS_AFTER_DELETE_ASYNC, str(tmp_path), how, timeout=120)
    assert done.returncode == 0, done.stderr
    deletion = f"the deletion of step 0 ({tmp_path}/0)"
    assert f"ckpt: the interpreter is exiting with background work unfinished ({deletion}): finishing it" in done.stderr
    if how == "fails":
        assert (f"ckpt: {deletion} failed in the background before the interpreter exited: PermissionError: "
                "read-only") in done.stderr
    with Checkpointer(tmp_path) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == ([0, 1] if how == "fails" else [1])
    assert "save" not in done.stderr


def test_a_background_failure_no_caller_was_told_of_is_logged_at_exit(tmp_path):
    code = """
import errno, sys
import numpy as np
import ckpt
from ckpt import saving

def full(self, step, extra=None):
    raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp_dir))

saving.StepWriter.write_manifest = full
ckpt.Checkpointer(sys.argv[1]).save_async(7, {"w": np.ones(1 << 20, np.float32)})
"""
    done = procs.run_script(code, str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"ckpt: the save of step 7 ({tmp_path}/7) failed in the background before the interpreter exited: OSError" in done.stderr
    assert "No space left on device" in done.stderr and "7.ckpt-tmp" in done.stderr
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock"]  # its temporary directory removed, nothing committed


_FORKS_WHILE_SAVING = """
import os, sys, threading
import numpy as np
import ckpt
from ckpt import saving

gate, write = threading.Event(), saving.StepWriter.run
saving.StepWriter.run = lambda self, step: gate.wait(60) and write(self, step)  # in flight at the fork
with ckpt.Checkpointer(sys.argv[1]) as ckptr:
    ckptr.save_async(0, {"w": np.arange(10)}, force=True)
    pid = os.fork()
    if pid == 0:  # the child leaves the with block: it must not wait for the parent's save
        print("child sees a save in flight:", ckptr.is_saving_in_progress(), flush=True)
        ckptr.wait()
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    print("child exit status:", status, flush=True)
    gate.set()
"""


def test_a_child_forked_while_an_async_save_is_in_flight_neither_waits_for_it_nor_disturbs_it(tmp_path):
    # the child's copy of the writer waited for a thread that only the parent has: close() hung for timeout_secs
    done = procs.run_script(_FORKS_WHILE_SAVING, str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "child sees a save in flight: False" in done.stdout and "child exit status: 0" in done.stdout, done.stdout
    with Checkpointer(tmp_path) as ckptr:
        np.testing.assert_array_equal(ckptr.load(0)["w"], np.arange(10))
