"""File-system primitives of a checkpoint root and the tensorstore array I/O.

Durability order of a commit (local file system): every data file is fsync'd (by tensorstore,
``file_io_sync``, or, for the chunk files written straight from memory (:func:`write_direct`) and the
background writes of an async save, by the writer before it writes tree.json), tree.json and
manifest.json are written and fsync'd, every directory of the step is fsync'd, the step is renamed
from ``<step>.ckpt-tmp`` to ``<step>``, and the root directory is fsync'd.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import math
import os
import re
import secrets
import shutil
import stat
import urllib.parse
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from ckpt import format as fmt
from ckpt import host_memory
from ckpt.errors import DirectoryLockedError, ForeignEntryError, RootDirectoryError, RootNotWritableError
from ckpt.objectstore import SCHEMES, ObjectPath, access_error, is_url

Location = Path | ObjectPath
logger = logging.getLogger("ckpt")

_CONTEXTS: dict[tuple[bool, bool], ts.Context] = {}


def ts_context(background: bool = False, synced: bool = True) -> ts.Context:
    """The shared tensorstore contexts: no cache; wide I/O concurrency, or, for the writes of an async
    save (``background``), one file at a time, so that they take about one core and leave the other to
    the training loop. ``synced``: each file is fsync'd as it is written; else the writer starts each
    file's writeback itself (:func:`start_writeback`) and fsyncs the files before its commit
    (:func:`fsync_files`). On one thread, a file written and fsync'd after another left the disk idle
    while the next was written: 1 GiB in 64 files took 1.5-3.5 s that way, 0.3-0.45 s the other."""
    if (background, synced) not in _CONTEXTS:
        _CONTEXTS[background, synced] = ts.Context({
            "file_io_concurrency": {"limit": 1 if background else 64},
            "data_copy_concurrency": {"limit": 1 if background else "shared"},
            "cache_pool": {"total_bytes_limit": 0},
            "file_io_sync": synced,
        })
    return _CONTEXTS[background, synced]


def location(directory: str | os.PathLike | ObjectPath) -> Location:
    """A root or step directory: an absolute local Path, or an :class:`ObjectPath` for s3:// and gs://.

    A ``file://`` URL is its local path.

    Raises:
      ValueError: an empty path (which would mean the current directory), a URL of a scheme ckpt cannot
        store to (which would be a relative directory named ``hdfs:``), an s3:// or gs:// URL that lost a
        slash (``s3:/bucket/x``, what ``pathlib.Path("s3://bucket/x")`` makes of it: a relative directory
        named ``s3:`` on the local disk), a local path with a backslash (tensorstore would write elsewhere)
        or a name that is not UTF-8 (tensorstore cannot open it).
    """
    if is_url(directory):
        return ObjectPath(os.fspath(directory) if isinstance(directory, os.PathLike) else str(directory))
    if isinstance(directory, str):
        directory = _local_path(directory)
    path = directory if isinstance(directory, Path) else Path(directory)
    if path.parts and path.parts[0].endswith(":") and path.parts[0][:-1].lower() in SCHEMES:
        url = f"{path.parts[0][:-1]}://{'/'.join(path.parts[1:])}"
        raise ValueError(f"the path {str(path)!r} is the URL {url!r} with a slash lost (pathlib.Path and "
                         f"os.path.normpath make '{path.parts[0]}//' into '{path.parts[0]}/'), which would be a "
                         f"directory named {path.parts[0]!r} on the local disk; give the URL as a string")
    path = path.expanduser().absolute()
    if ".." in path.parts:  # tensorstore refuses '..'; what the system means by it (after symbolic links) is meant,
        # and as the system does, a link named last is not followed (a save or a deletion never goes through it)
        path = path.resolve() if path.name == ".." else path.parent.resolve() / path.name
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the path {str(path)!r} is not valid UTF-8 (a name made of other bytes), which "
                         "tensorstore needs to store arrays; use a path whose names are UTF-8") from None
    if "\\" in str(path):
        raise ValueError(f"the path {str(path)!r} has a backslash, which tensorstore reads as a path separator, so "
                         "its arrays would land in another directory; use a path without backslashes")
    return path


def place(path: Location) -> str:
    """What the processes of a job compare to tell whether they name one directory: a local path with its
    symbolic links resolved (a root and a link to it, spelled otherwise on each process, are one place),
    an object store's URL as it is."""
    return os.path.realpath(path) if isinstance(path, Path) else str(path)


def _local_path(directory: str) -> str:
    """``directory`` as a local path: a ``file://`` URL's path; ValueError for an empty string or another URL."""
    if not directory.strip():
        raise ValueError(f"the directory is {directory!r}: give the checkpoint root's path (\".\" for the current "
                         "directory)")
    scheme, separator, rest = directory.partition("://")
    if not separator or "/" in scheme:
        return directory
    if scheme.lower() == "file" and rest.startswith("/"):
        return urllib.parse.unquote(rest)
    if scheme.lower() == "file":
        raise ValueError(f"{directory!r}: a file:// URL names a local path from the root (file:///tmp/runs)")
    raise ValueError(f"{directory!r} is a {scheme}:// URL; ckpt stores to local directories (or file://), "
                     f"{', '.join(f'{s}://' for s in SCHEMES)}")


