"""ckpt.Context: Orbax's option tree, the constructor's Context, and ``with ctx:`` scoping."""
import contextlib
import functools
import math
import threading

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


def test_entering_a_context_freezes_its_options_as_orbax_does(tmp_path):
    ctx = ckpt.Context()
    with ctx:
        for group, name, value in [(ctx.array.saving.storage_options, "dtype", np.float16),
                                   (ctx.array.saving, "use_ocdbt", False), (ctx.pytree.loading, "partial_load", True),
                                   (ctx.asynchronous, "timeout_secs", 1), (ctx.memory, "max_inflight_bytes", 1),
                                   (ctx.deletion.gcs_deletion_options, "todelete_full_path", "trash")]:
            with pytest.raises(RuntimeError, match="Cannot mutate options of an active context"):
                setattr(group, name, value)
        with pytest.raises(AttributeError):
            ctx.array = ckpt.ArrayOptions()                  # the groups are read-only, as in Orbax
        inner = ckpt.Context(ctx)                            # a new Context made from it is not frozen
        inner.array.saving.storage_options.dtype = np.float16
        assert ctx.array.saving.storage_options.dtype is None
        with inner:
            with pytest.raises(RuntimeError):
                inner.array.saving.storage_options.dtype = None
            ckpt.save(tmp_path / "m", STATE)                 # the innermost Context applies
        assert ckpt.context.get_context() is ctx
        with pytest.raises(RuntimeError):                    # still frozen after an inner block
            ctx.pytree.loading.partial_load = True
    ctx.pytree.loading.partial_load = True                   # the block is over
    assert ckpt.load(tmp_path / "m")["params"].dtype == np.float16


def test_a_context_copies_the_option_groups_it_starts_from_and_shares_their_values():
    def callback():
        pass

    parent = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=5, post_finalization_callback=callback))
    child = ckpt.Context(parent, memory_options=parent.memory)
    child.asynchronous.timeout_secs = 7
    child.memory.max_inflight_bytes = 1 << 20
    assert parent.asynchronous.timeout_secs == 5 and parent.memory.max_inflight_bytes is None
    assert child.asynchronous.post_finalization_callback is callback
    assert child.checkpointables.registry is parent.checkpointables.registry
    with child, pytest.raises(RuntimeError):                 # entering the child leaves the parent free
        child.memory.max_inflight_bytes = 1
    with child:
        parent.memory.max_inflight_bytes = 1
    assert parent.memory.max_inflight_bytes == 1 and child.memory.max_inflight_bytes == 1 << 20


def test_a_misspelt_option_is_an_error_not_silently_ignored():
    ctx = ckpt.Context()
    with pytest.raises(AttributeError, match="no option 'partial_loading'; its options are partial_load"):
        ctx.pytree.loading.partial_loading = True
    ctx.array.saving.use_zarr3 = True                        # an Orbax option that cannot apply: accepted


@pytest.mark.parametrize("timeout", ["600", math.inf, math.nan, 0, -1, True, None])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_refused_where_it_is_given(tmp_path, timeout):
    # (accepted, then wait() raised "TypeError: '>' not supported between instances of 'str' and 'int'", "OverflowError:
    # timestamp out of range for platform time_t", or TimeoutError at once; a multi-process save, in its barriers)
    with pytest.raises(ValueError, match="AsyncOptions.timeout_secs must be a number of seconds above 0, got "):
        ckpt.AsyncOptions(timeout_secs=timeout)
    ctx = ckpt.Context()
    with pytest.raises(ValueError, match="AsyncOptions.timeout_secs"):
        ctx.async_options.timeout_secs = timeout
    ctx.async_options.timeout_secs = np.int64(60)  # (timedelta takes no numpy integer)
    with ckpt.Checkpointer(tmp_path, context=ctx) as ckptr:
        ckptr.save_async(0, {"w": np.ones(3)})
        ckptr.wait()
        assert ctx.async_options.timeout_secs == 60.0 and [c.step for c in ckptr.checkpoints] == [0]


def test_a_context_is_frozen_only_where_it_is_active():
    ctx = ckpt.Context()
    errors = []

    def other_thread():                                      # contextvars: no active Context there
        try:
            ctx.array.saving.use_ocdbt = False
        except RuntimeError as e:
            errors.append(e)

    with ctx:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert errors == [] and ctx.array.saving.use_ocdbt is False


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
    """By the free saves and deletion too. Was: ckpt.save, save_async and delete took them and went on (a free
    save with active_processes={0}, process 0 saving alone as in Orbax, waited for the other processes)."""
    ckpt.save(tmp_path / "kept", STATE)
    ctx = ckpt.Context()
    if setting == "primary_host":
        ctx.multiprocessing.primary_host = 1
    elif setting == "active_processes":
        ctx.multiprocessing.active_processes = {0}
    else:
        ctx.deletion.gcs_deletion_options.todelete_full_path = "trash"
    with pytest.raises(ValueError, match=setting):
        Checkpointer(tmp_path / "root", context=ctx)
    with ctx:
        for call in (lambda: ckpt.save(tmp_path / "root", STATE), lambda: ckpt.save_async(tmp_path / "root", STATE),
                     lambda: ckpt.delete(tmp_path / "kept")):
            with pytest.raises(ValueError, match=setting):
                call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


