"""File-system primitives of a checkpoint root and the tensorstore array I/O.

Durability order of a commit (local file system): every data file is fsync'd by tensorstore
(``file_io_sync``), tree.json and manifest.json are written and fsync'd, the step directory is
fsync'd, renamed from ``<step>.ckpt-tmp`` to ``<step>``, and the root directory is fsync'd.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorstore as ts

from ckpt.errors import DirectoryLockedError

_CONTEXT: ts.Context | None = None


def ts_context() -> ts.Context:
    """One shared tensorstore context: durable file writes, wide I/O concurrency, no cache."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context({
            "file_io_concurrency": {"limit": 64},
            "data_copy_concurrency": {"limit": "shared"},
            "cache_pool": {"total_bytes_limit": 0},
            "file_io_sync": True,
        })
    return _CONTEXT


def fsync_path(path: Path) -> None:
    """fsyncs a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Writes and fsyncs ``path`` (not atomic: used inside a temporary directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Writes ``path`` through a temporary file, fsync and rename, then fsyncs its directory."""
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data, mode=mode)
    os.replace(tmp, path)
    fsync_path(path.parent)


def remove_tree(path: Path) -> None:
    """Removes a directory tree; a path that is already gone is fine."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def make_dir(path: Path, *, mode: int | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if mode is not None:
        os.chmod(path, mode)


class DirectoryLock:
    """An exclusive ``flock`` on ``<root>/.ckpt.lock``: one writer per root, released when the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self.path.read_text().strip() or "unknown"
                raise DirectoryLockedError(
                    f"{self.path.parent} is being written by another Checkpointer ({holder}); one writer per "
                    "directory. Readers may still list and load; close the other writer or use another directory."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _chunk_shape(shape: tuple[int, ...], itemsize: int, target_bytes: int) -> list[int]:
    """Chunks split along the first axis so that each holds about ``target_bytes``."""
    if not shape:
        return []
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    rows = max(1, min(shape[0], target_bytes // row_bytes))
    return [max(1, rows)] + [max(1, d) for d in shape[1:]]


def array_spec(kvstore: dict, dtype: np.dtype, shape: tuple[int, ...], target_chunk_bytes: int,
               *, checksum: bool, chunk_shape: tuple[int, ...] | None = None) -> dict:
    """A zarr3 spec for one array, optionally with the crc32c codec; chunked as ``chunk_shape`` (a shard's
    shape, so that processes never write the same chunk) or along the first axis."""
    codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if checksum:
        codecs.append({"name": "crc32c"})
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {
                "chunk_shape": [max(1, d) for d in chunk_shape] if chunk_shape is not None
                else _chunk_shape(shape, dtype.itemsize, target_chunk_bytes)}},
            "codecs": codecs,
        },
    }


def open_for_write(spec: dict) -> ts.TensorStore:
    """Creates the array (or opens it, when another process of the job created it first); every chunk is
    stored, even all-zero ones, so that a missing chunk file means damage."""
    return ts.open({**spec, "store_data_equal_to_fill_value": True}, create=True, open=True,
                   context=ts_context()).result()


def open_for_read(spec: dict) -> ts.TensorStore:
    """Opens an array; reading a chunk whose file is missing raises instead of returning zeros."""
    return ts.open({**spec, "fill_missing_data_reads": False}, open=True, context=ts_context()).result()


def local_kvstore(path: Path) -> dict:
    return {"driver": "file", "path": str(path) + "/"}


def resolve_kvstore(spec: dict, step_dir: Path) -> dict:
    """A manifest's relative kvstore path made absolute under ``step_dir``."""
    spec = dict(spec)
    kv = dict(spec["kvstore"])
    kv["path"] = str(step_dir / kv["path"]) + "/"
    spec["kvstore"] = kv
    return spec


@contextlib.contextmanager
def io_errors(what: str) -> Iterator[None]:
    """Re-raises tensorstore's errors as OSError-like errors that name ``what``."""
    try:
        yield
    except ValueError as e:
        raise OSError(f"{what}: {e}") from e


def list_names(root: Path) -> list[str]:
    try:
        return os.listdir(root)
    except FileNotFoundError:
        return []


def read_json_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def as_readonly(array: Any) -> Any:
    return array
