"""The floors: the same bytes with nothing but numpy and the file system.

* blocking floor: ``np.copyto`` of every array into preallocated, pre-faulted buffers;
* write floor: every array ``tofile`` into one file, then ``fsync``;
* read floor: ``readinto`` preallocated, pre-faulted buffers of its own, in order.

The read floor does not reuse the blocking floor's buffers: its copies touch them just before each
load, which leaves them hot, while any loader's destination (and these buffers) has sat idle since the
last repetition, and idle guest memory on these VMs is reclaimed by the hypervisor (see
``harness.WARM_HEAP``). Sharing them made the 1 GiB read floor 20-30% faster than reading into
buffers untouched since the last load.

Scalars and structure are ignored: the floors carry only the array bytes.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

import workloads
from pending import Pending, finished


class Floor:
    """The raw-bytes baseline, with the same interface as the system adapters."""

    name = "floor"

    def __init__(self, tree: Any):
        self.state = workloads.raw_arrays(tree)
        self.root = Path()

    def _prefaulted(self) -> list[np.ndarray]:
        buffers = [np.empty_like(a) for a in self.state]
        for buffer in buffers:
            buffer.fill(0)  # pre-fault: first touch of fresh guest memory is very slow on these VMs
        return buffers

    # made on first use (the warm-up), so that a process that never loads holds no read buffers
    copy_buffers = functools.cached_property(_prefaulted)
    read_buffers = functools.cached_property(_prefaulted)

    def open(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def step_path(self, step: int) -> Path:
        return self.root / f"{step}.bin"

    def save(self, step: int) -> None:
        with open(self.step_path(step), "wb", buffering=0) as f:
            for array in self.state:
                array.tofile(f)
            os.fsync(f.fileno())

    def save_async(self, step: int) -> Pending:
        for array, buffer in zip(self.state, self.copy_buffers):
            np.copyto(buffer, array)
        return finished()

    def load(self, step: int) -> list[np.ndarray]:
        with open(self.step_path(step), "rb", buffering=0) as f:
            for buffer in self.read_buffers:
                view = memoryview(buffer.reshape(-1).view(np.uint8))
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise EOFError(f"{self.step_path(step)} is shorter than the state")
                    view = view[n:]
        return self.read_buffers

    def close(self) -> None:
        pass
