"""Errors raised by ckpt. Each message names what is wrong: the step, the key path, the file.

Example::

    try:
        state = ckpt.load("runs/exp1/100")
    except ckpt.errors.CheckpointCorruptedError as e:
        print(f"{e.path} is damaged at {e.key_paths}; `ckpt verify` checks every byte")
"""
from __future__ import annotations

from pathlib import Path


class StepNotFoundError(FileNotFoundError):
    """No committed checkpoint exists at the requested step (or none at all for ``step=None``).

    Attributes:
      step: the step asked for, or None when the latest was asked for.
      path: the root directory that was searched.

    Example::

        with ckpt.Checkpointer("runs/exp1") as ckptr:
            try:
                ckptr.load(5)
            except ckpt.errors.StepNotFoundError as e:
                assert e.step == 5                       # e.path: the root that was searched
    """

    def __init__(self, message: str, *, step: int | None = None, path: Path | str | None = None):
        super().__init__(message)
        self.step = step
        self.path = path


class StepReplacedError(StepNotFoundError):
    """The step being read was replaced meanwhile (saved again with ``overwrite=True``, by another
    process): what was read of it is gone. Reading it again reads the new one; a Checkpointer's
    ``load`` does so once by itself.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        try:
            state = ckpt.load("model")                   # another process may save "model" again meanwhile
        except ckpt.errors.StepReplacedError:
            state = ckpt.load("model")                   # the new one
    """


class StepAlreadyExistsError(FileExistsError, ValueError):
    """A committed checkpoint already exists at this step and ``overwrite`` was not set.

    A ``FileExistsError`` (Orbax's ``Checkpointer`` raises one) and a ``ValueError`` (Orbax's free
    ``save`` and v0 ``CheckpointManager`` raise one), so that either ``except`` catches it.

    Attributes:
      step: the step that exists (None for a checkpoint written by ``ckpt.save``).
      path: the step's directory.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        try:
            ckpt.save("model", {"w": np.zeros(3)})       # overwrite=True replaces it
        except ckpt.errors.StepAlreadyExistsError as e:
            assert e.path.name == "model"
    """

    def __init__(self, message: str, *, step: int | None, path: Path | str):
        super().__init__(message)
        self.step = step
        self.path = path


class ForeignEntryError(FileExistsError):
    """Something ckpt did not write is where ckpt would write or remove: ckpt never overwrites, renames or
    deletes it. A save to that step fails before anything is written; listing skips it with a warning.

    Attributes:
      path: the file or directory that is in the way.

    Example::

        Path("runs/exp1/7").mkdir(parents=True)          # a directory of the user's, named like a step
        with ckpt.Checkpointer("runs/exp1") as ckptr:
            try:
                ckptr.save(7, {"w": np.ones(3)}, force=True, overwrite=True)
            except ckpt.errors.ForeignEntryError as e:
                print(e)                                 # names runs/exp1/7 and what it holds
    """

    def __init__(self, message: str, *, path: Path | str):
        super().__init__(message)
        self.path = path


class RootDirectoryError(OSError):
    """A checkpoint root cannot be used as asked: it is a file (or lies under one), a checkpoint's step
    directory (or lies in one: pass the directory that holds the steps), or this process may not create or
    write it. The message says what is wrong and what to do. A read-only root can still be listed and
    loaded: only a save needs to write.

    Attributes:
      path: the root directory.

    Example::

        Path("not-a-dir").write_text("a file")
        try:
            ckpt.Checkpointer("not-a-dir")
        except ckpt.errors.RootDirectoryError as e:
            print(e)                                     # names the file and asks for a directory
    """

    def __init__(self, message: str, *, path: Path | str, errno: int | None = None):
        super().__init__(*(() if errno is None else (errno,)), message)
        self.path = path


class RootNotWritableError(RootDirectoryError, PermissionError):
    """A save into a root this process may not write (permission denied): a RootDirectoryError and a
    PermissionError (``errno`` EACCES or EPERM). Listing and loading from that root still work.

    Example::

        error = ckpt.errors.RootNotWritableError("cannot write in runs/ro: Permission denied", path="runs/ro",
                                                 errno=13)   # EACCES
        assert isinstance(error, PermissionError)         # `except PermissionError` catches it
    """


class CheckpointCorruptedError(ValueError):
    """A committed checkpoint failed a check on read: a checksum, a missing file, a bad manifest.

    Attributes:
      path: the step directory (or file) that is damaged.
      key_paths: the key paths of the damaged leaves, when known.

    Example::

        ckpt.save("model", {"w": np.ones(3)})
        Path("model/manifest.json").write_text("{")      # damage it
        try:
            ckpt.load("model")
        except ckpt.errors.CheckpointCorruptedError as e:
            print(e.path, e.key_paths)                   # what is damaged; `ckpt verify` checks every byte
    """

    def __init__(self, message: str, *, path: Path | str, key_paths: tuple[str, ...] = ()):
        super().__init__(message)
        self.path = path
        self.key_paths = key_paths


