"""ckpt's ``training.Checkpointer`` with its defaults; every save forced (the policy is not measured)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ckpt
from pending import Pending


class CkptSystem:
    name = "ckpt"
    training = ckpt.training

    def __init__(self, tree: Any):
        self.state = tree
        self.checkpointer: ckpt.Checkpointer | None = None

    def open(self, root: Path) -> None:
        self.checkpointer = self.training.Checkpointer(root)

    def step_path(self, step: int) -> Path:
        return self.checkpointer.directory / str(step)

    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.state, force=True)

    def save_async(self, step: int) -> Pending:
        response = self.checkpointer.save_async(step, self.state, force=True)
        return Pending(wait=response.result, done=response.done)

    def load(self, step: int) -> Any:
        return self.checkpointer.load(step, abstract_state=self.state)

    def close(self) -> None:
        self.checkpointer.close()