def fsync_path(path: Location) -> None:
    """fsyncs a file or a directory (nothing to do on an object store)."""
    if isinstance(path, ObjectPath):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        with naming(path):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: Location) -> Iterator[None]:
    """Re-raises an OSError of the block that names no file (``os.write`` and ``os.fsync`` on a descriptor:
    a full disk, EIO) as the same error naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def start_writeback(path: Location) -> None:
    """Starts writing a file's dirty pages to disk without waiting for them (Linux's ``sync_file_range``),
    so that the disk writes it while the next file is written; an fsync still makes it durable. Nothing
    where the system has no such call, or on an object store."""
    sync_file_range = _sync_file_range()
    if isinstance(path, ObjectPath) or sync_file_range is None:
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # (never a link, never waits on a FIFO)
    try:
        sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # advice: an error changes nothing
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # (linux/fs.h)


@functools.cache
def _sync_file_range() -> Any:
    found = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if found is not None:
        found.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return found


DIRECT_ALIGN = 4096  # O_DIRECT: memory address and length a multiple of the disk's logical block (at most 4 KiB)


def write_direct(path: Location, data: np.ndarray) -> bool:
    """Writes ``data`` (flat uint8) as the new file ``path``, making its parent directories, straight
    from memory to the disk (Linux ``O_DIRECT``): no page cache is filled, so the write costs almost
    no CPU and no memory; an fsync still makes the file durable. Returns False, leaving no file, where
    that cannot be done: an object store, a system without ``O_DIRECT``, a file system that refuses
    it (EINVAL at the open or a write), ``data`` empty or not aligned to ``DIRECT_ALIGN`` bytes in
    address and length.

    On this project's 2-core VM, 1 GiB in 64 files: 0.51-0.55 s and 0.04 s of CPU, fsyncs included,
    against 0.7-1.3 s and 0.23-0.77 s of CPU through the page cache, whose fresh pages cost the
    writing thread up to 3 s of system time in some runs. (tensorstore 0.1.86's ``file_io_mode``
    "direct" still writes through the page cache: its chunk writes measured the same as without it.)

    Raises:
      OSError: naming the file; also when something is at ``path`` already (never followed, never replaced).
    """
    if (isinstance(path, ObjectPath) or not hasattr(os, "O_DIRECT") or not data.nbytes
            or (data.ctypes.data | data.nbytes) % DIRECT_ALIGN):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECT
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise OSError(e.errno, e.strerror, str(path)) from None
        with contextlib.suppress(FileNotFoundError):  # (some file systems create the file, then refuse)
            os.unlink(path)
        return False
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        if e.errno == errno.EINVAL:  # refused (the file is gone: the caller writes it another way)
            return False
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    return True


def write_new_file(path: Path, parts: Iterable[np.ndarray], size: int) -> None:
    """Writes ``parts`` (flat uint8 arrays) one after another as the new file ``path`` of ``size`` bytes,
    zeros after them, making its parent directories; through the page cache, not fsync'd (see
    :func:`fsync_files`). Each part is let go of before the next is asked for (its buffer may fill it).

    Raises:
      OSError: naming the file; also when something is at ``path`` already (never followed, never replaced).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            _write_parts(fd, parts)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


def _write_parts(fd: int, parts: Iterable[Any]) -> None:
    """Writes ``parts`` (bytes-like, C-contiguous: of any item size) to the open file ``fd`` one after another, each
    let go of before the next is asked for (its buffer may fill it); a short write goes on from the byte it ended at."""
    for part in parts:
        view = memoryview(part).cast("B")  # (sliced by bytes: os.write counts bytes, a float32 view's items are 4)
        del part
        while view:
            view = view[os.write(fd, view):]
        view.release()


FSYNC_THREADS = 8  # fsyncs in flight at once: each mostly waits, for the disk or a network file system's server


@functools.cache
def _fsync_threads() -> concurrent.futures.ThreadPoolExecutor:
    """The threads of :func:`fsync_all` (made once per process; a forked child, which has none of its
    parent's threads, makes its own)."""
    return concurrent.futures.ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="ckpt-fsync")


os.register_at_fork(after_in_child=_fsync_threads.cache_clear)


def fsync_all(paths: list[Path]) -> None:
    """fsyncs ``paths`` (files or directories) several at once; once all are done, raises the first
    error, naming its path. (The 902 directories of a step of 300 arrays: 98-126 ms one after another
    on this project's VM, 48-67 ms eight at a time.)"""
    futures = [_fsync_threads().submit(fsync_path, path) for path in paths]
    concurrent.futures.wait(futures)
    for future in futures:
        future.result()


def fsync_files(directory: Location) -> None:
    """fsyncs every regular file under ``directory``, a directory the caller wrote; what else may have
    appeared there (a link, a FIFO) is neither followed nor opened. Nothing on an object store."""
    if isinstance(directory, ObjectPath):
        return
    files = [Path(dirpath, name) for dirpath, _, names in os.walk(directory) for name in names]
    fsync_all([path for path in files if stat.S_ISREG(os.lstat(path).st_mode)])


def write_file(path: Path, data: bytes | Sequence[bytes], *, mode: int | None = None) -> None:
    """Writes and fsyncs ``path`` (not atomic: used inside a temporary directory): ``data``, or its parts one
    after another (a local file is written from them without joining them).

    Only ever writes a regular file of ckpt's own: what else is at ``path`` (a symbolic link, a FIFO, a
    device, a file with another name elsewhere) is neither followed, opened nor truncated.

    Raises:
      ForeignEntryError: something other than such a file is at ``path``.
    """
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    if isinstance(path, ObjectPath):
        return path.write_bytes(b"".join(parts))
    fd = _open_own_file(path, 0o666 if mode is None else mode)
    try:
        with naming(path):
            _write_parts(fd, parts)
            os.fsync(fd)
    finally:
        os.close(fd)