@pytest.mark.parametrize("setting", ["primary_host", "todelete_full_path", "path_permission_mode"])
def test_options_given_to_an_open_checkpointer_are_refused_by_its_saves_and_deletions_before_anything_is_written(
        tmp_path, setting):
    """A ``with ctx:`` block around the call, or the constructor's Context changed since. Was: checked when the
    Checkpointer was opened only: its saves made steps of mode 0o7777 (path_permission_mode=-1), with primary_host=1,
    and its deletion with todelete_full_path deleted for good."""
    import os

    ctx = ckpt.Context()
    with Checkpointer(tmp_path, context=ctx) as ckptr:
        ckptr.save(0, STATE)
        bad = ckpt.Context()
        for options in (bad, ctx):
            if setting == "primary_host":
                options.multiprocessing.primary_host = 1
            elif setting == "todelete_full_path":
                options.deletion.gcs_deletion_options.todelete_full_path = "trash"
            else:
                options.file.path_permission_mode = -1
        for active in (bad, contextlib.nullcontext()):
            with active:
                for call in (lambda: ckptr.save(1, STATE, force=True), lambda: ckptr.save_async(1, STATE, force=True),
                             lambda: ckptr.delete(0)):
                    with pytest.raises(ValueError, match=setting):
                        call()
        assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "0"]


@pytest.mark.parametrize("option, value", [("multiprocessing.processes", 3), ("multiprocessing.processes", "jax"),
                                           ("checkpointables.registry", []), ("checkpointables.registry", None),
                                           ("array.saving.scoped_storage_options_creator", 3)])
def test_options_of_the_wrong_kind_are_named_by_a_type_error_before_anything_is_written(tmp_path, option, value):
    """Was: AttributeError "'int' object has no attribute 'count'" (or 'get_all_entries'), TypeError "'int' object
    is not callable", naming no option; a Checkpointer with registry=None saved while the free save failed."""
    ctx = ckpt.Context()
    group, name = option.rsplit(".", 1)
    setattr(functools.reduce(getattr, group.split("."), ctx), name, value)
    with pytest.raises(TypeError, match=name), Checkpointer(tmp_path / "root", context=ctx) as ckptr:
        ckptr.save(0, STATE)
    with ctx, pytest.raises(TypeError, match=name):
        ckpt.save(tmp_path / "model", STATE)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob("root/*"))


@pytest.mark.parametrize("mode", [-1, "0o750", 0o500, 2**40])
def test_a_path_permission_mode_that_is_no_writable_directory_mode_is_refused_before_anything_is_written(tmp_path, mode):
    """Was: -1 gave the directories mode 0o7777 (world-writable, setuid), 0o500 ones their owner could not write
    into (RootNotWritableError once made), '0o750' and 2**40 TypeError and OverflowError once the root was made."""
    ctx = ckpt.Context(file_options=ckpt.FileOptions(path_permission_mode=mode))
    with pytest.raises(ValueError, match="FileOptions.path_permission_mode"):
        Checkpointer(tmp_path / "root", context=ctx)
    assert not (tmp_path / "root").exists()


def test_the_free_saves_give_path_permission_mode_to_the_checkpoint_and_refuse_a_bad_one_before_writing(tmp_path):
    """Was: ckpt.save, save_async and save_checkpointables under a Context with path_permission_mode=0o710
    made the checkpoint with the umask's mode (Orbax's free saves give it the mode, as a Checkpointer's steps)."""
    import os
    import stat

    with ckpt.Context(file_options=ckpt.FileOptions(path_permission_mode=0o710)):  # (no umask's outcome)
        ckpt.save(tmp_path / "a", STATE)
        ckpt.save_async(tmp_path / "b", STATE).result(timeout=60)
        ckpt.save_checkpointables(tmp_path / "c", {"state": STATE})
        (tmp_path / "e").mkdir(mode=0o700)  # (an empty directory replaced: the option's mode, not its own)
        ckpt.save(tmp_path / "e", STATE, overwrite=True)
    assert [oct(stat.S_IMODE(os.stat(tmp_path / name).st_mode)) for name in "abce"] == [oct(0o710)] * 4
    with ckpt.Context(file_options=ckpt.FileOptions(path_permission_mode=0o500)):
        with pytest.raises(ValueError, match="FileOptions.path_permission_mode"):
            ckpt.save(tmp_path / "d", STATE)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "e"]


@pytest.mark.parametrize("option, value", [  # (timeout_secs: refused where it is given, tested above)
    ("post_finalization_callback", "print"), ("max_inflight_bytes", -5), ("max_inflight_bytes", "1GB")])
def test_an_async_or_memory_option_of_the_wrong_kind_is_refused_naming_it_before_anything_is_written(tmp_path, option,
                                                                                                     value):
    """Was: 'print', '1GB' raised TypeError from deep inside the first save (after it committed, for the
    callback), naming no option."""
    memory = option == "max_inflight_bytes"
    group = (ckpt.MemoryOptions if memory else ckpt.AsyncOptions)(**{option: value})
    kind = "memory_options" if memory else "async_options"
    with pytest.raises((ValueError, TypeError), match=f"{type(group).__name__}.{option}"):
        Checkpointer(tmp_path / "root", context=ckpt.Context(**{kind: group}))
    assert not (tmp_path / "root").exists()


def test_path_permission_mode_is_given_to_the_directories_ckpt_creates_never_to_an_existing_one(tmp_path):
    """As in Orbax: the directory a Checkpointer is opened on is the user's once it exists (a home, a
    shared project directory), and its mode stays theirs."""
    import os
    import stat

    ctx = ckpt.Context(file_options=ckpt.FileOptions(path_permission_mode=0o750))
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    for root in (existing, tmp_path / "new"):
        with Checkpointer(root, context=ctx) as ckptr:
            ckptr.save(0, STATE)
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(existing / "0").st_mode) == 0o750
