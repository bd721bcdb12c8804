"""``ckpt.Context``: Orbax's option tree (``ctx.array.saving.use_ocdbt``, ``ctx.pytree.loading.partial_load``, ...).

Set options on a Context and give it to a Checkpointer, or activate it with ``with ctx:`` for the
operations in the block (an active Context wins over the one given to the constructor, as in Orbax).
Every Orbax option is accepted. Those that have a meaning in ckpt are honoured; the others are
named in :data:`NOT_APPLICABLE` with the reason, and setting one of those to something other than
its default changes nothing (except ``todelete_full_path``, which raises: ckpt cannot soft-delete).

Example::

    ctx = ckpt.Context()
    ctx.asynchronous.timeout_secs = 600
    ctx.pytree.loading.partial_load = True
    with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
        ckptr.save(0, {"params": np.ones(3), "opt_state": np.zeros(3)})
        with ckpt.Context(ctx, memory_options=ckpt.MemoryOptions(max_inflight_bytes=1 << 30)):
            ckptr.save_async(1, {"params": np.ones(3), "opt_state": np.zeros(3)})
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Callable

from ckpt import handlers

# Orbax options ckpt accepts and cannot apply, with the reason (README, "What differs").
NOT_APPLICABLE = {
    "array.saving.use_ocdbt": "ckpt writes its own layout (small leaves packed into one array), never OCDBT",
    "array.saving.use_compression": "ckpt stores raw bytes, so that the read floor is the disk",
    "array.saving.ocdbt_target_data_file_size": "no OCDBT",
    "array.saving.storage_options.shard_axes": "chunks follow the saved sharding (or the first axis)",
    "array.saving.enable_pinned_host_transfer": "snapshots go to host memory the Checkpointer owns",
    "array.saving.enable_post_merge_validation": "no OCDBT merge; every chunk has a checksum",
    "array.saving.use_replica_parallel": "each shard is written once, by replica 0's process",
    "array.saving.enable_write_sharding_file": "the sharding is in tree.json",
    "array.saving.array_metadata_store": "array metadata is in tree.json",
    "array.loading.use_load_and_broadcast": "each process reads the chunks it needs",
    "array.loading.enable_padding_and_truncation": "a shape mismatch is an error listing every key path",
    "file.path_class": "paths are pathlib.Path, or tensorstore kvstores for gs:// and s3://",
    "memory.write_concurrent_bytes": "bounded by memory.max_inflight_bytes",
    "memory.read_concurrent_bytes": "a load reads into the arrays it returns",
    "async.create_directories_asynchronously": "always: the step directory is made in the background",
}


@dataclasses.dataclass(kw_only=True)
class AsyncOptions:
    """timeout_secs: how long ``wait``, ``close``, ``result()`` and a new save wait for a save in flight;
    post_finalization_callback: called with no argument after each step is committed.

    Example::

        ctx = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=600))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save_async(0, {"w": np.ones(3)})
            ckptr.wait()                                 # TimeoutError after 600 s
    """

    timeout_secs: float = 1200.0
    post_finalization_callback: Callable[[], None] | None = None
    create_directories_asynchronously: bool = True


@dataclasses.dataclass(kw_only=True)
class FileOptions:
    """path_permission_mode: permission bits (e.g. ``0o750``) for the directories ckpt creates; None keeps the umask.

    Example::

        ctx = ckpt.Context(file_options=ckpt.FileOptions(path_permission_mode=0o750))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
            assert ckptr.latest.path.stat().st_mode & 0o777 == 0o750
    """

    path_permission_mode: int | None = None
    path_class: Any = None
    skip_sync_file_validations: bool = False


@dataclasses.dataclass(kw_only=True)
class MemoryOptions:
    """max_inflight_bytes: the most bytes an async save copies into its snapshot; leaves beyond it are
    written before ``save_async`` returns. None: no bound (the snapshot is one copy of the state).
    A Checkpointer keeps its last snapshot's buffers for the next async save (copying into memory
    already touched is much faster) until ``close()``: at most this many bytes, or one copy of the state.

    Example::

        ctx = ckpt.Context(memory_options=ckpt.MemoryOptions(max_inflight_bytes=2 << 30))   # 2 GiB
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save_async(0, {"w": np.ones(3)})
    """

    max_inflight_bytes: int | None = None
    write_concurrent_bytes: int | None = None
    read_concurrent_bytes: int | None = None


@dataclasses.dataclass(kw_only=True)
class PyTreeOptions:
    """loading.partial_load: an abstract tree may omit subtrees of the saved one; they are not read.
    ``PyTreeOptions(partial_load=True)`` is short for setting it.

    Example::

        ctx = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"params": np.ones(3), "opt_state": np.zeros(3)})
            assert list(ckptr.load(abstract_state={"params": np.ones(3)})) == ["params"]
    """

    @dataclasses.dataclass(kw_only=True)
    class Saving:
        pytree_metadata_options: Any = None

    @dataclasses.dataclass(kw_only=True)
    class Loading:
        partial_load: bool = False

    saving: Saving = dataclasses.field(default_factory=Saving)
    loading: Loading = dataclasses.field(default_factory=Loading)
    partial_load: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, partial_load: bool | None) -> None:
        if partial_load is not None:
            self.loading.partial_load = partial_load


@dataclasses.dataclass(kw_only=True)
class ArrayOptions:
    """Orbax's array options. ``saving.storage_options.dtype`` and ``chunk_byte_size`` are not
    supported yet: a save refuses them (ValueError) rather than ignore them. The rest does not apply
    (see ``NOT_APPLICABLE``).

    Example::

        ctx = ckpt.Context()
        ctx.array.saving.use_ocdbt = False               # accepted: ckpt never writes OCDBT
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3, np.float32)})
    """

    @dataclasses.dataclass(kw_only=True)
    class Saving:
        @dataclasses.dataclass(kw_only=True)
        class StorageOptions:
            dtype: Any = None
            chunk_byte_size: int | None = None
            shard_axes: tuple[int, ...] | None = None

        storage_options: StorageOptions = dataclasses.field(default_factory=StorageOptions)
        use_ocdbt: bool = True
        use_compression: bool = True
        ocdbt_target_data_file_size: int | None = None
        enable_pinned_host_transfer: bool | None = None
        enable_post_merge_validation: bool = True
        use_replica_parallel: bool | None = None
        enable_write_sharding_file: bool = True
        array_metadata_store: Any = None

    @dataclasses.dataclass(kw_only=True)
    class Loading:
        enable_padding_and_truncation: bool = False
        raise_array_data_missing_error: bool = True
        use_load_and_broadcast: bool = False

    saving: Saving = dataclasses.field(default_factory=Saving)
    loading: Loading = dataclasses.field(default_factory=Loading)


@dataclasses.dataclass(kw_only=True)
class MultiprocessingOptions:
    """processes: how the processes of a multi-process job agree (:class:`ckpt.distributed.Processes`);
    None detects ``jax.distributed``, else a single process. primary_host: the process that writes the
    manifest and commits (ckpt's is always process 0). barrier_sync_key_prefix: a prefix of the names
    of this Checkpointer's barriers (two Checkpointers in one job need different ones).

    Example::

        processes = ckpt.distributed.SingleProcess()     # or your object for torch.distributed
        ctx = ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=processes))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
    """

    primary_host: int | None = 0
    active_processes: set[int] | None = None
    barrier_sync_key_prefix: str | None = None
    processes: Any = None

    def check(self) -> None:
        """ValueError for what ckpt cannot do: a primary other than process 0, a subset of processes."""
        if self.primary_host not in (0, None):
            raise ValueError(f"MultiprocessingOptions.primary_host={self.primary_host!r}: ckpt's primary is process 0")
        if self.active_processes is not None:
            raise ValueError("MultiprocessingOptions.active_processes: ckpt saves with every process of the job")


@dataclasses.dataclass(kw_only=True)
class CheckpointablesOptions:
    """registry: the handlers of custom checkpointables (:mod:`ckpt.handlers`); default: the global ones.

    Example::

        ctx = ckpt.Context()
        ctx.checkpointables.registry = ckpt.handlers.local_registry(include_global_registry=False)
        assert ctx.checkpointables.registry.get_all_entries() == []
    """

    registry: handlers.CheckpointableHandlerRegistry = dataclasses.field(default_factory=handlers.local_registry)


@dataclasses.dataclass(kw_only=True)
class DeletionOptions:
    """gcs_deletion_options.todelete_full_path: Orbax moves deleted steps there on GCS; ckpt deletes
    them, so a Checkpointer refuses a Context that sets it (ValueError).

    Example::

        ctx = ckpt.Context()
        assert ctx.deletion.gcs_deletion_options.todelete_full_path is None
    """

    @dataclasses.dataclass(kw_only=True)
    class GcsDeletionOptions:
        todelete_full_path: str | None = None

    gcs_deletion_options: GcsDeletionOptions = dataclasses.field(default_factory=GcsDeletionOptions)


def check_saving_options(context: Context) -> None:
    """ValueError for the saving options ckpt does not support yet (a storage dtype, a chunk size).

    Example::

        ctx = ckpt.Context()
        ctx.array.saving.storage_options.dtype = np.float16
        try:
            check_saving_options(ctx)
        except ValueError as e:
            print(e)                                     # names the option
    """
    storage = context.array_options.saving.storage_options
    if storage.dtype is not None or storage.chunk_byte_size is not None:
        raise ValueError("ctx.array.saving.storage_options.dtype and chunk_byte_size are not supported by ckpt "
                         "yet; cast the arrays before saving instead")


_ACTIVE: contextvars.ContextVar[Context | None] = contextvars.ContextVar("ckpt_context", default=None)


class Context:
    """Option groups for saving and loading; ``with ctx:`` makes it the active one in the block.

    ``Context(parent, ...)`` starts from ``parent``'s options; each ``*_options`` argument replaces a group.

    Example::

        ctx = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=600),
                           file_options=ckpt.FileOptions(path_permission_mode=0o750))
        ctx.pytree.loading.partial_load = True
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
    """

    def __init__(self, context: Context | None = None, *, pytree_options: PyTreeOptions | None = None,
                 array_options: ArrayOptions | None = None, async_options: AsyncOptions | None = None,
                 multiprocessing_options: MultiprocessingOptions | None = None,
                 file_options: FileOptions | None = None,
                 checkpointables_options: CheckpointablesOptions | None = None,
                 deletion_options: DeletionOptions | None = None, memory_options: MemoryOptions | None = None):
        def pick(given, name, cls):
            return given if given is not None else getattr(context, name) if context is not None else cls()

        self.pytree_options = pick(pytree_options, "pytree_options", PyTreeOptions)
        self.array_options = pick(array_options, "array_options", ArrayOptions)
        self.async_options = pick(async_options, "async_options", AsyncOptions)
        self.multiprocessing_options = pick(multiprocessing_options, "multiprocessing_options", MultiprocessingOptions)
        self.file_options = pick(file_options, "file_options", FileOptions)
        self.checkpointables_options = pick(checkpointables_options, "checkpointables_options", CheckpointablesOptions)
        self.deletion_options = pick(deletion_options, "deletion_options", DeletionOptions)
        self.memory_options = pick(memory_options, "memory_options", MemoryOptions)
        self._tokens: list[contextvars.Token] = []

    # Orbax's short names for the groups.
    pytree = property(lambda self: self.pytree_options)
    array = property(lambda self: self.array_options)
    asynchronous = property(lambda self: self.async_options)
    multiprocessing = property(lambda self: self.multiprocessing_options)
    file = property(lambda self: self.file_options)
    checkpointables = property(lambda self: self.checkpointables_options)
    deletion = property(lambda self: self.deletion_options)
    memory = property(lambda self: self.memory_options)

    def __enter__(self) -> Context:
        self._tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._tokens.pop())

    def __repr__(self) -> str:
        return f"Context({', '.join(f'{k}={v!r}' for k, v in vars(self).items() if not k.startswith('_'))})"


def get_context(default: Context | None = None) -> Context:
    """The Context of the innermost ``with ctx:`` block, else ``default``, else a Context of defaults.

    Example::

        ctx = ckpt.Context()
        with ctx:
            assert ckpt.context.get_context() is ctx
    """
    active = _ACTIVE.get()
    return active if active is not None else default if default is not None else Context()