def _open_own_file(path: Path, mode: int) -> int:
    """``path`` opened for writing and emptied, when it is missing or a regular file linked from nowhere else."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise _not_own_file(path)  # (a device is not even opened)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # what appeared there since: a link, a FIFO
            raise _not_own_file(path) from None
        raise
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:
        os.close(fd)
        raise _not_own_file(path, f"a file with {found.st_nlink} names" if stat.S_ISREG(found.st_mode) else None)
    os.ftruncate(fd, 0)
    return fd


def _not_own_file(path: Path, holds: str | None = None) -> ForeignEntryError:
    return ForeignEntryError(f"{path} is {holds or describe(path)}, where ckpt writes a file of its own: ckpt neither "
                             "writes through it nor removes it. Move it away if it is not needed.", path=path)


def write_file_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Writes ``path`` through a temporary file (:func:`atomic_temporary`), fsync and rename, then fsyncs its
    directory."""
    if isinstance(path, ObjectPath):
        return path.write_bytes(data)
    tmp = atomic_temporary(path)
    write_file(tmp, data, mode=mode)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_temporary(path: Path) -> Path:
    """The file :func:`write_file_atomic` writes before renaming it to ``path`` (a crash between the two
    leaves it)."""
    return path.with_name(path.name + ".tmp")


def exists(path: Location) -> bool:
    """Whether anything (a symbolic link included, never followed) is at ``path``."""
    return os.path.lexists(path) if isinstance(path, Path) else path.exists()


def describe(path: Location) -> str:
    """What is at ``path``, in words, for messages: a regular file of 12 bytes, a symbolic link to ...,
    a directory holding a, b (and 3 more), nothing. Never follows a symbolic link."""
    names = None
    if isinstance(path, ObjectPath):
        names = path.children()
        if not names:
            return "an object" if path.exists() else "nothing"
    else:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return "nothing"
        if stat.S_ISLNK(st.st_mode):
            return f"a symbolic link to {os.readlink(path)!r}"
        if stat.S_ISREG(st.st_mode):
            return f"a regular file of {st.st_size} bytes"
        if not stat.S_ISDIR(st.st_mode):
            return "a special file (a FIFO, socket or device)"
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            return f"a directory that cannot be listed ({e.strerror})"
    if not names:
        return "an empty directory"
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return f"a directory holding {', '.join(repr(n) for n in names[:5])}{more}"


def mark(directory: Location, *, durable: bool = False) -> None:
    """Puts ckpt's marker (the empty file ``.ckpt-owned``) into a directory ckpt made: a directory is removed
    by ckpt only while it holds the marker, so a crash at any moment of a removal leaves it still marked.
    ``durable`` fsyncs the directory too (a temporary needs not: its commit fsyncs every directory)."""
    write_file(directory / fmt.MARKER, b"")
    if durable:
        fsync_path(directory)


def is_marked(directory: Location) -> bool:
    """Whether ``directory`` is a real directory (not a link) that holds ckpt's marker as a regular file (False
    for a local directory this process may not look into: never taken for ckpt's, so never removed)."""
    if isinstance(directory, ObjectPath):
        return (directory / fmt.MARKER).exists()
    try:
        return stat.S_ISDIR(os.lstat(directory).st_mode) and stat.S_ISREG(os.lstat(directory / fmt.MARKER).st_mode)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # (a name longer than a file name may be: nothing is there)
            return False
        raise


def remove_owned(directory: Location) -> None:
    """Removes a directory ckpt made: everything in it but the marker, then the marker, then the directory
    (a crash leaves it marked, or empty). A path already gone is fine.

    Raises:
      ForeignEntryError: ``directory`` holds no marker and is not empty (ckpt did not make it), or it is a
        file or a symbolic link: nothing is removed.
    """
    if isinstance(directory, ObjectPath):
        if directory.children() and not is_marked(directory):
            raise _foreign(directory)
        return directory.remove_tree(last=fmt.MARKER)
    try:
        names = os.listdir(directory) if stat.S_ISDIR(os.lstat(directory).st_mode) else None
    except FileNotFoundError:
        return
    if names is None or (names and not is_marked(directory)):
        raise _foreign(directory)
    for name in names:
        if name != fmt.MARKER:
            path = os.path.join(directory, name)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)  # never follows symbolic links
            else:
                os.unlink(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / fmt.MARKER)
    os.rmdir(directory)


def remove_failed_temporary(tmp: Location, *, keep_marker: bool = False) -> None:
    """Removes the temporary directory of a save (or a promotion) that failed, while its error is raised,
    which a failure to remove it (often the same fault: a file system gone read-only) must not replace:
    that is logged, and what is left, never listed, is removed by the next save of the step or the next
    writer of the root. ``keep_marker``, on an object store (where a step is written in place): everything
    but the marker is removed, which shows the next writer the step begun there and never committed."""
    try:
        if keep_marker and isinstance(tmp, ObjectPath):
            tmp.remove_all_but(fmt.MARKER)
        else:
            remove_owned(tmp)
    except OSError as e:
        logger.warning("ckpt: could not remove %s, the temporary directory of the failed save: %s", tmp, e)


def _foreign(path: Location) -> ForeignEntryError:
    return ForeignEntryError(f"{path} was not made by ckpt (it holds {describe(path)}, without ckpt's {fmt.MARKER} "
                             "marker): ckpt never removes it. Move it away if it is not needed.", path=path)


