"""``ctx.array.saving.storage_options``: the dtype and the chunk size that saved arrays are stored with;
``ctx.array.saving.scoped_storage_options_creator``: those of one leaf.

A storage dtype casts every array leaf (numpy, jax and torch arrays, whatever their dtype, as Orbax
does) when a save plans it; tree.json then names the stored dtype. Scalars (Python and numpy) are
stored as they are. A load gives the stored dtype, or the abstract leaf's dtype when there is one.
The cast is a copy of each array, made when the save plans it (a sync save holds the state once in
the storage dtype at its peak); an async save that reuses the last plan casts as it copies. A value the
storage dtype cannot hold (1e10 in float16, 300 in int8) is refused, with a ValueError naming the leaf
(see :func:`ckpt.leaves.stored_as`), where Orbax stores inf or a wrapped integer.
The chunk size is the target byte size of the chunks of each leaf stored as an array of its own:
slabs along the first axis, at least one row each (the checksums of tree.json describe such slabs).
Small leaves, packed together into one array, keep that array's chunks.

``scoped_storage_options_creator(keypath, value)`` is called for every leaf of every tree a save
plans (as ``jax.tree.map_with_path`` would: ``keypath`` is a tuple of jax's key entries, ``DictKey``,
``SequenceKey``, ``GetAttrKey``, when jax is imported, else of ckpt's ``(kind, key)`` pairs); the fields
of the ``StorageOptions`` it returns that are not None win over ``storage_options``'s, and None keeps
``storage_options`` for that leaf. A save with a creator plans anew every time (its answers may change).

Example::

    ctx = ckpt.Context()
    ctx.array.saving.storage_options.dtype = ml_dtypes.bfloat16     # half the bytes of float32
    ctx.array.saving.storage_options.chunk_byte_size = 4 << 20      # 4 MiB chunks
    with ctx:
        ckpt.save("model", {"w": np.ones((1024, 1024), np.float32)})
    assert ckpt.load("model")["w"].dtype == ml_dtypes.bfloat16
    assert ckpt.load("model", {"w": np.zeros((1024, 1024), np.float32)})["w"].dtype == np.float32

    ctx = ckpt.Context()     # only the embeddings in bfloat16
    ctx.array.saving.scoped_storage_options_creator = lambda keypath, value: (
        ckpt.ArrayOptions.Saving.StorageOptions(dtype=ml_dtypes.bfloat16) if "embed" in str(keypath) else None)
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import ml_dtypes
import numpy as np

from ckpt import casts
from ckpt import leaves as leaves_lib
from ckpt import tree as tree_lib

_CAST = frozenset({"numpy", "jax", "torch"})  # the leaf types a storage dtype casts


@dataclasses.dataclass(frozen=True)
class Storage:
    """The checked storage options of one save: ``dtype`` (None: each leaf's own) and ``chunk_bytes``
    (None: ckpt's, ``format.ARRAY_CHUNK_BYTES``); ``scoped``: the creator of each leaf's, or None."""

    dtype: np.dtype | None = None
    chunk_bytes: int | None = None
    scoped: Callable[[tuple, Any], Any] | None = None

    def of_leaf(self, path: tuple, value: Any) -> Storage:
        """The options of the leaf at ``path`` (ckpt's key path): these, or the creator's where it sets them.

        Raises:
          ValueError: the creator returned a bad dtype or chunk size (named with the leaf's key path).
        """
        if self.scoped is None:
            return self
        options = self.scoped(_keypath(path), value)
        if options is None:
            return dataclasses.replace(self, scoped=None)
        try:
            leaf = _checked(options.dtype, options.chunk_byte_size)
        except ValueError as e:
            raise ValueError(f"scoped_storage_options_creator at {tree_lib.keystr(path)}: {e}") from None
        return Storage(self.dtype if leaf.dtype is None else leaf.dtype,
                       self.chunk_bytes if leaf.chunk_bytes is None else leaf.chunk_bytes)


DEFAULT = Storage()


def of(saving: Any) -> Storage:
    """The :class:`Storage` of a Context's ``array.saving`` group (None: the defaults).

    Raises:
      ValueError: the dtype is not a numeric dtype, or the chunk size is not a positive int.
      TypeError: the scoped_storage_options_creator is not a function.
    """
    if saving is None:
        return DEFAULT
    if saving.scoped_storage_options_creator is not None and not callable(saving.scoped_storage_options_creator):
        raise TypeError(f"ctx.array.saving.scoped_storage_options_creator must be a function (keypath, value) -> "
                        f"StorageOptions or None, got {saving.scoped_storage_options_creator!r:.200}")
    options = saving.storage_options
    return dataclasses.replace(_checked(options.dtype, options.chunk_byte_size),
                               scoped=saving.scoped_storage_options_creator)


def _checked(dtype: Any, chunk_bytes: Any) -> Storage:
    if chunk_bytes is not None and (type(chunk_bytes) is not int or chunk_bytes <= 0):
        raise ValueError(f"ctx.array.saving.storage_options.chunk_byte_size must be a positive int (bytes), "
                         f"got {chunk_bytes!r}")
    return Storage(None if dtype is None else _dtype(dtype), chunk_bytes)


def _keypath(path: tuple) -> tuple:
    """``path`` as ``jax.tree.map_with_path`` gives it when jax is imported (Orbax's creators expect that)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return path
    keys = jax.tree_util
    return tuple(keys.GetAttrKey(key) if kind == "attr" else keys.SequenceKey(key) if kind == "idx" else keys.DictKey(key)
                 for kind, key in path)


def _dtype(value: Any) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not (dtype.kind in "biufc" or hasattr(ml_dtypes, dtype.name)):
        raise ValueError(f"ctx.array.saving.storage_options.dtype must be a numeric numpy or jax dtype (such as "
                         f"np.float16 or jnp.bfloat16), got {value!r}")
    return dtype


def cast(path: tree_lib.KeyPath, host: leaves_lib.HostLeaf, dtype: np.dtype) -> None:
    """Makes an array leaf (at ``path``) stored as ``dtype`` (its bytes and its manifest entry); other leaves are left
    as they are. Raises ValueError naming the leaf where a value does not fit ``dtype`` (see
    :func:`ckpt.leaves.stored_as`): of a leaf spread over processes, when its shards are written."""
    if host.meta["type"] not in _CAST:
        return
    host.meta["dtype"] = leaves_lib.dtype_name(dtype)
    if host.gather is not None:  # a small DTensor, gathered later as its entry's dtype
        return
    if host.spread is None:
        if host.array.dtype != dtype:  # (a DeviceRows is copied whole: the cast copies anyway)
            host.array = leaves_lib.stored_as(path, np.asarray(host.array), dtype)
        return
    own_shards, whole = host.spread.own_shards, host.spread.whole  # (whole: what a process saving alone writes)
    host.spread = dataclasses.replace(host.spread, own_shards=_cast_shards(path, own_shards, dtype),
                                      whole=None if whole is None else _cast_shards(path, whole, dtype))


def check(path: tree_lib.KeyPath, value: Any, dtype: np.dtype, out: np.ndarray | None = None) -> None:
    """Raises ValueError naming the leaf at ``path`` where its ``value`` does not fit the storage dtype ``dtype``:
    where ``out``, its copy into ``dtype`` made already (a snapshot's copy casts as it copies), lost a value, or
    without ``out``, where a cast made now would (see :func:`ckpt.leaves.stored_as`)."""
    leaves_lib.stored_as(path, np.asarray(leaves_lib.to_host(path, value).array), dtype, out)


def changes_values(meta: dict, dtype: np.dtype) -> bool:
    """Whether storing the leaf of manifest entry ``meta`` as ``dtype`` can change one of its values."""
    return meta["type"] in _CAST and casts.changes_values(leaves_lib.parse_dtype(meta["dtype"]), dtype)


def _cast_shards(path: tree_lib.KeyPath, shards: Callable[[], list[tuple[Any, np.ndarray]]], dtype: np.dtype
                 ) -> Callable[[], list[tuple[Any, np.ndarray]]]:
    """``shards`` (a function giving (index, host array) pairs) giving them as ``dtype``."""
    return lambda: [(index, leaves_lib.stored_as(path, data, dtype)) for index, data in shards()]
