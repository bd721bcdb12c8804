"""``ckpt.Context``: Orbax's option tree (``ctx.array.saving.use_ocdbt``, ``ctx.pytree.loading.partial_load``, ...).

Set options on a Context and give it to a Checkpointer, or activate it with ``with ctx:`` for the
operations in the block (an active Context wins over the one given to the constructor, as in Orbax).
Inside the block its options are frozen: setting one raises RuntimeError, as in Orbax. Every option
of Orbax's groups is there (setting a name that is no option raises AttributeError). Those that have a meaning in ckpt are honoured; the others are named
in :data:`NOT_APPLICABLE` with the reason, and setting one of those to something other than its
default changes nothing (except ``todelete_full_path``, which raises: ckpt cannot soft-delete).
Orbax's groups ``pathways``, ``safetensors``, ``atomicity`` and ``checkpoint_layout`` are not there.

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
import copy
import dataclasses
import math
import numbers
from typing import Any, Callable

from ckpt import arguments, distributed, handlers

# Orbax options ckpt accepts and cannot apply, with the reason (README, "What differs").
NOT_APPLICABLE = {
    "array.saving.use_ocdbt": "ckpt writes its own layout (small leaves packed into one array), never OCDBT",
    "array.saving.use_zarr3": "large leaves are always zarr3 arrays (small ones are packed into one)",
    "array.saving.use_compression": "ckpt stores raw bytes, so that the read floor is the disk",
    "array.saving.ocdbt_target_data_file_size": "no OCDBT",
    "array.saving.storage_options.shard_axes": "chunks follow the saved sharding (or the first axis)",
    "array.saving.enable_pinned_host_transfer": "snapshots go to host memory the Checkpointer owns",
    "array.saving.enable_post_merge_validation": "no OCDBT merge; every chunk has a checksum",
    "array.saving.use_replica_parallel": "each shard is written once, by replica 0's process",
    "array.saving.min_slice_bytes_for_replica_parallel": "no replica-parallel saving",
    "array.saving.max_replicas_for_replica_parallel": "no replica-parallel saving",
    "array.saving.enable_replica_parallel_separate_folder": "no replica-parallel saving",
    "array.saving.enable_write_sharding_file": "the sharding is in tree.json",
    "array.saving.array_metadata_store": "array metadata is in tree.json",
    "array.loading.use_load_and_broadcast": "each process reads the chunks it needs",
    "array.loading.load_and_broadcast_options": "no load-and-broadcast",
    "array.loading.enable_padding_and_truncation": "a shape mismatch is an error listing every key path",
    "file.path_class": "paths are pathlib.Path, or tensorstore kvstores for gs:// and s3://",
    "file.skip_sync_file_validations": "the checks before a save are always made: bad input fails before anything is written",
    "array.loading.raise_array_data_missing_error": "a missing chunk is always damage (CheckpointCorruptedError)",
    "pytree.saving.pytree_metadata_options": "tree.json always records each container's type (tuples, NamedTuples, ...)",
    "memory.write_concurrent_bytes": "bounded by memory.max_inflight_bytes",
    "memory.read_concurrent_bytes": "a load reads into the arrays it returns",
    "memory.transfer_concurrent_bytes": "bounded by memory.max_inflight_bytes",
    "memory.regulator_options": "bounded by memory.max_inflight_bytes",
    "memory.expected_surge_bytes": "bounded by memory.max_inflight_bytes",
    "memory.is_prioritized_key_fn": "a snapshot copies every leaf before save_async returns",
    "memory.serialization_status_callback": "progress is reported on the ckpt.progress logger",
    "memory.deepcopy_host_arrays": "an async save always copies host arrays into its snapshot",
    "async.create_directories_asynchronously": "always: the step directory is made in the background",
}


# The ids of the option groups of the active Contexts (in this thread or task): frozen while active.
_FROZEN: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("ckpt_frozen_options", default=frozenset())


class _Options:
    """Base of the option groups: setting a field of a group that belongs to an active Context (``with ctx:``)
    raises RuntimeError, as in Orbax; outside the block a Context is configured freely. A name that is
    not an option of the group (a typo) raises AttributeError."""

    def __setattr__(self, name: str, value: Any) -> None:
        if id(self) in _FROZEN.get():
            raise RuntimeError("Cannot mutate options of an active context. Configure before entering the `with` block.")
        names = [field.name for field in dataclasses.fields(self)]
        if name not in names:
            raise AttributeError(f"{type(self).__qualname__} has no option {name!r}; its options are {', '.join(names)}")
        object.__setattr__(self, name, value)


def _groups(options: _Options) -> list[_Options]:
    """``options`` and every option group nested in it."""
    found = [options]
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if isinstance(value, _Options):
            found.extend(_groups(value))
    return found


def _copy(options: _Options) -> _Options:
    """A copy of an option group whose nested groups are copies too; the values themselves (callables,
    registries, ``processes``) are shared, not copied."""
    copied = copy.copy(options)
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if isinstance(value, _Options):
            object.__setattr__(copied, field.name, _copy(value))
    return copied


@dataclasses.dataclass(kw_only=True)
class AsyncOptions(_Options):
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

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "timeout_secs":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"AsyncOptions.timeout_secs must be a number of seconds above 0, got {value!r} (for "
                                 "a wait with no practical limit, give a large number, 86400 for a day)")
            value = float(value)  # (a numpy number: timedelta takes no numpy integer)
        super().__setattr__(name, value)

    def check(self) -> None:
        """TypeError for a post_finalization_callback that cannot be called (timeout_secs is checked where it is
        set)."""
        callback = self.post_finalization_callback
        if callback is not None and not callable(callback):
            raise TypeError(f"AsyncOptions.post_finalization_callback must be a function (called with no argument "
                            f"after each commit) or None, got {type(callback).__name__} {callback!r:.200}")


@dataclasses.dataclass(kw_only=True)
class FileOptions(_Options):
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

    def check(self) -> None:
        """ValueError for a path_permission_mode that is no mode of a directory its owner reads, writes and enters
        (0o700 set, at most 0o7777): ckpt writes into the directories it makes."""
        mode = arguments.count(self.path_permission_mode, "FileOptions.path_permission_mode", optional=True)
        if mode is not None and (mode > 0o7777 or mode & 0o700 != 0o700):
            raise ValueError(f"FileOptions.path_permission_mode={oct(mode)} is no mode of a directory its owner reads, "
                             "writes and enters (0o700 set, at most 0o7777; e.g. 0o750): ckpt writes into the "
                             "directories it makes")


@dataclasses.dataclass(kw_only=True)
class MemoryOptions(_Options):
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
    transfer_concurrent_bytes: int | None = None
    regulator_options: Any = None
    expected_surge_bytes: int | float | None = None
    is_prioritized_key_fn: Callable[..., bool] | None = None
    serialization_status_callback: Any = None
    deepcopy_host_arrays: bool = True

    def check(self) -> None:
        """ValueError for a max_inflight_bytes that is no number of bytes >= 0 (None: no bound)."""
        value = self.max_inflight_bytes
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0):
            raise ValueError(f"MemoryOptions.max_inflight_bytes must be a number of bytes >= 0 or None, got "
                             f"{type(value).__name__} {value!r:.200}")


@dataclasses.dataclass(kw_only=True)
class PyTreeOptions(_Options):
    """loading.partial_load: an abstract tree may omit subtrees of the saved one; they are not read.
    ``PyTreeOptions(partial_load=True)`` is short for setting it.

    Example::

        ctx = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"params": np.ones(3), "opt_state": np.zeros(3)})
            assert list(ckptr.load(abstract_state={"params": np.ones(3)})) == ["params"]
    """

    @dataclasses.dataclass(kw_only=True)
    class Saving(_Options):
        pytree_metadata_options: Any = None

    @dataclasses.dataclass(kw_only=True)
    class Loading(_Options):
        partial_load: bool = False

    saving: Saving = dataclasses.field(default_factory=Saving)
    loading: Loading = dataclasses.field(default_factory=Loading)
    partial_load: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, partial_load: bool | None) -> None:
        if partial_load is not None:
            self.loading.partial_load = partial_load


@dataclasses.dataclass(kw_only=True)
class ArrayOptions(_Options):
    """Orbax's array options. ``saving.storage_options.dtype`` casts every array leaf (numpy, jax,
    torch) to that dtype on save, as Orbax does (scalars are stored as they are); a load gives the
    stored dtype, or the abstract leaf's. ``saving.storage_options.chunk_byte_size`` is the target
    size of the chunks of each large leaf's array (slabs along the first axis, at least one row each).
    A bad value of either is a ValueError before anything is written (see :mod:`ckpt.storage_options`).
    ``saving.scoped_storage_options_creator(keypath, value)`` gives one leaf's options, whose fields
    that are not None win over ``storage_options``. The rest does not apply (see ``NOT_APPLICABLE``).

    Example::

        ctx = ckpt.Context()
        ctx.array.saving.storage_options.dtype = np.float16      # half the bytes on disk
        ctx.array.saving.use_ocdbt = False               # accepted: ckpt never writes OCDBT
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3, np.float32)})
            assert ckptr.load(0)["w"].dtype == np.float16
            assert ckptr.load(0, {"w": np.zeros(3, np.float32)})["w"].dtype == np.float32
    """

    @dataclasses.dataclass(kw_only=True)
    class Saving(_Options):
        @dataclasses.dataclass(kw_only=True)
        class StorageOptions(_Options):
            dtype: Any = None
            chunk_byte_size: int | None = None
            shard_axes: tuple[int, ...] | None = None

        storage_options: StorageOptions = dataclasses.field(default_factory=StorageOptions)
        scoped_storage_options_creator: Callable[[tuple, Any], Any] | None = None
        use_ocdbt: bool = True
        use_zarr3: bool = True
        use_compression: bool = True
        ocdbt_target_data_file_size: int | None = None
        enable_pinned_host_transfer: bool | None = None
        enable_post_merge_validation: bool = True
        use_replica_parallel: bool | None = None
        min_slice_bytes_for_replica_parallel: int | None = None
        max_replicas_for_replica_parallel: int | None = None
        enable_replica_parallel_separate_folder: bool = False
        enable_write_sharding_file: bool = True
        array_metadata_store: Any = None

    @dataclasses.dataclass(kw_only=True)
    class Loading(_Options):
        enable_padding_and_truncation: bool = False
        raise_array_data_missing_error: bool = True
        use_load_and_broadcast: bool = False
        load_and_broadcast_options: Any = None

    saving: Saving = dataclasses.field(default_factory=Saving)
    loading: Loading = dataclasses.field(default_factory=Loading)


@dataclasses.dataclass(kw_only=True)
class MultiprocessingOptions(_Options):
    """processes: how the processes of a multi-process job agree (:class:`ckpt.distributed.Processes`);
    None detects ``jax.distributed``, else ``torch.distributed``, else a single process
    (:func:`ckpt.distributed.current`). primary_host: the process that writes the
    manifest and commits (ckpt's is always process 0). barrier_sync_key_prefix: a prefix of the names
    of this Checkpointer's barriers (as Orbax's; ckpt's names already differ between Checkpointers, being
    made of how many were opened in the job before).

    Example::

        processes = ckpt.distributed.SingleProcess()     # or an object of yours for another engine
        ctx = ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=processes))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
    """

    primary_host: int | None = 0
    active_processes: set[int] | None = None
    barrier_sync_key_prefix: str | None = None
    processes: Any = None

    def check(self) -> None:
        """ValueError for what ckpt cannot do: a primary other than process 0, a subset of processes; TypeError
        for processes that are no :class:`ckpt.distributed.Processes`."""
        if self.primary_host not in (0, None):
            raise ValueError(f"MultiprocessingOptions.primary_host={self.primary_host!r}: ckpt's primary is process 0")
        if self.active_processes is not None:
            raise ValueError("MultiprocessingOptions.active_processes: ckpt saves with every process of the job")
        if self.processes is not None:
            arguments.implements(self.processes, distributed.Processes, "MultiprocessingOptions.processes")


@dataclasses.dataclass(kw_only=True)
class CheckpointablesOptions(_Options):
    """registry: the handlers of custom checkpointables (:mod:`ckpt.handlers`); default: the global ones.

    Example::

        ctx = ckpt.Context()
        ctx.checkpointables.registry = ckpt.handlers.local_registry(include_global_registry=False)
        assert ctx.checkpointables.registry.get_all_entries() == []
    """

    registry: handlers.CheckpointableHandlerRegistry = dataclasses.field(default_factory=handlers.local_registry)

    @classmethod
    def create_with_handlers(cls, *handler_types: type) -> CheckpointablesOptions:
        """Options whose registry holds the global handlers and ``handler_types`` (Orbax's constructor).

        Example::

            class NoteHandler: ...                       # the methods of ckpt.handlers.CheckpointableHandler
            options = ckpt.CheckpointablesOptions.create_with_handlers(NoteHandler)
            assert (NoteHandler, None) in options.registry.get_all_entries()
        """
        registry = handlers.local_registry()
        for handler_type in handler_types:
            registry.add(handler_type)
        return cls(registry=registry)

    def check(self) -> None:
        """TypeError for a registry that is no CheckpointableHandlerRegistry (``ckpt.handlers.local_registry()``)."""
        arguments.instance_of(self.registry, handlers.CheckpointableHandlerRegistry, "CheckpointablesOptions.registry")


@dataclasses.dataclass(kw_only=True)
class DeletionOptions(_Options):
    """gcs_deletion_options.todelete_full_path: Orbax moves deleted steps there on GCS; ckpt deletes
    them, so a Checkpointer refuses a Context that sets it (ValueError).

    Example::

        ctx = ckpt.Context()
        assert ctx.deletion.gcs_deletion_options.todelete_full_path is None
    """

    @dataclasses.dataclass(kw_only=True)
    class GcsDeletionOptions(_Options):
        todelete_full_path: str | None = None

    gcs_deletion_options: GcsDeletionOptions = dataclasses.field(default_factory=GcsDeletionOptions)


_ACTIVE: contextvars.ContextVar[Context | None] = contextvars.ContextVar("ckpt_context", default=None)


class Context:
    """Option groups for saving and loading; ``with ctx:`` makes it the active one in the block.

    ``Context(parent, ...)`` starts from copies of ``parent``'s option groups; each ``*_options``
    argument replaces a group (with a copy), so that changing one Context never changes another.
    Inside ``with ctx:`` the groups are frozen (setting an option raises RuntimeError, as in Orbax):
    configure a Context before entering it, or make a new one from it.

    Example::

        ctx = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=600),
                           file_options=ckpt.FileOptions(path_permission_mode=0o750))
        ctx.pytree.loading.partial_load = True
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
        with ctx:
            try:
                ctx.pytree.loading.partial_load = False
            except RuntimeError:                         # frozen: the Context is active
                pass
    """

    def __init__(self, context: Context | None = None, *, pytree_options: PyTreeOptions | None = None,
                 array_options: ArrayOptions | None = None, async_options: AsyncOptions | None = None,
                 multiprocessing_options: MultiprocessingOptions | None = None,
                 file_options: FileOptions | None = None,
                 checkpointables_options: CheckpointablesOptions | None = None,
                 deletion_options: DeletionOptions | None = None, memory_options: MemoryOptions | None = None):
        if context is not None:
            arguments.instance_of(context, Context, "Context(context)")

        def pick(given, name, cls):
            if given is not None:
                arguments.instance_of(given, cls, f"Context {name}")
            chosen = given if given is not None else getattr(context, name) if context is not None else None
            return cls() if chosen is None else _copy(chosen)

        self._pytree_options = pick(pytree_options, "pytree_options", PyTreeOptions)
        self._array_options = pick(array_options, "array_options", ArrayOptions)
        self._async_options = pick(async_options, "async_options", AsyncOptions)
        self._multiprocessing_options = pick(multiprocessing_options, "multiprocessing_options", MultiprocessingOptions)
        self._file_options = pick(file_options, "file_options", FileOptions)
        self._checkpointables_options = pick(checkpointables_options, "checkpointables_options", CheckpointablesOptions)
        self._deletion_options = pick(deletion_options, "deletion_options", DeletionOptions)
        self._memory_options = pick(memory_options, "memory_options", MemoryOptions)
        self._tokens: list[tuple[contextvars.Token, contextvars.Token]] = []

    # The groups (read-only, as in Orbax), under their long and Orbax's short names.
    pytree_options = pytree = property(lambda self: self._pytree_options)
    array_options = array = property(lambda self: self._array_options)
    async_options = asynchronous = property(lambda self: self._async_options)
    multiprocessing_options = multiprocessing = property(lambda self: self._multiprocessing_options)
    file_options = file = property(lambda self: self._file_options)
    checkpointables_options = checkpointables = property(lambda self: self._checkpointables_options)
    deletion_options = deletion = property(lambda self: self._deletion_options)
    memory_options = memory = property(lambda self: self._memory_options)

    def check(self) -> None:
        """Raises ValueError (or TypeError) naming the first option ckpt cannot honour as set: a value of the
        wrong kind, or what ckpt cannot do (a primary other than process 0, a subset of the processes,
        moving deleted steps aside). Every save and deletion checks its Context first, before anything is
        written or deleted.

        Example::

            ctx = ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(primary_host=1))
            try:
                ctx.check()
            except ValueError as e:
                assert "primary_host" in str(e)
        """
        for group in (self.multiprocessing_options, self.file_options, self.async_options, self.memory_options,
                      self.checkpointables_options):
            group.check()
        if self.deletion_options.gcs_deletion_options.todelete_full_path is not None:
            raise ValueError("DeletionOptions.gcs_deletion_options.todelete_full_path: ckpt deletes steps it "
                             "does not keep; it cannot move them elsewhere")

    def _option_groups(self) -> list[_Options]:
        return [group for name, value in vars(self).items() if name.endswith("_options") for group in _groups(value)]

    def __enter__(self) -> Context:
        frozen = _FROZEN.get() | {id(group) for group in self._option_groups()}
        self._tokens.append((_ACTIVE.set(self), _FROZEN.set(frozen)))
        return self

    def __exit__(self, *exc: Any) -> None:
        active, frozen = self._tokens.pop()
        _FROZEN.reset(frozen)
        _ACTIVE.reset(active)

    def __repr__(self) -> str:
        groups = ", ".join(f"{name[1:]}={value!r}" for name, value in vars(self).items() if name.endswith("_options"))
        return f"Context({groups})"


def get_context(default: Context | None = None) -> Context:
    """The Context of the innermost ``with ctx:`` block, else ``default``, else a Context of defaults.

    Example::

        ctx = ckpt.Context()
        with ctx:
            assert ckpt.context.get_context() is ctx
    """
    active = _ACTIVE.get()
    return active if active is not None else default if default is not None else Context()