def make_temporary(tmp: Location, *, mode: int | None = None) -> int | None:
    """A fresh, marked directory at ``tmp`` to write a step into: a temporary that ckpt left there is removed
    first (on an object store, where a step is written in place, so is the committed step it replaces).

    Returns a descriptor that holds a shared lock on the marker until :func:`release_temporary` (None on
    an object store): meanwhile :func:`in_use` tells any process that sweeps leftovers to leave the
    temporary alone. A child forked meanwhile does not hold it.

    Raises:
      DirectoryLockedError: another save (of another process) is writing a temporary at ``tmp``.
      RootNotWritableError, RootDirectoryError: this process may no longer write in ``tmp``'s directory (a
        root that became read-only after it was taken): nothing is made.
      OSError: the directory or its marker could not be made (a full disk, no inode left); what was made is
        removed.
    """
    if isinstance(tmp, ObjectPath):
        if not (tmp / fmt.MANIFEST).exists() and tmp.children() and not is_marked(tmp):
            raise _foreign(tmp)
        # The marker first, kept while the step replaced (or what a crash left) is removed: a crash at any
        # moment leaves the name marked, as begun and never committed, for the next writer to see.
        mark(tmp)
        (tmp / fmt.MANIFEST).unlink()
        tmp.remove_all_but(fmt.MARKER)
        return None
    if in_use(tmp):
        raise DirectoryLockedError(f"{tmp} is being written by another save of the same step (another process); "
                                   "one writer per step")
    with writing_to(tmp.parent):  # (a root that became read-only since it was taken: its error, naming it)
        remove_owned(tmp)
        make_dir(tmp, mode=mode)
    fd = None
    try:
        fd = os.open(tmp / fmt.MARKER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with contextlib.suppress(OSError):  # a file system without flock: the save goes on, unguarded
            fcntl.flock(fd, fcntl.LOCK_SH)
        with naming(tmp / fmt.MARKER):  # (an NFS client reports a write's ENOSPC or EDQUOT at the fsync)
            os.fsync(fd)  # as every file of a step
    except BaseException:
        if fd is not None:
            os.close(fd)
        remove_failed_temporary(tmp)  # (its caller, given no marker, removes nothing)
        raise
    _MARKERS.add(fd)
    return fd


_MARKERS: set[int] = set()  # the descriptors make_temporary returned and release_temporary has not closed


def release_temporary(marker: int | None) -> None:
    """Lets go of the lock :func:`make_temporary` returned, once the save has committed or failed."""
    if marker is not None and marker in _MARKERS:
        _MARKERS.discard(marker)
        os.close(marker)


def _close_markers_in_child() -> None:
    """After a fork, in the child: closes the inherited marker descriptors (the parent's locks stay held),
    so that a child that outlives a crashed parent (a DataLoader worker) keeps no save's temporary locked."""
    for fd in list(_MARKERS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _MARKERS.clear()


os.register_at_fork(after_in_child=_close_markers_in_child)


def in_use(directory: Location) -> bool:
    """Whether a save is writing the temporary ``directory`` (its marker is locked: see :func:`make_temporary`)."""
    if isinstance(directory, ObjectPath):
        return False
    try:
        fd = os.open(directory / fmt.MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without flock (NFS may want the file open for writing): cannot tell
        return False
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def writing_to(root: Location) -> Iterator[None]:
    """Re-raises an error for lack of permission, or of a read-only file system, on writing in ``root`` as
    a RootDirectoryError that says what to do (unless this process may write in ``root``: then the error is
    of what it names in it, an immutable step, and is raised as it is)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or (isinstance(root, Path)
                                                                     and os.access(root, os.W_OK)):
            raise
        error = RootNotWritableError if e.errno in (errno.EACCES, errno.EPERM) else RootDirectoryError
        raise error(
            f"cannot write in {root}: {e.strerror} ({e.filename}). Checkpoints can still be listed and loaded from "
            "it; to save, use a directory this process may write to.", path=root, errno=e.errno) from e


def make_dir(path: Location, *, mode: int | None = None) -> None:
    """Creates a directory (with its parents) when it is missing; ``mode`` is given to it only then (as in
    Orbax): an existing directory, a user's, keeps its own. FileExistsError when a file is at ``path``."""
    if isinstance(path, ObjectPath):
        return
    if mode is None:
        return path.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, mode)  # (mkdir's mode is cut by the umask)


class DirectoryLock:
    """An exclusive ``flock`` on ``<root>/.ckpt.lock``: one writer per root, released when the process dies.

    A forked child (a DataLoader worker) closes its copy of the descriptor at once, which leaves the
    parent's lock held, so that the lock never outlives the process that took it.
    """

    _held: "weakref.WeakSet[DirectoryLock]" = weakref.WeakSet()

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @classmethod
    def _close_in_child(cls) -> None:
        """After a fork, in the child: closes the inherited descriptors (never unlocks: that would release
        the parent's lock); a child that saves takes the lock anew, and waits its turn like anyone."""
        for lock in list(cls._held):
            if lock._fd is not None:
                fd, lock._fd = lock._fd, None
                with contextlib.suppress(OSError):
                    os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock, or checks that the lock held still guards the directory (local roots only:
        object stores have no locks, so one writer per root is the user's to ensure there).

        Raises:
          DirectoryLockedError: another writer holds it.
          FileNotFoundError: the directory was removed (or replaced) underneath: it is not recreated.
        """
        if isinstance(self.path, ObjectPath):
            return
        if self._fd is not None:
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                raise FileNotFoundError(errno.ENOENT, f"{self.path.parent} was removed or replaced while this "
                                        "Checkpointer held it; open a new Checkpointer to write there again")
            return
        try:
            with writing_to(self.path.parent):
                fd, _ = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.path.parent} was removed after this Checkpointer "
                                    "created it; open a new Checkpointer to write there again") from None
        except ValueError:
            raise ForeignEntryError(f"{self.path}, the name of ckpt's lock, holds {describe(self.path)}, not the "
                                    "lock file: ckpt never writes through it. Move it away.", path=self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self.path.read_text().strip() or "unknown"
                if holder == f"pid {os.getpid()}":
                    holder += ", this process: one not closed, still referenced or still saving"
                raise DirectoryLockedError(
                    f"{self.path.parent} is being written by another Checkpointer ({holder}); one writer per "
                    "directory. Readers may still list and load; close the other writer or use another directory."
                ) from None
            raise
        try:
            with naming(self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}".encode())
        except OSError:  # (a full disk): the lock goes with the descriptor, so that a later save may take it
            os.close(fd)
            raise
        self._fd = fd
        DirectoryLock._held.add(self)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            DirectoryLock._held.discard(self)
            os.close(fd)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # A Checkpointer dropped unclosed (a notebook cell run again) lets its root go. os.close is bound at
        # definition: one a script's global holds is dropped at exit after this module's globals are cleared.
        if self._fd is not None:
            _close(self._fd)


os.register_at_fork(after_in_child=DirectoryLock._close_in_child)


def _chunk_shape(shape: tuple[int, ...], itemsize: int, target_bytes: int) -> list[int]:
    """Chunks split along the first axis so that each holds about ``target_bytes``."""
    if not shape:
        return []
    row_bytes = max(1, itemsize * math.prod(shape[1:]))
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


@functools.lru_cache(maxsize=None)
def zarr_stores(dtype: np.dtype) -> bool:
    """Whether zarr3 in tensorstore stores ``dtype`` (cached: ``dtype.name`` costs microseconds); other
    dtypes are stored as raw bytes."""
    try:
        ts.dtype(dtype.name)
        return dtype.kind in "biufc" or dtype.name.startswith(("bfloat", "float", "int", "uint"))
    except (TypeError, ValueError):
        return False


def open_for_write(spec: dict, *, background: bool = False, synced: bool = True) -> ts.Future:
    """Starts creating the array (or opening it, when another process of the job created it first);
    every chunk is stored, even all-zero ones, so that a missing chunk file means damage. For
    ``background`` and ``synced``, see :func:`ts_context`."""
    return ts.open({**spec, "store_data_equal_to_fill_value": True}, create=True, open=True,
                   context=ts_context(background, synced))


def open_for_read(spec: dict) -> ts.TensorStore:
    """Opens an array; reading a chunk whose file is missing raises instead of returning zeros."""
    return start_open_for_read(spec).result()


_DEFAULT_KEYS = {"name": "default", "configuration": {"separator": "/"}}  # chunk files at c/0/1, as a save writes


def start_open_for_read(spec: dict) -> ts.Future:
    """Starts :func:`open_for_read`; ``result()`` gives the array (any thread may ask). The chunk files
    are the ones a save writes (``c/0/1``), whatever the array's zarr.json says: a load checks those
    files (no link, no FIFO) before tensorstore reads them."""
    spec = {**spec, "metadata": {**spec["metadata"], "chunk_key_encoding": _DEFAULT_KEYS}}
    return ts.open({**spec, "fill_missing_data_reads": False}, open=True, context=ts_context())


def resolve_kvstore(spec: dict, step_dir: Location) -> dict:
    """A manifest's array spec with its relative kvstore path made absolute under ``step_dir``.

    Only a zarr3 spec whose kvstore is the ``file`` driver with a relative path of plain names
    (``arrays/3/``) is accepted; an absolute path, ``..``, another driver or any other option raises
    ValueError, so that a manifest can never point outside its step directory.
    """
    return {**spec, "kvstore": kvstore(step_dir / relative_path(spec))}


def local_array_dir(spec: dict, step_dir: Path) -> str:
    """The directory of a manifest's array in a local step (checked as :func:`resolve_kvstore` does),
    as a string: a load joins a chunk's name to it for every chunk."""
    return os.path.join(step_dir, relative_path(spec))


def relative_path(spec: dict) -> str:
    """The relative path of a manifest's array inside its step (``arrays/3``); ValueError unless it is
    a zarr3 spec on the ``file`` driver with a path of plain names."""
    kv = spec.get("kvstore") if isinstance(spec, dict) else None
    path = kv.get("path") if isinstance(kv, dict) else None
    if not (isinstance(path, str) and set(spec) <= {"driver", "kvstore", "metadata"} and spec.get("driver") == "zarr3"
            and set(kv) == {"driver", "path"} and kv["driver"] == "file" and is_plain_relative(path)):
        where = {k: spec[k] for k in ("driver", "kvstore") if k in spec} if isinstance(spec, dict) else spec
        raise ValueError(f"the array location {where!r} is not a relative path inside the step directory "
                         "(only the 'file' driver and plain names are allowed)")
    return path.removesuffix("/")


def kvstore(path: Location) -> dict:
    """The tensorstore kvstore spec of a directory."""
    if isinstance(path, ObjectPath):
        return path.kvstore()
    return {"driver": "file", "path": str(path) + "/"}


def temporary_for(final: Location) -> Location:
    """Where a step is written before its commit: ``<step>.ckpt-tmp`` locally, the final place on an
    object store (which has no rename; its manifest, written last, commits it)."""
    return final if isinstance(final, ObjectPath) else final.with_name(final.name + fmt.TMP_SUFFIX)


def commit_dir(tmp: Location, final: Location, *, replace: bool, over_empty: bool = False) -> None:
    """Makes a fully written step visible: fsyncs the temporary tree, renames it to its final name
    and fsyncs the root. ``replace``: ``final`` is a committed step the caller has just checked (see
    :func:`ckpt.root.commit`), moved aside only now and removed after; ``over_empty``: ``final`` was an
    empty directory, replaced only while it still is (the rename itself checks); else ``final`` must still
    be absent, and whatever took the name meanwhile is never replaced.

    Raises:
      ForeignEntryError: without ``replace``, something appeared at ``final`` while the step was written
        (or, ``over_empty``, the empty directory was filled, or is a mount point).
    """
    if isinstance(final, ObjectPath):
        return
    fsync_all([Path(dirpath) for dirpath, _, _ in os.walk(tmp)])
    if over_empty:
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno == errno.EBUSY:  # (a bind mount of the file system itself, which os.path.ismount misses)
                raise ForeignEntryError(f"cannot save the checkpoint to {final}: it is a mount point, which a save "
                                        "cannot replace; the checkpoint was not committed. Save into a directory "
                                        "in it.", path=final) from None
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise ForeignEntryError(f"{final} was filled while the checkpoint was written (it holds "
                                    f"{describe(final)}): ckpt never replaces what it did not check, so the "
                                    "checkpoint was not committed", path=final) from None
        fsync_path(final.parent)
        return
    if not (replace and os.path.lexists(final)):
        try:
            rename_noreplace(tmp, final)
        except FileExistsError:
            raise ForeignEntryError(f"{final} appeared while the step was written (it holds {describe(final)}): "
                                    "ckpt never replaces what it did not check, so the step was not committed",
                                    path=final) from None
        _fsync_root(final)
        return
    if not is_marked(final):
        mark(final, durable=True)  # the committed step it replaces goes below
    if rename_exchange(tmp, final):  # no moment without the step, even on a crash
        _fsync_root(final)
        _remove_replaced(tmp)  # the replaced step, now under the temporary name
        return
    old = final.with_name(final.name + fmt.REPLACED_SUFFIX)  # (see set_aside_step: a crash between the renames)
    remove_owned(old)  # one an earlier such crash left, its step put back or replaced since
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):  # the step back at its name (else its root's next writer puts it back)
            rename_noreplace(old, final)
        raise
    _fsync_root(final)
    _remove_replaced(old, set_aside=True)


def _fsync_root(final: Path) -> None:
    """fsyncs the root of a step just renamed into place as ``final``.

    Raises:
      OSError: the fsync failed (its errno, naming the root), saying that the step is in place all the same.
    """
    try:
        fsync_path(final.parent)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: the fsync of the root failed after the step was renamed into place "
                      f"as {final}, so it may not survive a power loss. The save raises this, but the step is in place: "
                      "the Checkpointers opened on the root from now on list it (save it again with overwrite=True "
                      "to make it durable)", e.filename) from e


def set_aside_step(path: Location) -> Path | None:
    """The name of the step that ``path``, a ``<step>.ckpt-replaced`` directory, must be put back as: a
    commit with ``overwrite=True`` on a file system that cannot swap two directories atomically (NFS, many
    FUSE file systems) renames the committed step aside, then the new one into its name; a crash between
    the two renames leaves the step under its aside name, and nothing under its own (marked as ckpt's: the
    commit marks it before it sets it aside). None for anything else (a name that holds something, which
    then replaced it, or another entry: an empty directory of the user's named so is never renamed)."""
    if not (isinstance(path, Path) and path.name.endswith(fmt.REPLACED_SUFFIX) and is_marked(path)):
        return None
    final = path.with_name(path.name[: -len(fmt.REPLACED_SUFFIX)])
    return None if os.path.lexists(final) else final


def put_back(path: Path, final: Path) -> None:
    """Renames a step set aside (see :func:`set_aside_step`) back to its name ``final``, durably.

    Raises:
      FileExistsError: something took ``final`` meanwhile (nothing is renamed).
    """
    rename_noreplace(path, final)
    fsync_path(final.parent)
    logger.warning("ckpt: put back %s, the step as committed before a save with overwrite=True that a crash "
                   "interrupted while it replaced it (it had been set aside as %s)", final, path.name)


def _remove_replaced(step_dir: Path, *, set_aside: bool = False) -> None:
    """Removes the step a commit replaced, renamed to ``step_dir``. The new step is committed by then, so a
    failure here does not fail its save: it is logged, and what is left (marked as ckpt's, never listed)
    is removed by the next save of the step or the next writer of the root. ``set_aside``: ``step_dir`` bears
    the name of a step set aside (see :func:`set_aside_step`), so it is deleted as a step is (:func:`delete_dir`:
    renamed to a deletion's name first): what a failed removal leaves is never put back as the step once the
    new one is deleted."""
    try:
        if set_aside:
            delete_dir(step_dir)
        else:
            remove_owned(step_dir)
    except OSError as e:
        logger.warning("ckpt: the step was committed, but the one it replaced could not be removed from %s: %s",
                       step_dir, e)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2's flags (linux/fs.h)


def rename_exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the system
    or the file system cannot, and the caller falls back to two renames."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(a: Path, b: Path) -> None:
    """Renames ``a`` to ``b`` only if nothing is at ``b``: atomically (``renameat2`` with
    ``RENAME_NOREPLACE``), or where the system or the file system cannot, after checking.

    Raises:
      FileExistsError: something is at ``b`` (nothing is renamed).
    """
    if not _renameat2(a, b, _RENAME_NOREPLACE):
        if os.path.lexists(b):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(a), None, str(b))
        os.rename(a, b)


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def delete_dir(step_dir: Location) -> None:
    """Deletes a committed step (the caller has checked that it is one) so that no half-deleted step is
    ever listed: marked as ckpt's, then locally renamed aside (and the root fsync'd), on an object store
    its manifest removed first. The step is deleted from then on: a failure to remove what is left (a
    file another client of an NFS server holds open) is logged, and the root's next writer removes it."""
    if isinstance(step_dir, Path) and not stat.S_ISDIR(os.lstat(step_dir).st_mode):
        raise _foreign(step_dir)  # a symbolic link is never followed to delete what it points at
    if not is_marked(step_dir):  # a step an earlier ckpt wrote
        mark(step_dir, durable=True)
    if isinstance(step_dir, ObjectPath):
        (step_dir / fmt.MANIFEST).unlink()
    else:
        doomed = _aside(step_dir)
        os.rename(step_dir, doomed)
        fsync_path(step_dir.parent)
        step_dir = doomed
    try:
        remove_owned(step_dir)
    except OSError as e:
        logger.warning("ckpt: the step was deleted, but what is left of it in %s could not be removed (the root's "
                       "next writer removes it): %s", step_dir, e)


