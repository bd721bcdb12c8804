"""ckpt: a fast, crash-safe checkpointer for training loops.

The API of Orbax v1's ``training.Checkpointer``; switching is an import change::

    import ckpt
    with ckpt.training.Checkpointer("runs/exp1") as ckptr:
        ckptr.save(step, state)
        state = ckptr.load(abstract_state=abstract)
"""
from ckpt import context, distributed, errors, handlers, path, preemption, progress, tiers, training, verify
from ckpt import context as options  # Orbax's ``ocp.options.ArrayOptions``: the option groups live in ckpt.context
from ckpt.background import AsyncResponse
from ckpt.checkpoint import (checkpointables_metadata, delete, delete_async, is_orbax_checkpoint, load, load_async,
                             load_checkpointables, load_checkpointables_async, load_pytree, load_pytree_async, metadata,
                             pytree_metadata, save, save_async, save_checkpointables, save_checkpointables_async,
                             save_pytree, save_pytree_async)
from ckpt.context import (ArrayOptions, AsyncOptions, CheckpointablesOptions, Context, DeletionOptions, FileOptions,
                          MemoryOptions, MultiprocessingOptions, PyTreeOptions)
from ckpt.handlers import CheckpointableHandler, StatefulCheckpointable
from ckpt.handlers import AbstractCheckpointable, Checkpointable  # noqa: F401  (Orbax's names, for annotations: Any)
from ckpt.leaves import PLACEHOLDER
from ckpt.metadata import CheckpointMetadata, LeafMetadata, RootMetadata
from ckpt.metadata import PyTreeMetadata  # noqa: F401  (Orbax's type name, for annotations: not in __all__, it is Any)
from ckpt.tiers import LocalCheckpointOptions
from ckpt.training import Checkpointer

__version__ = "0.1.0"

__all__ = [
    "ArrayOptions", "AsyncOptions", "AsyncResponse", "CheckpointMetadata", "CheckpointableHandler",
    "CheckpointablesOptions", "Checkpointer", "Context", "DeletionOptions", "FileOptions", "LeafMetadata",
    "LocalCheckpointOptions", "MemoryOptions", "MultiprocessingOptions", "PLACEHOLDER", "PyTreeOptions",
    "RootMetadata", "StatefulCheckpointable", "checkpointables_metadata", "context", "delete", "delete_async",
    "distributed", "errors", "handlers", "is_orbax_checkpoint", "load", "load_async", "load_checkpointables",
    "load_checkpointables_async", "load_pytree", "load_pytree_async", "metadata", "options", "path", "preemption",
    "progress", "pytree_metadata", "save", "save_async", "save_checkpointables", "save_checkpointables_async",
    "save_pytree", "save_pytree_async", "training", "verify",
]
