"""File-system helpers for the reliability tests: what a directory holds, a small tmpfs, and a step's
tree.json rewritten."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ckpt import format as fmt
from ckpt.leaf_table import LeafTable
from ckpt.objectstore import ObjectPath


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below ``root`` (relative path -> "dir", the file's sha256, "link -> target" or "special"),
    to show that nothing changed. Symbolic links are not followed and special files (FIFOs) not read."""
    if not root.exists():
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            out[str(path.relative_to(root))] = (
                f"link -> {os.readlink(path)}" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                else hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode) else "special")
    return dict(sorted(out.items()))


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str = "2m", inodes: int | None = None) -> Iterator[Path]:
    """Mounts a tmpfs of ``size`` (and of at most ``inodes`` files and directories) at ``mount_point`` (skips
    the test when mounting is not permitted)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" if inodes is None else f"size={size},nr_inodes={inodes}"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmount(mount_point)


@contextlib.contextmanager
def shared_directory() -> Iterator[Path]:
    """A new directory that every user may enter (tmp_path's parents only root may: see :func:`without_root`),
    removed afterwards with whatever a test made unreadable in it."""
    base = Path(tempfile.mkdtemp(prefix="ckpt-shared-"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False, capture_output=True, timeout=30)
        shutil.rmtree(base)


@contextlib.contextmanager
def without_root() -> Iterator[None]:
    """Runs the block with the effective uid and gid of ``nobody`` when the test runs as root (root ignores
    permission bits); glibc switches every thread, tensorstore's included. Restored in any case."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """Makes ``directory`` read-only with a read-only bind mount over it (skips when not permitted)."""
    result = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True, text=True,
                            timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot bind-mount (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True, capture_output=True, timeout=30)
        yield directory
    finally:
        unmount(directory)


def undeletable(path: Path) -> Callable[[], None]:
    """Makes ``path`` impossible to rename or remove, and a directory's entries too (chattr +i; skips the
    test without root or where the file system has no such flag); returns what undoes it."""
    if os.geteuid() != 0:
        pytest.skip("needs root for chattr +i")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def unmount(mount_point: Path) -> None:
    """Unmounts, lazily when something still holds a file there (the test has failed by then)."""
    if subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill(directory: Path, leave_bytes: int) -> None:
    """Fills the file system of ``directory`` with one file, leaving about ``leave_bytes`` free."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(directory / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave_bytes))


def fill_inodes(directory: Path, leave: int) -> None:
    """Takes every free inode of the file system of ``directory`` but ``leave``, with empty files in its new
    directory ``inodes``."""
    taken = directory / "inodes"
    taken.mkdir()
    for i in range(os.statvfs(directory).f_favail - leave):
        (taken / str(i)).touch()


def flip(path: Path | ObjectPath, offset: int | None = None) -> None:
    """Flips one bit of a file (or object): the byte at ``offset``, else the middle one."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def tree_doc(step_dir: Path | ObjectPath) -> dict:
    """A step's tree.json, each checkpointable's leaf table given as one entry (a dict) per leaf."""
    doc = json.loads((step_dir / fmt.TREE).read_bytes())
    for tree in doc["checkpointables"].values():
        if isinstance(tree["leaves"], dict):  # (format version 1 holds a list of entries)
            tree["leaves"] = list(LeafTable(tree["leaves"]))
    return doc


def rewrite_tree(step_dir: Path | ObjectPath, mutate: Callable[[dict], None]) -> None:
    """Changes a step's tree.json (``mutate`` gets it as :func:`tree_doc` gives it, one entry per leaf;
    a list of entries left in it is written back as a table) and makes every checksum agree again, as a
    deliberate forger would."""
    doc = tree_doc(step_dir)
    mutate(doc)
    for tree in doc["checkpointables"].values() if isinstance(doc.get("checkpointables"), dict) else ():
        leaves = tree.get("leaves") if isinstance(tree, dict) else None
        if isinstance(leaves, list) and all(isinstance(entry, dict) for entry in leaves):
            tree["leaves"] = LeafTable.of_entries(leaves).columns()
    write_tree(step_dir, json.dumps(doc).encode())


def as_version_1(step_dir: Path | ObjectPath) -> None:
    """Rewrites a step as format version 1 wrote it: each leaf table a list of one entry per leaf."""
    write_tree(step_dir, json.dumps(tree_doc(step_dir)).encode())
    rewrite_manifest(step_dir, lambda manifest: manifest.update(version=1))


def write_tree(step_dir: Path | ObjectPath, data: bytes) -> None:
    """Replaces a step's tree.json with ``data`` (any bytes) and reseals the manifest over it."""
    (step_dir / fmt.TREE).write_bytes(data)
    rewrite_manifest(step_dir, lambda manifest: manifest.update(tree_crc32=fmt.crc32(data)))


def rewrite_manifest(step_dir: Path | ObjectPath, mutate: Callable[[dict], None]) -> None:
    """Changes a step's manifest (into any JSON, NaN included) and reseals it with its own CRC32."""
    raw = (step_dir / fmt.MANIFEST).read_bytes()
    manifest = json.loads(raw[: raw.rindex(b',"manifest_crc32"')] + b"}")
    mutate(manifest)
    seal_manifest(step_dir, json.dumps(manifest, separators=(",", ":")).encode())


def seal_manifest(step_dir: Path | ObjectPath, body: bytes) -> None:
    """Writes ``body`` (the bytes of a JSON object, or anything ending in ``}``) as the step's manifest,
    sealed with the CRC32 member a save adds (see ``ckpt.format.sealed_manifest``)."""
    crc = str(fmt.crc32(body)).encode()
    (step_dir / fmt.MANIFEST).write_bytes(body[:-1] + b',"manifest_crc32":' + crc + b"}")


def without_word_sums(tree: dict) -> None:
    """tree.json as an earlier ckpt wrote it: CRC32s only, no ``chunk_sum64``."""
    tree.get("packed", {}).pop("chunk_sum64", None)
    for leaf in tree["checkpointables"]["state"]["leaves"]:
        leaf.pop("chunk_sum64", None)
