"""What ckpt tells about a checkpoint without reading its arrays."""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from ckpt.storage import location

T = TypeVar("T")


_DATETIME = datetime.datetime


def now_nsecs() -> int:
    """Now, in nanoseconds since the epoch: a checkpoint's times and the clock of the time-based
    policies. ``time.time_ns()``, or ``datetime.datetime.now()`` where ``datetime.datetime`` has been
    replaced (Orbax's tests replace it to set the time; ckpt then sees the same times as Orbax).

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        assert ckpt.metadata("model").commit_timestamp_nsecs <= now_nsecs()
    """
    if datetime.datetime is _DATETIME:
        return time.time_ns()
    now = datetime.datetime.now(datetime.timezone.utc)  # a replacement may return a naive (local) time
    return round(now.timestamp() * 1_000_000) * 1000


class CheckpointMetadata(Generic[T]):
    """One checkpoint: its step, path, metrics and timestamps, and (from ``metadata()``) its tree.

    ``metadata`` is None in ``Checkpointer.checkpoints``; ``Checkpointer.metadata(step)`` fills it with
    the saved tree whose leaves are :class:`LeafMetadata` (pass it, or the CheckpointMetadata itself, as
    ``abstract_state`` to load as saved). Outside a sequence (``ckpt.metadata(path)``) ``step`` is None,
    and ``CheckpointMetadata(path, metadata=...)`` builds one, as in Orbax.
    ``monotonic_nsecs`` is ``time.monotonic_ns()`` at the commit (or, for the step a save policy is asked
    about, now) when that happened in this process, else None: intervals between steps use it, so
    that a wall clock set back or forward changes no save decision; the timestamps are wall time.

    Example::

        with ckpt.Checkpointer("runs/exp1") as ckptr:
            ckptr.save(0, {"w": np.ones(3)}, metrics={"loss": 0.5})
            info = ckptr.latest                          # a CheckpointMetadata
            assert (info.step, info.metrics, info.path.name) == (0, {"loss": 0.5}, "0")
            print(info.time)                             # the commit time (UTC)
            assert ckptr.metadata(info).metadata["w"].shape == (3,)
    """

    def __init__(self, step: int | None = None, path: Path | str | None = None, *, metadata: T | None = None,
                 init_timestamp_nsecs: int | None = None, commit_timestamp_nsecs: int | None = None,
                 custom_metadata: Any = None, metrics: Any = None, monotonic_nsecs: int | None = None):
        if path is None and step is not None and not isinstance(step, (int, np.integer)):
            step, path = None, step  # Orbax's free-function form: CheckpointMetadata(path, metadata=...)
        self._step = step
        self.path = None if path is None else location(path)
        self.metadata = metadata
        self.init_timestamp_nsecs = init_timestamp_nsecs
        self.commit_timestamp_nsecs = commit_timestamp_nsecs
        self.custom_metadata = custom_metadata
        self._metrics = metrics
        self.monotonic_nsecs = monotonic_nsecs

    @classmethod
    def from_metadata(cls, metadata: T) -> CheckpointMetadata[T]:
        """A CheckpointMetadata holding only ``metadata`` (a tree to load into), as Orbax builds one.

        Example::

            ckpt.save("model", {"w": np.ones(3)})
            abstract = ckpt.CheckpointMetadata.from_metadata({"w": np.zeros(3, np.float16)})
            assert ckpt.load("model", abstract)["w"].dtype == np.float16
        """
        return cls(metadata=metadata)

    @property
    def step(self) -> int | None:
        return self._step

    @property
    def metrics(self) -> Any:
        return self._metrics

    @property
    def time(self) -> datetime.datetime:
        """The commit time as a UTC datetime. For a step listed without its manifest being read
        (``lightweight_initialize``), whose ``commit_timestamp_nsecs`` is None: its directory's modification time
        (the commit wrote the manifest, the step's last file, into it), where Orbax gives ``datetime.min``; the
        epoch where there is none (an object store's step, a step deleted since)."""
        ns = self.commit_timestamp_nsecs
        return datetime.datetime.fromtimestamp((_modified_nsecs(self.path) if ns is None else ns) / 1e9,
                                               datetime.timezone.utc)

    @property
    def init_timestamp(self) -> datetime.datetime | None:
        ns = self.init_timestamp_nsecs
        return None if ns is None else datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc)

    @property
    def commit_timestamp(self) -> datetime.datetime | None:
        ns = self.commit_timestamp_nsecs
        return None if ns is None else datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc)

    def __repr__(self) -> str:
        return (f"CheckpointMetadata(step={self.step}, path={str(self.path)!r}, metrics={self.metrics!r}, "
                f"time={self.time.isoformat()})")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CheckpointMetadata) and self.step == other.step and self.path == other.path
                and self.commit_timestamp_nsecs == other.commit_timestamp_nsecs)

    def __hash__(self) -> int:
        return hash((self.step, self.path))


def _modified_nsecs(path: Any) -> int:
    """The modification time of the local directory ``path`` (not followed if a link), else 0."""
    try:
        return os.lstat(path).st_mtime_ns if isinstance(path, Path) else 0
    except OSError:
        return 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RootMetadata:
    """What belongs to the whole sequence of checkpoints: its directory and custom metadata.

    Example::

        with ckpt.Checkpointer("runs/exp1", custom_metadata={"model": "mlp"}) as ckptr:
            root = ckptr.root_metadata()
            assert root.custom_metadata == {"model": "mlp"} and root.directory == ckptr.directory
    """

    directory: Path
    custom_metadata: Any = None


PyTreeMetadata = Any
"""Orbax's name for the type of ``metadata(...).metadata``: in ckpt, the saved tree with :class:`LeafMetadata` leaves."""


@dataclasses.dataclass(frozen=True)
class LeafMetadata:
    """A saved leaf: its ``type`` (numpy, jax, torch, int, str, ...), ``shape`` and ``dtype`` (None inline),
    ``nbytes``, and ``sharding``: the ``jax.sharding.NamedSharding`` a jax array (typed PRNG keys included) was
    saved with when jax is imported and this job's devices can hold it, else None (as for every other leaf), so
    that Orbax's idiom ``jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=m.sharding)`` builds an abstract tree
    from it.

    Example::

        ckpt.save("model", {"w": np.ones((2, 3), np.float32), "n": 7})
        leaves = ckpt.metadata("model").metadata         # a tree of LeafMetadata; no array is read
        assert leaves["w"].shape == (2, 3) and leaves["w"].dtype == np.float32
        assert leaves["n"].type == "int" and leaves["n"].shape is None
    """

    type: str
    shape: tuple[int, ...] | None
    dtype: np.dtype | None
    nbytes: int = 0
    sharding: Any = None
