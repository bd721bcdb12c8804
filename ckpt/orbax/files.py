"""Reading Orbax's files as untrusted input: JSON files of bounded size, read without following
symlinks, and directories checked to hold only plain files and directories before tensorstore reads them.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ckpt import storage
from ckpt.errors import CheckpointCorruptedError

MAX_JSON_BYTES = 64 << 20  # Orbax's largest JSON file, _METADATA, takes ~300 bytes a leaf
# What tensorstore reads whole to open an array: its zarr metadata, an OCDBT database's manifest (a few hundred bytes)
METADATA_FILES = frozenset({".zarray", ".zattrs", ".zgroup", "zarr.json", "manifest.ocdbt"})


def read_json(path: Path, step_dir: Path) -> Any:
    """The JSON in ``path`` (below ``step_dir``, a step or a root); FileNotFoundError when it is missing,
    CheckpointCorruptedError (naming the file) for a symlink (the file, or a directory between ``step_dir``
    and it), a special file, a file over ``MAX_JSON_BYTES``, one this process may not read, or malformed JSON."""
    try:
        storage.LocalFiles(step_dir).size(str(path))  # no link on the way: what it leads to lies outside
        data = storage.read_json_bytes(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise
    except ValueError as e:  # a link, a special file or too large: storage's message names the file
        raise CheckpointCorruptedError(f"{e}; not a file of an Orbax checkpoint", path=step_dir) from None
    except OSError as e:  # (as for ckpt's own manifest: one unreadable step is damaged, not its root unreadable)
        raise CheckpointCorruptedError(f"{step_dir}: {e}", path=step_dir) from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise CheckpointCorruptedError(f"{path} is not valid JSON ({e})", path=step_dir) from None


def read_required_json(path: Path, step_dir: Path) -> Any:
    """:func:`read_json` of a file an item cannot be read without (its ``_METADATA``, its ``_strings.json``):
    a missing one is damage, raised as CheckpointCorruptedError naming the file."""
    try:
        return read_json(path, step_dir)
    except FileNotFoundError:
        raise CheckpointCorruptedError(f"{path} is missing: the Orbax item cannot be read without it",
                                       path=step_dir) from None


def check_plain_tree(directory: Path, step_dir: Path, budget: int) -> None:
    """Raises CheckpointCorruptedError when ``directory`` is, or holds, anything but plain files and
    directories (a symlink could lead tensorstore's reads outside the step, a FIFO could hang them), or a
    file larger than tensorstore can read: it reads each file whole (but an OCDBT database's data files,
    ``d/``, by byte range), and aborts the process when it cannot allocate that. So an array's metadata or
    a database's manifest (``METADATA_FILES``) over ``MAX_JSON_BYTES``, or a chunk over ``budget`` (what this
    process may allocate), is refused, naming it."""
    if not is_plain_dir(directory):
        raise CheckpointCorruptedError(f"{directory} is not a plain directory", path=step_dir)
    try:
        found = storage.regular_files(directory)
    except ValueError as e:
        raise CheckpointCorruptedError(f"{e}; an Orbax checkpoint never holds a symlink or a special file",
                                       path=step_dir) from None
    for path in found:
        limit = MAX_JSON_BYTES if path.name in METADATA_FILES else None if _is_ocdbt_data(path) else budget
        size = os.lstat(path).st_size
        if limit is not None and size > limit:
            raise CheckpointCorruptedError(f"{path} is a file of {size} bytes, more than the {limit} ckpt reads "
                                           f"there ({'metadata' if limit == MAX_JSON_BYTES else 'a chunk'} that "
                                           "tensorstore reads whole)", path=step_dir)


def _is_ocdbt_data(path: Path) -> bool:
    """A data file of an OCDBT database (``<db>/d/<id>``, beside its ``manifest.ocdbt``), read by byte range."""
    return path.parent.name == "d" and is_plain_file(path.parent.parent / "manifest.ocdbt")


def is_plain_dir(path: Path) -> bool:
    """A directory that is not a symlink."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def is_plain_file(path: Path) -> bool:
    """A regular file that is not a symlink."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_plain_name(name: Any) -> bool:
    """A name of one entry of a directory (no separator, not ``.``/``..``, not hidden)."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".")
            and not any(c in name for c in "/\\\0"))
