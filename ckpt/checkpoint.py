"""Free functions on one checkpoint directory (no sequence of steps, no policies).

Example::

    ckpt.save("/tmp/model", {"w": np.ones((2, 2))})
    tree = ckpt.load("/tmp/model")
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from ckpt import background, distributed, formats, loading, orbax, root, saving, storage, transfers
from ckpt import format as fmt
from ckpt.context import get_context
from ckpt.errors import CheckpointNotFoundError, ForeignEntryError, NotACheckpointError
from ckpt.metadata import CheckpointMetadata
from ckpt.training import checkpoint_metadata


def _coordination(what: str) -> tuple[distributed.Processes, str, float]:
    """The processes of a free ``what`` (``ckpt.save``) under the active context, the name of this call's
    barriers (the same in every process: not by path, as the processes' paths are compared) and their timeout."""
    options = get_context().multiprocessing_options
    options.check()  # (its processes are asked here, before the call's own check)
    processes = options.processes or distributed.current()
    number = distributed.call_number(processes, what)
    return processes, f"{options.barrier_sync_key_prefix or ''}{what}/{number}", get_context().async_options.timeout_secs


def _writer(path: str | os.PathLike, checkpointables: dict[str, Any], overwrite: bool,
            custom_metadata: Any) -> saving.StepWriter:
    """The writer of a free save. In a multi-process job (``jax.distributed``, ``torch.distributed``, or
    the context's ``MultiprocessingOptions.processes``) every process calls it, as a Checkpointer's save:
    each writes its own shards, process 0 the rest and the commit."""
    final = storage.location(path)
    options = get_context()
    processes, operation, timeout = _coordination("ckpt.save")
    tmp, prepared = storage.temporary_for(final), []

    def prepare() -> None:  # a failure in any process raises in all, before any writes
        options.check()
        plan, handled = saving.plan_checkpointables(checkpointables, options, custom_metadata=custom_metadata)
        root.check_target(final, tmp, step=None, overwrite=overwrite)
        prepared.append((plan, handled))

    distributed.settle(processes, f"{operation}/planned", prepare, timeout, f"the save of {final}")
    (plan, handled), = prepared
    saving.agree(plan, final, processes, f"{operation}/checked", timeout)
    root.make(final.parent, what=f"the directory {final.name} is saved in")
    writer = saving.StepWriter(plan, tmp, final, overwrite=overwrite,
                               dir_mode=options.file_options.path_permission_mode, processes=processes,
                               operation=operation, timeout_secs=timeout)
    writer.start_custom(handled)
    return writer


def _write(writer: saving.StepWriter) -> None:
    """Writes and commits a free save, then removes what a crash left beside its path (locally: no root's writer
    sweeps the directory of a free save): ``<name>.ckpt-deleting`` of a deletion, ``<name>.ckpt-replaced`` of an
    overwrite (the checkpoint this save replaced)."""
    writer.run(None)
    if writer.primary and isinstance(writer.final_dir, Path):
        storage.remove_deletion_leftover(writer.final_dir)
        storage.remove_replaced_leftover(writer.final_dir)


class _Saving:
    """The paths this process's free saves are writing, which a deletion of one waits for: on an object store a save
    writes in place, and a deletion meanwhile removed its first objects (ckpt's marker among them), leaving the
    rest, which ckpt then refused to remove as not its own."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._hurry: dict[str, list[Callable[[], None]]] = {}  # a path's saves' ways to write at full speed

    def begin(self, path: storage.Location) -> list[Callable[[], None]]:
        """Records a save of ``path`` beginning; returns its entry, where it may put its ``hurry``, for :meth:`end`."""
        entry: list[Callable[[], None]] = []
        with self._changed:
            self._hurry.setdefault(str(path), []).append(entry)
        return entry

    def end(self, path: storage.Location, entry: list[Callable[[], None]]) -> None:
        with self._changed:
            entries = self._hurry[str(path)]
            entries.remove(entry)
            if not entries:
                del self._hurry[str(path)]
            self._changed.notify_all()

    def wait(self, path: storage.Location, timeout: float) -> None:
        """Waits for this process's saves of ``path`` to end (hurried to full speed).

        Raises:
          TimeoutError: one is still writing after ``timeout`` seconds (AsyncOptions.timeout_secs); nothing was deleted.
        """
        with self._changed:
            for entry in self._hurry.get(str(path), []):
                for hurry in entry:
                    hurry()
            if not self._changed.wait_for(lambda: str(path) not in self._hurry, timeout):
                raise TimeoutError(f"cannot delete {path}: a save of it by this process is still being written after "
                                   f"{timeout} s (AsyncOptions.timeout_secs); nothing was deleted. Wait for the save "
                                   "(its result()) first.")


_saving = _Saving()


def save_checkpointables(path: str | os.PathLike, checkpointables: dict[str, Any], *, overwrite: bool = False,
                         custom_metadata: Any = None) -> None:
    """Saves named trees as one checkpoint directory at ``path``, atomically.

    Example::

        ckpt.save_checkpointables("model", {"params": {"w": np.ones(3)}, "opt_state": {"m": np.zeros(3)}})
        params = ckpt.load("model", checkpointable_name="params")
    """
    final = storage.location(path)
    entry = _saving.begin(final)
    try:
        _write(_writer(final, checkpointables, overwrite, custom_metadata))
    finally:
        _saving.end(final, entry)


def save_checkpointables_async(path: str | os.PathLike, checkpointables: dict[str, Any], *, overwrite: bool = False,
                               custom_metadata: Any = None) -> background.AsyncResponse[None]:
    """Copies the trees, then writes them in a background thread; ``result()`` waits for the commit.

    Example::

        response = ckpt.save_checkpointables_async("model", {"params": {"w": np.ones(3)}, "data": {"epoch": 2}})
        response.result(timeout=60)
        assert ckpt.load("model", checkpointable_name="data") == {"epoch": 2}
    """
    final = storage.location(path)
    entry = _saving.begin(final)
    try:
        writer = _writer(final, checkpointables, overwrite, custom_metadata)
        try:
            writer.hand_off()
        except BaseException:
            writer.discard()
            raise
    except BaseException:
        _saving.end(final, entry)
        raise
    entry.append(writer.hurry)

    def write() -> None:
        try:
            _write(writer)
        finally:
            _saving.end(final, entry)

    saver = background.BackgroundWriter("ckpt-save")
    response = saver.submit(write, hurry=writer.hurry, what=f"the save of {writer.final_dir}")
    saver.shutdown(wait=False)
    return response


def save(path: str | os.PathLike, state: Any, *, checkpointable_name: str = fmt.DEFAULT_CHECKPOINTABLE,
         overwrite: bool = False, custom_metadata: Any = None) -> None:
    """Saves one tree as a checkpoint directory at ``path``.

    Example::

        ckpt.save("model", {"w": np.ones(3), "step": 100})
        ckpt.save("model", {"w": np.zeros(3), "step": 200}, overwrite=True)   # else StepAlreadyExistsError
    """
    save_checkpointables(path, {checkpointable_name: state}, overwrite=overwrite, custom_metadata=custom_metadata)


def save_async(path: str | os.PathLike, state: Any, *, checkpointable_name: str = fmt.DEFAULT_CHECKPOINTABLE,
               overwrite: bool = False, custom_metadata: Any = None) -> background.AsyncResponse[None]:
    """Async :func:`save`.

    Example::

        state = {"w": np.ones(3)}
        response = ckpt.save_async("model", state)       # returns once the state is copied
        state["w"] += 1
        response.result(timeout=60)                      # committed
        assert ckpt.load("model")["w"][0] == 1           # the values at the call
    """
    return save_checkpointables_async(path, {checkpointable_name: state}, overwrite=overwrite,
                                      custom_metadata=custom_metadata)


def _existing(path: str | os.PathLike) -> storage.Location:
    """``path`` as a location; CheckpointNotFoundError naming it when nothing is there (not "damaged", nor, on an
    object store, "deleted while it was being read"). On an object store, where a read takes a missing manifest
    for a deletion (see :func:`ckpt.root.reading`), objects without one raise CheckpointCorruptedError here, as
    a local directory's load does: not a committed checkpoint."""
    step_dir = storage.location(path)
    if isinstance(step_dir, Path) or not (step_dir / fmt.MANIFEST).exists():
        if not step_dir.exists():
            raise _not_found(step_dir)
        root.check_committed(step_dir)
        orbax.check_checkpoint(step_dir)
        if not isinstance(step_dir, Path):
            loading.read_manifest(step_dir)  # raises: its manifest is missing
    return step_dir


def _not_found(step_dir: storage.Location) -> CheckpointNotFoundError:
    """The error for a checkpoint path where nothing is: it names the checkpoint a save with ``overwrite=True`` set
    aside there when a crash interrupted it (which :func:`save` takes for the checkpoint), and how to get it back."""
    aside = _set_aside(step_dir)
    hint = "" if aside is None else (
        f"; {aside} holds it as it was before a save with overwrite=True that a crash interrupted: rename it back "
        f"to {step_dir}")
    return CheckpointNotFoundError(f"no checkpoint at {step_dir}: the path does not exist{hint}")


def _set_aside(step_dir: storage.Location) -> Path | None:
    """``<step_dir>.ckpt-replaced``, where a save with ``overwrite=True`` that a crash interrupted set the checkpoint
    aside and nothing is at ``step_dir`` (ckpt's only, as a save asks: see :func:`ckpt.storage.set_aside_step`); else
    None."""
    aside = step_dir.with_name(step_dir.name + fmt.REPLACED_SUFFIX) if isinstance(step_dir, Path) else None
    return None if aside is None or storage.set_aside_step(aside) is None else aside


def load_checkpointables(path: str | os.PathLike, abstract_checkpointables: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loads the named trees of the checkpoint at ``path`` (all of them when None).

    Example::

        ckpt.save_checkpointables("model", {"params": {"w": np.ones(3)}, "opt_state": {"m": np.zeros(3)}})
        assert sorted(ckpt.load_checkpointables("model")) == ["opt_state", "params"]
        params = ckpt.load_checkpointables("model", {"params": None})["params"]   # None: as saved
    """
    step_dir = _existing(path)
    partial = get_context().pytree_options.loading.partial_load
    with root.reading(step_dir):
        return formats.load_checkpointables(step_dir, abstract_checkpointables, partial_load=partial)


def _tree_name(checkpointable_name: str | None) -> str:
    """The name a free load reads: Orbax's None (the tree of a checkpoint whose files are the tree itself, as
    Orbax's direct checkpoints are) is read as ``"AUTO"``: ``state``, else the checkpoint's only tree."""
    return fmt.AUTO if checkpointable_name is None else checkpointable_name


def load(path: str | os.PathLike, abstract_state: Any = None, *,
         checkpointable_name: str | None = fmt.DEFAULT_CHECKPOINTABLE) -> Any:
    """Loads one tree of the checkpoint at ``path``; see ``Checkpointer.load`` for ``abstract_state``.
    ``checkpointable_name=None`` reads the tree of a checkpoint without named trees (Orbax's direct ones).

    Example::

        ckpt.save("model", {"w": np.ones(3, np.float32), "step": 100})
        state = ckpt.load("model")                       # as saved
        state = ckpt.load("model", {"w": np.zeros(3, np.float16), "step": 0})
        assert state["w"].dtype == np.float16 and state["step"] == 100
        state = ckpt.load("model", {"w": ckpt.PLACEHOLDER, "step": 0})   # "w" is not read
        assert ckpt.PLACEHOLDER is ... and state["w"] is ...
    """
    name = _tree_name(checkpointable_name)
    return load_checkpointables(path, {name: abstract_state})[name]


def load_async(path: str | os.PathLike, abstract_state: Any = None, *,
               checkpointable_name: str | None = fmt.DEFAULT_CHECKPOINTABLE) -> background.AsyncResponse[Any]:
    """:func:`load` in a background thread.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        response = ckpt.load_async("model")
        state = response.result(timeout=60)
    """
    return _in_background(load, path, abstract_state, checkpointable_name=checkpointable_name)


def load_checkpointables_async(
        path: str | os.PathLike,
        abstract_checkpointables: dict[str, Any] | None = None) -> background.AsyncResponse[dict[str, Any]]:
    """:func:`load_checkpointables` in a background thread (Orbax's raises NotImplementedError).

    Example::

        ckpt.save_checkpointables("model", {"params": {"w": np.ones(3)}})
        trees = ckpt.load_checkpointables_async("model").result(timeout=60)
        assert trees["params"]["w"].shape == (3,)
    """
    return _in_background(load_checkpointables, path, abstract_checkpointables)


def _in_background(fn: Any, *args: Any, **kwargs: Any) -> background.AsyncResponse[Any]:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-load")
    future = executor.submit(transfers.with_callers_placement(lambda: fn(*args, **kwargs)))
    executor.shutdown(wait=False)
    return background.AsyncResponse(future)


def delete(path: str | os.PathLike, *, checkpointable_name: str | None = None, missing_ok: bool = False) -> bool:
    """Deletes the checkpoint at ``path`` (ckpt's or Orbax's) as garbage collection deletes a step: renamed
    aside first, so that a deletion interrupted leaves no half checkpoint at ``path``. Anything else there
    (not a checkpoint) raises ``NotACheckpointError`` (a ``ForeignEntryError`` and an ``InvalidLayoutError``,
    as Orbax's) and is left alone. A save of it by this process (``save_async``, or a save in another thread) is
    waited for first (for at most ``AsyncOptions.timeout_secs``); no other process may be using it.

    Returns True when it was deleted, False when nothing was at ``path`` and ``missing_ok`` is set. The checkpoint a
    save with ``overwrite=True`` that a crash interrupted left set aside (``<path>.ckpt-replaced``, nothing at
    ``path``), which a save without ``overwrite`` refuses to replace, is the one deleted then. On an
    object store (``s3://``, ``gs://``), what a save or a deletion of ckpt's that a crash cut short left at
    ``path`` is deleted too (locally it lies under a temporary name, which the next save there removes).
    ``checkpointable_name`` (Orbax deletes one checkpointable of a checkpoint) raises ValueError: a ckpt
    checkpoint's trees share its files. In a multi-process job every process calls it, as it saves (and as
    Orbax's): process 0 deletes once every process has called it, and every process returns once the
    checkpoint is gone, or raises process 0's error; processes deleting other paths raise ValueError.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        assert ckpt.delete("model") and not os.path.exists("model")
        assert ckpt.delete("model", missing_ok=True) is False
    """
    return _deletion(path, checkpointable_name, missing_ok)()


def delete_async(path: str | os.PathLike, *, checkpointable_name: str | None = None,
                 missing_ok: bool = False) -> background.AsyncResponse[bool]:
    """:func:`delete` in a background thread.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        assert ckpt.delete_async("model").result(timeout=60)
    """
    return _in_background(_deletion(path, checkpointable_name, missing_ok))


def _deletion(path: str | os.PathLike, checkpointable_name: str | None, missing_ok: bool) -> Callable[[], bool]:
    """:func:`delete`, its arguments checked and its barriers named (in the caller's thread, as they are
    named in the order of the calls)."""
    root.whole_checkpoints_only(checkpointable_name)
    get_context().check()
    step_dir = storage.location(path)
    processes, operation, timeout = _coordination("ckpt.delete")

    aside: list[Path | None] = []  # the checkpoint set aside, where nothing is at step_dir (see _set_aside)

    def delete_here() -> None:
        if processes.index != 0:  # (every process sees the directory: the primary deletes)
            return
        if aside[0] is not None:  # put back first (as a Checkpointer opened there would), then deleted as any
            storage.put_back(aside[0], step_dir)
        elif isinstance(step_dir, Path) and root.classify(step_dir, None).kind in root.LISTED:
            # (before: once the checkpoint is gone, it would be taken for it set aside; only beside a checkpoint this
            # deletes: beside anything else it is the only copy of the checkpoint an overwrite's crash set aside)
            storage.remove_replaced_leftover(step_dir)
        try:
            root.delete_step(step_dir, None)  # (on an object store, also what a crash cut short there)
        except ForeignEntryError as e:
            raise NotACheckpointError(str(e), path=e.path) from None

    def deletion() -> bool:
        _saving.wait(step_dir, timeout)
        exists = storage.exists(step_dir)  # (asked before the first barrier: the primary deletes after it)
        aside[:] = [None if exists else _set_aside(step_dir)]
        if not exists and aside[0] is None:
            if missing_ok:
                return False
            raise _not_found(step_dir)
        differ = distributed.differences(processes, f"{operation}/path", storage.place(step_dir), str(step_dir),
                                         timeout)
        if differ:
            paths = "; ".join(f"process {i}: {p}" for i, p in sorted(differ.items()))
            raise ValueError(f"the processes of this job delete different checkpoints ({paths}): every process deletes "
                             "the same one (to delete from one process alone, delete inside ckpt.Context("
                             "multiprocessing_options=ckpt.MultiprocessingOptions(processes=ckpt.distributed."
                             "SingleProcess()))); nothing was deleted")
        distributed.settle(processes, f"{operation}/deleted", delete_here, timeout, f"the deletion of {step_dir}",
                           commits=False)
        return True

    return deletion


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint ckpt loads, its own or one Orbax wrote (Orbax's function tells of its own).

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        assert ckpt.is_orbax_checkpoint("model") and not ckpt.is_orbax_checkpoint("nothing/here")
    """
    step_dir = storage.location(path)
    if not storage.exists(step_dir):
        return False
    return root.classify(step_dir, None).kind in root.LISTED


def metadata(path: str | os.PathLike,
             checkpointable_name: str | None = fmt.DEFAULT_CHECKPOINTABLE) -> CheckpointMetadata:
    """One tree of the checkpoint at ``path`` (``state``, else its only one), with :class:`ckpt.LeafMetadata` leaves;
    ``checkpointable_name`` as for :func:`load`.

    Example::

        ckpt.save("model", {"w": np.ones((2, 3), np.float32)})
        info = ckpt.metadata("model")                    # no array is read
        assert info.metadata["w"].shape == (2, 3) and info.metadata["w"].dtype == np.float32
        state = ckpt.load("model", info)                 # as saved
    """
    step_dir = _existing(path)
    with root.reading(step_dir):
        return checkpoint_metadata(step_dir, _tree_name(checkpointable_name),
                                   registry=get_context().checkpointables_options.registry)


def checkpointables_metadata(path: str | os.PathLike) -> CheckpointMetadata:
    """Every checkpointable's tree of the checkpoint at ``path``, with ``LeafMetadata`` leaves.

    Example::

        ckpt.save_checkpointables("model", {"params": {"w": np.ones(3)}, "data": {"epoch": 2}})
        trees = ckpt.checkpointables_metadata("model").metadata
        assert trees["params"]["w"].shape == (3,) and trees["data"]["epoch"].type == "int"
    """
    step_dir = _existing(path)
    with root.reading(step_dir):
        return checkpoint_metadata(step_dir, None, registry=get_context().checkpointables_options.registry)


# -------------------------------------------------------------------------- deprecated aliases (Orbax's)
def save_pytree(*args: Any, **kwargs: Any) -> None:
    """Deprecated: use :func:`save`.

    Example::

        ckpt.save("model", {"w": np.ones(3)})            # not ckpt.save_pytree("model", ...)
    """
    warnings.warn("Use `save` instead.", DeprecationWarning, stacklevel=2)
    return save(*args, **kwargs)


def save_pytree_async(*args: Any, **kwargs: Any) -> background.AsyncResponse[None]:
    """Deprecated: use :func:`save_async`.

    Example::

        ckpt.save_async("model", {"w": np.ones(3)}).result(timeout=60)   # not ckpt.save_pytree_async
    """
    warnings.warn("Use `save_async` instead.", DeprecationWarning, stacklevel=2)
    return save_async(*args, **kwargs)


def load_pytree(*args: Any, **kwargs: Any) -> Any:
    """Deprecated: use :func:`load`.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        state = ckpt.load("model")                       # not ckpt.load_pytree("model")
    """
    warnings.warn("Use `load` instead.", DeprecationWarning, stacklevel=2)
    return load(*args, **kwargs)


def load_pytree_async(*args: Any, **kwargs: Any) -> background.AsyncResponse[Any]:
    """Deprecated: use :func:`load_async`.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        state = ckpt.load_async("model").result(timeout=60)   # not ckpt.load_pytree_async("model")
    """
    warnings.warn("Use `load_async` instead.", DeprecationWarning, stacklevel=2)
    return load_async(*args, **kwargs)


def pytree_metadata(*args: Any, **kwargs: Any) -> CheckpointMetadata:
    """Deprecated: use :func:`metadata`.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        tree = ckpt.metadata("model").metadata           # not ckpt.pytree_metadata("model")
    """
    warnings.warn("Use `metadata` instead.", DeprecationWarning, stacklevel=2)
    return metadata(*args, **kwargs)
