"""orbax-checkpoint's v1 ``training.Checkpointer`` with its defaults; every save forced.

Torch tensors become numpy arrays first (Orbax does not store torch tensors); that translation is
done once, before any measurement.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

import workloads
from pending import Pending


class OrbaxSystem:
    name = "orbax"
    training = ocp.v1.training

    def __init__(self, tree: Any):
        self.state = workloads.to_numpy(tree)
        self.checkpointer: Any = None

    def open(self, root: Path) -> None:
        self.checkpointer = self.training.Checkpointer(root)

    def step_path(self, step: int) -> Path:
        return Path(self.checkpointer.directory) / str(step)

    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.state, force=True)

    def save_async(self, step: int) -> Pending:
        response = self.checkpointer.save_async(step, self.state, force=True)
        checkpointer = self.checkpointer
        return Pending(wait=response.result, done=lambda: not checkpointer.is_saving_in_progress())

    def load(self, step: int) -> Any:
        return self.checkpointer.load(step, abstract_state=self.state)

    def close(self) -> None:
        self.checkpointer.close()