def remove_deletion_leftover(step_dir: Path) -> bool:
    """Removes what a deletion of ``step_dir`` that a crash cut short left (``<name>.ckpt-deleting``, marked as
    ckpt's: the step was deleted once it was renamed there). Returns whether that name is free now: False
    when something ckpt did not make holds it, which is left alone, or when it cannot be removed yet (a file
    an NFS client holds open), or when the name is longer than a file name may be."""
    try:
        remove_owned(step_dir.with_name(step_dir.name + fmt.DELETING_SUFFIX))
    except OSError:  # (ForeignEntryError and ENAMETOOLONG included)
        return False
    return True


def remove_replaced_leftover(step_dir: Path) -> None:
    """Deletes ``<name>.ckpt-replaced`` beside ``step_dir``, a checkpoint: the one a commit with ``overwrite=True``
    set aside and a crash left there once ``step_dir`` had replaced it (see :func:`commit_dir`). Left there, it
    would be taken for ``step_dir`` set aside (:func:`set_aside_step`) once ``step_dir`` is deleted. What is not
    ckpt's is left alone; a failure is logged."""
    aside = step_dir.with_name(step_dir.name + fmt.REPLACED_SUFFIX)
    if os.path.lexists(step_dir) and is_marked(aside):
        _remove_replaced(aside, set_aside=True)


