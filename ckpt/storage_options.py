"""``ctx.array.saving.storage_options``: the dtype and the chunk size that saved arrays are stored with.

A storage dtype casts every array leaf (numpy, jax and torch arrays, whatever their dtype, as Orbax
does) when a save plans it; tree.json then names the stored dtype. Scalars (Python and numpy) are
stored as they are. A load gives the stored dtype, or the abstract leaf's dtype when there is one.
The cast is a copy of each array, made when the save plans it (a sync save holds the state once in
the storage dtype at its peak); an async save that reuses the last plan casts as it copies.
The chunk size is the target byte size of the chunks of each leaf stored as an array of its own:
slabs along the first axis, at least one row each (the checksums of tree.json describe such slabs).
Small leaves, packed together into one array, keep that array's chunks.

Example::

    ctx = ckpt.Context()
    ctx.array.saving.storage_options.dtype = ml_dtypes.bfloat16     # half the bytes of float32
    ctx.array.saving.storage_options.chunk_byte_size = 4 << 20      # 4 MiB chunks
    with ctx:
        ckpt.save("model", {"w": np.ones((1024, 1024), np.float32)})
    assert ckpt.load("model")["w"].dtype == ml_dtypes.bfloat16
    assert ckpt.load("model", {"w": np.zeros((1024, 1024), np.float32)})["w"].dtype == np.float32
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

from ckpt import leaves as leaves_lib

_CAST = frozenset({"numpy", "jax", "torch"})  # the leaf types a storage dtype casts


@dataclasses.dataclass(frozen=True)
class Storage:
    """The checked storage options of one save: ``dtype`` (None: each leaf's own) and ``chunk_bytes``
    (None: ckpt's, ``format.ARRAY_CHUNK_BYTES``)."""

    dtype: np.dtype | None = None
    chunk_bytes: int | None = None


DEFAULT = Storage()


def of(options: Any) -> Storage:
    """The :class:`Storage` a ``StorageOptions`` sets (None: the defaults).

    Raises:
      ValueError: the dtype is not a numeric dtype, or the chunk size is not a positive int.
    """
    if options is None or (options.dtype is None and options.chunk_byte_size is None):
        return DEFAULT
    dtype = None if options.dtype is None else _dtype(options.dtype)
    chunk_bytes = options.chunk_byte_size
    if chunk_bytes is not None and (type(chunk_bytes) is not int or chunk_bytes <= 0):
        raise ValueError(f"ctx.array.saving.storage_options.chunk_byte_size must be a positive int (bytes), "
                         f"got {chunk_bytes!r}")
    return Storage(dtype, chunk_bytes)


def _dtype(value: Any) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not (dtype.kind in "biufc" or hasattr(ml_dtypes, dtype.name)):
        raise ValueError(f"ctx.array.saving.storage_options.dtype must be a numeric numpy or jax dtype (such as "
                         f"np.float16 or jnp.bfloat16), got {value!r}")
    return dtype


def cast(host: leaves_lib.HostLeaf, dtype: np.dtype) -> None:
    """Makes an array leaf stored as ``dtype`` (its bytes and its manifest entry); other leaves are left as they are."""
    if host.meta["type"] not in _CAST:
        return
    host.meta["dtype"] = leaves_lib.dtype_name(dtype)
    if host.spread is None:
        host.array = host.array.astype(dtype, copy=False)
        return
    own_shards = host.spread.own_shards
    host.spread = dataclasses.replace(
        host.spread, own_shards=lambda: [(index, data.astype(dtype, copy=False)) for index, data in own_shards()])
