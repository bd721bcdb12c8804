"""``torch.save`` / ``torch.load`` of the equivalent plain state dict, made durable the usual way.

A sync save writes ``<step>.pt.tmp``, fsyncs it, renames it to ``<step>.pt`` and fsyncs the
directory. An async save does what Lightning's ``AsyncCheckpointIO`` does: clone every tensor on the
calling thread, then run the sync save on a background thread.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

import workloads
from pending import Pending
from torch_state import TorchStateSystem, fsync_dir


class TorchSystem(TorchStateSystem):
    name = "torch"

    def step_path(self, step: int) -> Path:
        return self.root / f"{step}.pt"

    def _write(self, state: Any, step: int) -> None:
        path = self.step_path(step)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)

    def save(self, step: int) -> None:
        self._write(self.state, step)

    def save_async(self, step: int) -> Pending:
        snapshot = workloads.map_leaves(self.state, lambda x: x.clone() if isinstance(x, torch.Tensor) else x)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._write(snapshot, step)
            except BaseException as e:  # re-raised by wait()
                errors.append(e)

        thread = threading.Thread(target=run, name="torch-save")
        thread.start()

        def wait() -> None:
            thread.join()
            if errors:
                raise errors[0]

        return Pending(wait=wait, done=lambda: not thread.is_alive())

    def load(self, step: int) -> Any:
        return torch.load(self.step_path(step))
