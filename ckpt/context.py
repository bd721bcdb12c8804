"""``ckpt.Context``: the few options that change how checkpoints are written and read.

Example::

    ctx = ckpt.Context(
        async_options=ckpt.AsyncOptions(timeout_secs=600),
        memory_options=ckpt.MemoryOptions(max_inflight_bytes=2 << 30),
    )
    ckptr = ckpt.Checkpointer("runs/exp1", context=ctx)
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class AsyncOptions:
    """timeout_secs: how long ``wait``, ``close``, ``result()`` and a new save wait for a save in flight.

    Example::

        ctx = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=600))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save_async(0, {"w": np.ones(3)})
            ckptr.wait()                                 # TimeoutError after 600 s
    """

    timeout_secs: float = 1200.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileOptions:
    """path_permission_mode: permission bits (e.g. ``0o750``) for the directories ckpt creates; None keeps the umask.

    Example::

        ctx = ckpt.Context(file_options=ckpt.FileOptions(path_permission_mode=0o750))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
            assert ckptr.latest.path.stat().st_mode & 0o777 == 0o750
    """

    path_permission_mode: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class PyTreeOptions:
    """partial_load: an abstract tree may omit subtrees of the saved one; they are not read.

    Example::

        ctx = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"params": np.ones(3), "opt_state": np.zeros(3)})
            assert list(ckptr.load(abstract_state={"params": np.ones(3)})) == ["params"]
    """

    partial_load: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiprocessingOptions:
    """processes: how the processes of a multi-process job agree (:class:`ckpt.distributed.Processes`);
    None detects ``jax.distributed``, else a single process.

    Example::

        processes = ckpt.distributed.SingleProcess()     # or your object for torch.distributed
        ctx = ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=processes))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
    """

    processes: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """Option groups for a Checkpointer (all optional).

    Example::

        ctx = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=600),
                           file_options=ckpt.FileOptions(path_permission_mode=0o750))
        with ckpt.Checkpointer("runs/exp1", context=ctx) as ckptr:
            ckptr.save(0, {"w": np.ones(3)})
    """

    async_options: AsyncOptions = dataclasses.field(default_factory=AsyncOptions)
    file_options: FileOptions = dataclasses.field(default_factory=FileOptions)
    memory_options: MemoryOptions = dataclasses.field(default_factory=MemoryOptions)
    pytree_options: PyTreeOptions = dataclasses.field(default_factory=PyTreeOptions)
    multiprocessing_options: MultiprocessingOptions = dataclasses.field(default_factory=MultiprocessingOptions)
