"""torch's own checkpointer, ``torch.distributed.checkpoint`` (DCP), in one process, with its defaults.

The state is the same plain state dict ``torch.save`` gets. ``save`` is ``dcp.save`` (its
``FileSystemWriter`` fsyncs each data file and commits by renaming ``.metadata``), ``save_async`` is
``dcp.async_save`` (a copy of the state on the calling thread, the write on a background thread),
and ``load`` is ``dcp.load`` into a new state dict of empty tensors, allocated inside the timing as
every other system allocates what it loads into. A save (sync or async) is durable only once the
checkpoint's directory and the root are fsync'd too, which DCP omits: both are timed after it, as
bench_dcp.py does and as ckpt's commit does.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import workloads
from pending import Pending
from torch_state import TorchStateSystem, fsync_dir

# One process without torch.distributed: DCP says so on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class DcpSystem(TorchStateSystem):
    name = "dcp"

    def step_path(self, step: int) -> Path:
        return self.root / str(step)

    def _durable(self, step: int) -> None:
        fsync_dir(self.step_path(step))
        fsync_dir(self.root)

    def save(self, step: int) -> None:
        dcp.save(self.state, checkpoint_id=self.step_path(step))
        self._durable(step)

    def save_async(self, step: int) -> Pending:
        future = dcp.async_save(self.state, checkpoint_id=self.step_path(step))

        def wait() -> None:
            future.result()
            self._durable(step)

        return Pending(wait=wait, done=future.done)

    def load(self, step: int) -> Any:
        target = workloads.map_leaves(self.state, lambda x: torch.empty_like(x) if isinstance(x, torch.Tensor) else x)
        dcp.load(target, checkpoint_id=self.step_path(step))
        return target
