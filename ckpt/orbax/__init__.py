"""Orbax checkpoints read in place, with tensorstore alone: orbax is never imported.

A step Orbax wrote (its v1 ``training.Checkpointer`` or its v0 ``CheckpointManager``, OCDBT or one
zarr directory per array) is read into the same tree structure and leaf entries as a ckpt step, and
loaded by :func:`ckpt.loading.load_trees`: every load, metadata and CLI path treats both alike.
See :mod:`ckpt.orbax.step` for the layouts read.

Example::

    from ckpt import orbax
    if orbax.is_step(Path("orbax_run/100")):
        trees = orbax.Step(Path("orbax_run/100")).load(None, partial_load=False)   # {"state": {...}}
"""
from ckpt.orbax.step import (ALONE, ON_OBJECT_STORE, Step, check_checkpoint, handled, has_root_metadata, has_step_files,
                              info, is_step, is_step_on_object_store, is_temporary, is_tree_saved_alone, is_whole, items,
                              root_custom_metadata)

__all__ = ["ALONE", "ON_OBJECT_STORE", "Step", "check_checkpoint", "handled", "has_root_metadata", "has_step_files",
           "info", "is_step", "is_step_on_object_store", "is_temporary", "is_tree_saved_alone", "is_whole", "items",
           "root_custom_metadata"]
