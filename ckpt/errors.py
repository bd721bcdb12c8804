"""Errors raised by ckpt. Each message names what is wrong: the step, the key path, the file."""
from __future__ import annotations

from pathlib import Path


class StepNotFoundError(FileNotFoundError):
    """No committed checkpoint exists at the requested step (or none at all for ``step=None``).

    Attributes:
      step: the step asked for, or None when the latest was asked for.
      path: the root directory that was searched.
    """

    def __init__(self, message: str, *, step: int | None = None, path: Path | str | None = None):
        super().__init__(message)
        self.step = step
        self.path = path


class StepAlreadyExistsError(FileExistsError):
    """A committed checkpoint already exists at this step and ``overwrite`` was not set.

    Attributes:
      step: the step that exists (None for a checkpoint written by ``ckpt.save``).
      path: the step's directory.
    """

    def __init__(self, message: str, *, step: int | None, path: Path | str):
        super().__init__(message)
        self.step = step
        self.path = path


class CheckpointCorruptedError(ValueError):
    """A committed checkpoint failed a check on read: a checksum, a missing file, a bad manifest.

    Attributes:
      path: the step directory (or file) that is damaged.
      key_paths: the key paths of the damaged leaves, when known.
    """

    def __init__(self, message: str, *, path: Path | str, key_paths: tuple[str, ...] = ()):
        super().__init__(message)
        self.path = path
        self.key_paths = key_paths


class DirectoryLockedError(RuntimeError):
    """Another writer (another Checkpointer, maybe in another process) holds this root directory."""


class TreeMismatchError(ValueError):
    """The abstract tree given to ``load`` does not match the saved tree; lists every differing key path."""

    def __init__(self, message: str, *, differences: list[str]):
        super().__init__(message)
        self.differences = differences
