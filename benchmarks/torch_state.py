"""What the torch baselines share: the plain torch state dict they save under a root of their own
(``torch.save`` in system_torch.py, DCP in system_dcp.py), and the directory fsync that makes a
rename or a new file durable."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import workloads


def fsync_dir(path: Path) -> None:
    """fsyncs a directory, so that the entries made or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TorchStateSystem:
    """A system that saves ``workloads.to_torch(tree)`` under the root given to :meth:`open`."""

    def __init__(self, tree: Any):
        self.state = workloads.to_torch(tree)
        self.root = Path()

    def open(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        pass