def _aside(step_dir: Path) -> Path:
    """The name a step is renamed to before it is removed: ``<name>.ckpt-deleting``, once what a crashed
    deletion left there is removed (see :func:`remove_deletion_leftover`); else a name of its own
    (``<name>.<random>.ckpt-deleting``), which the root's next writer removes; or when that name is longer than
    a file name may be (a step's name of 242 bytes or more), the start of the step's name."""
    doomed = step_dir.with_name(step_dir.name + fmt.DELETING_SUFFIX)
    if not remove_deletion_leftover(step_dir):
        own = f".{secrets.token_hex(4)}{fmt.DELETING_SUFFIX}"
        start = step_dir.name
        while len(os.fsencode(start + own)) > _NAME_MAX:  # (whole characters: a cut 'é' is no UTF-8)
            start = start[:-1]
        doomed = step_dir.with_name(start + own)
    return doomed


_NAME_MAX = 255  # the bytes of the longest file name (of a directory entry) that Linux's file systems take


def is_plain_relative(path: str) -> bool:
    """Whether ``path`` is a relative path of plain names (``a/b.c/``), which stays inside the directory it
    is joined to: no empty, ``.`` or ``..`` component, no backslash, no NUL."""
    return all(part not in ("", ".", "..") and "\\" not in part and "\0" not in part
               for part in path.removesuffix("/").split("/"))


