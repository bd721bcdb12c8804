"""ckpt.Context: Orbax's option tree, the constructor's Context, and ``with ctx:`` scoping."""
import numpy as np
import pytest

import ckpt
from ckpt import Checkpointer

STATE = {"params": np.arange(4, dtype=np.float32), "opt_state": np.zeros(3)}


def test_the_constructor_context_applies_and_an_active_context_wins_over_it(tmp_path):
    partial = ckpt.Context()
    partial.pytree.loading.partial_load = True
    with Checkpointer(tmp_path, context=partial) as ckptr:
        ckptr.save(0, STATE)
        assert list(ckptr.load(0, {"params": np.zeros(4, np.float32)})) == ["params"]
        strict = ckpt.Context()
        with strict, pytest.raises(ckpt.errors.TreeMismatchError, match="opt_state"):
            ckptr.load(0, {"params": np.zeros(4, np.float32)})
        assert ckpt.context.get_context() is not strict   # the block is over


def test_an_active_context_applies_to_the_free_functions(tmp_path):
    ckpt.save(tmp_path / "m", STATE)
    ctx = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
    with ctx:
        assert list(ckpt.load(tmp_path / "m", {"opt_state": np.zeros(3)})) == ["opt_state"]
    with pytest.raises(ckpt.errors.TreeMismatchError):
        ckpt.load(tmp_path / "m", {"opt_state": np.zeros(3)})


def test_a_storage_dtype_or_chunk_size_is_refused_not_ignored(tmp_path):
    ctx = ckpt.Context()
    ctx.array.saving.storage_options.dtype = np.float16
    with Checkpointer(tmp_path / "root", context=ctx) as ckptr, pytest.raises(ValueError, match="storage_options"):
        ckptr.save(0, STATE)
    with ctx, pytest.raises(ValueError, match="storage_options"):
        ckpt.save(tmp_path / "m", STATE)
    assert not (tmp_path / "m").exists()


def test_post_finalization_callback_runs_after_each_commit(tmp_path):
    committed = []
    ctx = ckpt.Context()
    with Checkpointer(tmp_path, context=ctx) as ckptr:
        ctx.asynchronous.post_finalization_callback = lambda: committed.append(ckptr.latest.step)
        ckptr.save(0, STATE)
        ckptr.save_async(1, STATE, force=True).result()
    assert committed == [0, 1]


@pytest.mark.parametrize("setting", ["primary_host", "active_processes", "todelete_full_path"])
def test_options_ckpt_cannot_honour_are_refused_before_anything_is_written(tmp_path, setting):
    ctx = ckpt.Context()
    if setting == "primary_host":
        ctx.multiprocessing.primary_host = 1
    elif setting == "active_processes":
        ctx.multiprocessing.active_processes = {0}
    else:
        ctx.deletion.gcs_deletion_options.todelete_full_path = "trash"
    with pytest.raises(ValueError, match=setting):
        Checkpointer(tmp_path / "root", context=ctx)
    assert not (tmp_path / "root").exists()