class UnsupportedLayoutError(ValueError):
    """A checkpoint written by another tool (Orbax) in a layout ckpt cannot read, or (to ``ckpt convert``) a
    step holding a checkpointable only its handler reads; the message names the directory and what it
    holds. Never taken for an empty directory.

    Attributes:
      path: the step (or item) directory.

    Example::

        step = Path("orbax_run/100")                     # an Orbax step with an item of grain's handler
        (step / "dataset").mkdir(parents=True)
        (step / "_CHECKPOINT_METADATA").write_text('{"item_handlers": {"dataset": "grain.DatasetHandler"}}')
        try:
            ckpt.load(step, checkpointable_name="dataset")
        except ckpt.errors.UnsupportedLayoutError as e:
            print(e)                                     # which handler wrote it, and what ckpt reads
    """

    def __init__(self, message: str, *, path: Path | str):
        super().__init__(message)
        self.path = path


class InvalidLayoutError(ValueError):
    """The directory is not a checkpoint (no ckpt manifest, no ckpt files): nothing in it is damaged.

    Example::

        Path("notes").mkdir()
        try:
            ckpt.load("notes")
        except ckpt.errors.InvalidLayoutError as e:
            print(e)                                     # names the directory and what a checkpoint holds
    """


class CheckpointNotFoundError(InvalidLayoutError, FileNotFoundError):
    """Nothing exists at the checkpoint path given. Both an InvalidLayoutError (what Orbax raises) and a
    FileNotFoundError, so that either ``except`` catches it.

    Example::

        try:
            ckpt.load("runs/typo")
        except FileNotFoundError as e:                   # or ckpt.errors.InvalidLayoutError
            print(e)                                     # names the path
    """


class NotACheckpointError(ForeignEntryError, InvalidLayoutError):
    """``ckpt.delete`` (or ``delete_async``) of a path that holds no checkpoint: a run's root, one item of
    an Orbax step, a user's directory or file, a link. Nothing is deleted. A ForeignEntryError (ckpt never
    deletes what it did not write) and an InvalidLayoutError, as Orbax's ``delete`` raises.

    Example::

        Path("notes").mkdir()
        try:
            ckpt.delete("notes")
        except ckpt.errors.InvalidLayoutError as e:      # or ckpt.errors.ForeignEntryError
            print(e)                                     # names notes and what it holds; it is left alone
    """


class CheckpointableNotFoundError(KeyError):
    """A checkpointable asked for by name is not in the step; the message names those asked for that are
    missing (Orbax's words: "Requested checkpointables") and those the step has.

    Example::

        ckpt.save_checkpointables("model", {"params": {"w": np.ones(3)}})
        try:
            ckpt.load_checkpointables("model", {"optimizer": None})
        except ckpt.errors.CheckpointableNotFoundError as e:   # a KeyError
            print(e)                                     # 'optimizer' is missing; the step has ['params']
    """

    def __init__(self, step_dir: Path | str, missing: list[str], available: list[str]):
        hint = ""
        if "state" in missing and "pytree" in available:  # Orbax's default name before 0.12
            hint = (": the state of a step written by Orbax before 0.12 is named 'pytree'; load it with "
                    "checkpointable_name='pytree' (load, restore_train_state)")
        super().__init__(f"Requested checkpointables: {missing} are not in {step_dir}; it has {sorted(available)}"
                         + hint)


class UnregisteredTypeError(TypeError, ValueError):
    """A leaf of a type ckpt cannot store; the message names its key path and type. A TypeError, and a
    ValueError as Orbax's error of the same name is.

    Example::

        try:
            ckpt.save("model", {"z": complex(1, 2)})
        except ckpt.errors.UnregisteredTypeError as e:
            print(e)                                     # the key path ['z'] and the type; nothing was written
    """


class DirectoryLockedError(RuntimeError):
    """Another writer (another Checkpointer, maybe in another process) holds this root directory.

    Example::

        with ckpt.Checkpointer("runs/exp1") as first, ckpt.Checkpointer("runs/exp1") as second:
            first.save(0, {"w": np.ones(3)})
            try:
                second.save(1, {"w": np.ones(3)})
            except ckpt.errors.DirectoryLockedError as e:
                print(e)                                 # names the directory and the holder
    """


class TreeMismatchError(ValueError):
    """The abstract tree given to ``load`` does not match the saved tree, or the processes of a
    multi-process job save different trees; lists every differing key path.

    Example::

        ckpt.save("model", {"w": np.ones(3), "b": np.zeros(2)})
        try:
            ckpt.load("model", {"w": np.ones(4)})
        except ckpt.errors.TreeMismatchError as e:
            print(e.differences)                         # "b" is missing, "w" has another shape
    """

    def __init__(self, message: str, *, differences: list[str]):
        super().__init__(message)
        self.differences = differences