@contextlib.contextmanager
def io_errors(what: str) -> Iterator[None]:
    """Re-raises tensorstore's errors as OSErrors that name ``what``, with the errno of the system call
    that failed when tensorstore reports one (so disk full is ``errno.ENOSPC``, permissions a PermissionError);
    an object store's refusal is a PermissionError too (see :func:`ckpt.objectstore.access_error`)."""
    try:
        yield
    except ValueError as e:
        code = re.search(r"\[os_error_code='(\d+)'\]", str(e))
        if code:
            raise OSError(int(code.group(1)), f"{what}: {e}") from e
        raise access_error(e, what) or OSError(f"{what}: {e}") from e


def list_names(root: Location) -> list[str]:
    if isinstance(root, ObjectPath):
        return root.children()
    try:
        return os.listdir(root)
    except FileNotFoundError:
        return []


def read_json_bytes(path: Location | str, limit: int = fmt.MANIFEST_MAX_BYTES, *, parsed: bool = True) -> bytes:
    """The bytes of a small file (JSON) of at most ``limit`` bytes.

    A local file is opened as :func:`open_regular` does (never through a link, never a FIFO or a
    device), so that no file in a checkpoint can make a reader wait forever, read without end or read
    outside the directory. Raises ValueError for such a file or a larger one, FileNotFoundError when
    it is missing, and (``parsed``: JSON that the caller decodes) for JSON whose values may take more
    memory decoded than this process may still allocate (see :func:`json_room_short`).
    """
    if isinstance(path, ObjectPath):
        data = path.read_bytes(limit)
        size = len(data)
    else:
        fd, size = open_regular(str(path))
        try:
            # one more than the limit: a file that grew past it is refused too
            data = b"" if size > limit else _read_up_to(fd, limit + 1, size + 1)
        finally:
            os.close(fd)
    if max(size, len(data)) > limit:
        raise ValueError(f"{path} has more than the {limit} bytes a reader accepts")
    if parsed and (refusal := json_room_short(data)) is not None:
        raise ValueError(f"{path} {refusal}")
    return data


def json_room_short(data: bytes | str) -> str | None:
    """Why the JSON ``data`` may take more memory decoded than this process may still allocate (the words after a
    file's name), else None: JSON that may be decoded. Bounded by its size alone (:data:`JSON_DECODED_BYTES` a byte),
    and where that is more than is left, by the values and keys it holds (each follows one of ``{[,:``, which are
    counted: a text's bytes count too), so that a genuine file of long key names (3 bytes decoded a byte) is not
    refused in a container with little memory left."""
    if len(data) <= _JSON_CHECKED_FROM or len(data) * JSON_DECODED_BYTES <= (room := host_memory.allocatable()):
        return None
    marks = (b"{", b"[", b",", b":") if isinstance(data, bytes) else ("{", "[", ",", ":")
    values = sum(map(data.count, marks))
    need = len(data) * _JSON_TEXT_BYTES + values * _JSON_VALUE_BYTES
    if need <= room:
        return None
    return (f"holds {len(data)} bytes of JSON, whose values and keys (up to {values}) may take {need} bytes "
            f"decoded, more than this process may still allocate ({room} bytes)")


# The most memory a byte of JSON takes decoded: 44 bytes for '[{"":{}},' (a dict of a dict) read by orjson, 33 by
# json; a sound tree.json takes 21 (orjson; json 11), one of long key names 3. A hostile tree.json of the 256 MiB a
# reader accepts would take 11 GiB, more than a machine may have: the load was killed, or raised a bare MemoryError
# (SystemError from orjson)
JSON_DECODED_BYTES = 48
# Counted by what a file holds: a byte of text takes at most 7 decoded (json, a text with a character past U+FFFF),
# and each value or key at most 65 more (orjson: a dict of a dict, [[[[[]]]]], a short text in a list)
_JSON_TEXT_BYTES, _JSON_VALUE_BYTES = 8, 96
_JSON_CHECKED_FROM = 1 << 20  # (smaller files take 48 MiB at most: every manifest of a listing is not checked)


def _read_up_to(fd: int, limit: int, first: int) -> bytes:
    """At most ``limit`` bytes of ``fd``: ``first`` bytes (the file's size and one more, to see its end), then
    64 KiB at a time. (``os.read(fd, n)`` allocates ``n`` bytes first: asking for ``limit`` made each small
    file a memory mapping of its own, which cost ~30 us a file.)"""
    parts, total, piece = [], 0, first
    while total < limit:
        part = os.read(fd, min(limit - total, piece))
        if not part:
            break
        parts.append(part)
        total, piece = total + len(part), 1 << 16
    return b"".join(parts)


def open_regular(path: str | Path, flags: int = os.O_RDONLY) -> tuple[int, int]:
    """Opens a regular file (for reading; ``flags`` may ask for more, such as ``os.O_RDWR | os.O_CREAT``),
    never through a symbolic link and without waiting on a FIFO; returns the descriptor and the file's
    size. ValueError for a link, a directory, a FIFO, a socket or a device (the message names the file,
    never a link's target); FileNotFoundError when missing."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a link (O_NOFOLLOW), a socket
            raise ValueError(f"{path} is {'a symbolic link' if e.errno == errno.ELOOP else 'not a regular file'}; "
                             "ckpt reads only regular files inside a checkpoint") from None
        raise
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        os.close(fd)
        raise ValueError(f"{path} is {_kind(found.st_mode)}, not a regular file; ckpt reads only regular files "
                         "inside a checkpoint")
    return fd, found.st_size


def may_not_read(path: Location) -> bool:
    """Whether ``path`` is a local file this process may not open (another user's, or in a directory this process may
    not enter): its owner reads it, so that is no sign of damage. False for anything else, a missing file included."""
    if not isinstance(path, Path):
        return False
    try:
        os.close(open_regular(path)[0])
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return False


def regular_files(directory: Path) -> list[Path]:
    """The regular files below ``directory``, sorted, found without following any link. ValueError naming
    the first entry that is neither a regular file nor a directory: a symbolic link (what it leads to lies
    elsewhere), a FIFO (a read would wait on it), a socket or a device."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                found.append(path)
            elif not stat.S_ISDIR(mode):
                raise ValueError(f"{path} is {describe(path)}")
    return sorted(found)


def _kind(mode: int) -> str:
    for test, name in [(stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")]:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a file"


class LocalFiles:
    """The files below one local directory (a step), looked at without following any link.

    :meth:`size` gives a file's size before anything is allocated for its bytes; each directory on the
    way is checked once (``lstat``), each file once, so a link anywhere below the step (``arrays/0``
    pointing at another directory, a chunk pointing at ``/etc/passwd``), a FIFO or a device is refused
    without being read.

    Example::

        files = LocalFiles("runs/exp1/100")
        files.size("runs/exp1/100/arrays/0/c/0")      # ValueError if arrays/0 is a link
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        self._dirs: set[str] = set()

    def size(self, path: str) -> int:
        """The size of the regular file ``path`` (below the root). ValueError when it, or a directory
        between the root and it, is a link or not what it should be; FileNotFoundError when missing."""
        start = len(self.root) + 1
        end = path.find("/", start)
        while end != -1:
            directory = path[:end]
            if directory not in self._dirs:
                mode = os.lstat(directory).st_mode
                if not stat.S_ISDIR(mode):
                    raise ValueError(f"{directory} is {_kind(mode)}, not a directory; ckpt reads only regular "
                                     "files inside a checkpoint")
                self._dirs.add(directory)
            end = path.find("/", end + 1)
        found = os.lstat(path)
        if not stat.S_ISREG(found.st_mode):
            raise ValueError(f"{path} is {_kind(found.st_mode)}, not a regular file; ckpt reads only regular files "
                             "inside a checkpoint")
        return found.st_size
