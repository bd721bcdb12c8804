"""Hostile step directories: every reader refuses them clearly, never hangs, never reads outside the step.

A checkpoint is input. Each case below is a real step directory forged as an attacker would, every
checksum recomputed so that it passes, beside a sound step, next to files outside the root that hold
SENTINEL bytes. Each case runs every entry point (``ckpt.load``, opening a Checkpointer,
``Checkpointer.load``, ``ckpt.metadata``, ``ckpt ls``, ``ckpt show``, ``ckpt verify``) in a child
forked from a clean interpreter (tensorstore aborts in a fork of a process that used it), under a
memory cap (RLIMIT_AS) and a time limit; the child reports each outcome as JSON. The test asserts
that each reader that reads the damage fails with a ckpt error naming the step and the file, that
no byte of a file outside the step is returned or printed and no outside size disclosed, and that
``verify`` fails exactly when ``load`` does.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import shutil
import socket
import stat
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest

import ckpt
from ckpt import chunks, cli, storage
from ckpt import format as fmt
from ckpt.training import Checkpointer
from ckpt.verify import verify_step
from tests import procs
from tests.fsutil import rewrite_manifest, rewrite_tree, seal_manifest, write_tree

SENTINEL = b"OUTSIDE-THE-STEP"  # the content of every file outside the step a case points at
ODD_SIZE = 777_773              # the size of an outside file: no message may disclose it
MEMORY_CAP = 3 << 30            # RLIMIT_AS of each child (a clean child maps about 0.2 GiB)
CASE_TIMEOUT_SECS = 60          # a guard against hangs, far above a case's usual second
STATE = {"big": np.arange(140_000, dtype=np.float64), "s": np.arange(3.0), "t": np.arange(5), "n": 7}
BIG_CHUNK = "arrays/0/c/0"      # the one chunk of STATE["big"]
PACKED_CHUNK = "packed/c/0"     # the one chunk of the packed leaves s and t


class Case(NamedTuple):
    """A forgery of step 1 and what it reaches: ``level`` is "manifest", "tree", "data" (a file that
    only reading the arrays touches) or "zarr" (a zarr.json, which only ``verify`` reads: loads
    follow tree.json); ``file`` is the file, relative to the step, every error must name."""

    make: Callable[[Path, Path], None]  # (step directory, a directory outside the root)
    level: str
    file: str


# ------------------------------------------------------------------------------------- forging
def leaf(tree: dict, path: str = "['big']") -> dict:
    return next(m for m in tree["checkpointables"]["state"]["leaves"] if m["path"] == path)


def in_tree(mutate: Callable[[dict], Any]) -> Callable[[Path, Path], None]:
    return lambda step, outside: rewrite_tree(step, mutate)


def in_manifest(mutate: Callable[[dict], Any]) -> Callable[[Path, Path], None]:
    return lambda step, outside: rewrite_manifest(step, mutate)


def sentinel_bytes(n: int) -> bytes:
    return (SENTINEL * (n // len(SENTINEL) + 1))[:n]


def plant_big(step: Path) -> None:
    """Fills the big leaf's chunk file (wherever its links lead) with SENTINEL and reseals its checksums."""
    path = Path(os.path.realpath(step / BIG_CHUNK))
    data = sentinel_bytes(path.stat().st_size)
    path.write_bytes(data)
    rewrite_tree(step, lambda t: leaf(t).update(chunk_crc32=[zlib.crc32(data)],
                                                chunk_sum64=[chunks.sum64(np.frombuffer(data, np.uint8))]))


def plant_packed(step: Path) -> None:
    """Fills the packed chunk file (wherever its links lead) with SENTINEL and reseals every checksum over it."""
    path = Path(os.path.realpath(step / PACKED_CHUNK))
    data = sentinel_bytes(path.stat().st_size)
    path.write_bytes(data)

    def reseal(tree: dict) -> None:
        tree["packed"]["chunk_sum64"] = [chunks.sum64(np.frombuffer(data, np.uint8))]
        for meta in tree["checkpointables"]["state"]["leaves"]:
            if "packed" in meta:
                offset, nbytes = meta["packed"]
                meta["crc32"] = zlib.crc32(data[offset: offset + nbytes])

    rewrite_tree(step, reseal)


def moved_outside(rel: str, plant: Callable[[Path], None] | None) -> Callable[[Path, Path], None]:
    """``rel`` (a file or directory of the step) moved outside the root, a link left in its place, and
    SENTINEL planted in the data it leads to (checksums resealed), so that following it returns SENTINEL."""
    def make(step: Path, outside: Path) -> None:
        target = outside / rel.replace("/", "_")
        shutil.move(step / rel, target)
        os.symlink(target, step / rel)
        if plant:
            plant(step)
    return make


def link_to(target: str | None) -> Callable[[str], Callable[[Path, Path], None]]:
    """A file of the step replaced by a link to ``target`` (None: a file of ODD_SIZE outside the root)."""
    def for_file(rel: str) -> Callable[[Path, Path], None]:
        def make(step: Path, outside: Path) -> None:
            path = target or outside / "odd"
            if target is None:
                Path(path).write_bytes(sentinel_bytes(ODD_SIZE))
            (step / rel).unlink()
            os.symlink(path, step / rel)
        return make
    return for_file


def fifo(rel: str) -> Callable[[Path, Path], None]:
    def make(step: Path, outside: Path) -> None:
        (step / rel).unlink()
        os.mkfifo(step / rel)
    return make


def device(rel: str) -> Callable[[Path, Path], None]:
    def make(step: Path, outside: Path) -> None:
        (step / rel).unlink()
        try:
            os.mknod(step / rel, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is
        except PermissionError:
            pytest.skip("making a device file needs CAP_MKNOD")
    return make


def unix_socket(rel: str) -> Callable[[Path, Path], None]:
    def make(step: Path, outside: Path) -> None:
        (step / rel).unlink()
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(step / rel))
    return make


def directory(rel: str) -> Callable[[Path, Path], None]:
    def make(step: Path, outside: Path) -> None:
        (step / rel).unlink()
        (step / rel).mkdir()
    return make


def sparse(rel: str, size: int) -> Callable[[Path, Path], None]:
    """A file of ``size`` bytes (sparse: nothing is written) in place of ``rel``."""
    def make(step: Path, outside: Path) -> None:
        with open(step / rel, "r+b") as f:
            f.truncate(size)
    return make


def outside_manifest(step: Path, outside: Path) -> None:
    """manifest.json a link to a sealed manifest outside whose metrics hold SENTINEL."""
    shutil.copy(step / fmt.MANIFEST, outside / fmt.MANIFEST)
    rewrite_manifest(outside, lambda m: m.update(metrics={"secret": SENTINEL.decode()}))
    (step / fmt.MANIFEST).unlink()
    os.symlink(outside / fmt.MANIFEST, step / fmt.MANIFEST)


def outside_tree(step: Path, outside: Path) -> None:
    """tree.json a link to a tree outside (the manifest resealed over it) whose inline leaf is SENTINEL."""
    rewrite_tree(step, lambda tree: leaf(tree, "['n']").update(type="str", value=SENTINEL.decode()))
    shutil.move(step / fmt.TREE, outside / fmt.TREE)
    os.symlink(outside / fmt.TREE, step / fmt.TREE)


def raw_tree(edit: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    return lambda step, outside: write_tree(step, changed(edit, (step / fmt.TREE).read_bytes()))


def raw_manifest(edit: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def make(step: Path, outside: Path) -> None:
        raw = (step / fmt.MANIFEST).read_bytes()
        seal_manifest(step, changed(edit, raw[: raw.rindex(b',"manifest_crc32"')] + b"}"))
    return make


def changed(edit: Callable[[bytes], bytes], raw: bytes) -> bytes:
    out = edit(raw)
    assert out != raw, "the forgery changed nothing"
    return out


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def deep_tree(raw: bytes) -> bytes:
    return raw.replace(b'{"t":"leaf"}', b'{"t":"list","c":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 1)


def deep_nodes(raw: bytes) -> bytes:
    return raw.replace(b'{"t":"leaf"}', b'{"t":"list","c":[' * 505 + b'{"t":"leaf"}' + b']}' * 505, 1)


def huge_big_leaf(tree: dict) -> None:
    """The big leaf declares 2**40 float64 in one chunk, every field consistent: only its file's size
    tells that the bytes are not there."""
    meta = leaf(tree)
    meta["shape"] = meta["array"]["metadata"]["shape"] = [1 << 40]
    meta["array"]["metadata"]["chunk_grid"]["configuration"]["chunk_shape"] = [1 << 40]


def huge_packed_leaf(tree: dict) -> None:
    """A packed leaf declares 2**40 float64 and the packed array grows to hold it (no chunk sums, as
    an older save wrote): the chunk files that would hold it are not there."""
    meta = leaf(tree, "['t']")
    meta.update(dtype="float64", shape=[1 << 40], packed=[64, 8 << 40])
    packed = tree["packed"]
    packed.pop("chunk_sum64")
    packed["nbytes"] = packed["spec"]["metadata"]["shape"][0] = 64 + (8 << 40)


def packed_at(offset: int) -> Callable[[dict], None]:
    return lambda tree: leaf(tree, "['s']").update(packed=[offset, 24])


def packed_nbytes(nbytes: int) -> Callable[[dict], None]:
    def mutate(tree: dict) -> None:
        tree["packed"]["nbytes"] = tree["packed"]["spec"]["metadata"]["shape"][0] = nbytes
    return mutate


def small_dtype(dtype: str) -> Callable[[dict], None]:
    return lambda tree: leaf(tree, "['s']").update(dtype=dtype)


def by_processes(then: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """The big leaf rewritten as an array written by several processes (4 chunks with the crc32c codec,
    which tensorstore reads and checks; no chunk checksums in tree.json), then forged by ``then``."""
    def make(step: Path, outside: Path) -> None:
        def rewrite(tree: dict) -> None:
            meta = leaf(tree)
            spec = storage.array_spec({"driver": "file", "path": "arrays/0/"}, np.dtype(np.float64), (140_000,),
                                      fmt.ARRAY_CHUNK_BYTES, checksum=True, chunk_shape=(35_000,))
            shutil.rmtree(step / "arrays/0")
            storage.open_for_write(storage.resolve_kvstore(spec, step)).result().write(STATE["big"]).result()
            meta.pop("chunk_crc32"), meta.pop("chunk_sum64")
            meta.update(array=spec, zarr_json_crc32=fmt.crc32((step / "arrays/0/zarr.json").read_bytes()))

        rewrite_tree(step, rewrite)
        then(step, outside)
    return make


def copied_outside(rel: str) -> Callable[[Path, Path], None]:
    """A file of the step copied outside the root (the very bytes: a reader that follows the link finds
    nothing wrong) and replaced by a link to the copy."""
    def make(step: Path, outside: Path) -> None:
        shutil.copy(step / rel, outside / "copy")
        (step / rel).unlink()
        os.symlink(outside / "copy", step / rel)
    return make


def a_grid_of_2_40_chunks(tree: dict) -> None:
    meta = leaf(tree)
    meta["shape"] = meta["array"]["metadata"]["shape"] = [1 << 20, 1 << 20]
    meta["array"]["metadata"]["chunk_grid"]["configuration"]["chunk_shape"] = [1, 1]


def other_key_encoding(step: Path, outside: Path) -> None:
    """The array's zarr.json (resealed in tree.json) names its chunks as zarr v2 does (``arrays/0/0``),
    the first of which is a FIFO: a reader that lets tensorstore follow zarr.json waits on it forever."""
    zarr_json = step / "arrays/0/zarr.json"
    metadata = json.loads(zarr_json.read_text())
    metadata["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}
    zarr_json.write_text(json.dumps(metadata))
    os.mkfifo(step / "arrays/0/0")
    for i in (1, 2, 3):
        os.link(step / f"arrays/0/c/{i}", step / f"arrays/0/{i}")
    rewrite_tree(step, lambda t: leaf(t).update(zarr_json_crc32=fmt.crc32(zarr_json.read_bytes())))


def an_empty_grid_of_2_40_rows(tree: dict) -> None:
    meta = leaf(tree)
    meta["shape"] = meta["array"]["metadata"]["shape"] = [1 << 40, 0]
    meta["array"]["metadata"]["chunk_grid"]["configuration"]["chunk_shape"] = [1, 1]


CASES: dict[str, Case] = {
    # Unbounded reads and hangs: only regular files are read, each up to a size known in advance.
    "manifest is /dev/zero": Case(link_to("/dev/zero")(fmt.MANIFEST), "manifest", fmt.MANIFEST),
    "tree.json is /dev/zero": Case(link_to("/dev/zero")(fmt.TREE), "tree", fmt.TREE),
    "chunk is /dev/zero": Case(link_to("/dev/zero")(BIG_CHUNK), "data", BIG_CHUNK),
    "packed chunk is /dev/zero": Case(link_to("/dev/zero")(PACKED_CHUNK), "data", PACKED_CHUNK),
    "zarr.json is /dev/zero": Case(link_to("/dev/zero")("arrays/0/zarr.json"), "zarr", "arrays/0/zarr.json"),
    "manifest is a FIFO": Case(fifo(fmt.MANIFEST), "manifest", fmt.MANIFEST),
    "tree.json is a FIFO": Case(fifo(fmt.TREE), "tree", fmt.TREE),
    "chunk is a FIFO": Case(fifo(BIG_CHUNK), "data", BIG_CHUNK),
    "packed chunk is a FIFO": Case(fifo(PACKED_CHUNK), "data", PACKED_CHUNK),
    "zarr.json is a FIFO": Case(fifo("arrays/0/zarr.json"), "zarr", "arrays/0/zarr.json"),
    "packed zarr.json is a FIFO": Case(fifo("packed/zarr.json"), "zarr", "packed/zarr.json"),
    "chunk is a device": Case(device(BIG_CHUNK), "data", BIG_CHUNK),
    "chunk is a socket": Case(unix_socket(BIG_CHUNK), "data", BIG_CHUNK),
    "chunk is a directory": Case(directory(BIG_CHUNK), "data", BIG_CHUNK),
    "manifest of 17 MiB": Case(sparse(fmt.MANIFEST, 17 << 20), "manifest", fmt.MANIFEST),
    "tree.json of 300 MiB": Case(sparse(fmt.TREE, 300 << 20), "tree", fmt.TREE),
    # Reads outside the step: no link inside a step is followed.
    "chunk links outside, resealed": Case(moved_outside(BIG_CHUNK, plant_big), "data", BIG_CHUNK),
    "array directory links outside, resealed": Case(moved_outside("arrays/0", plant_big), "data", "arrays/0"),
    "chunk directory links outside, resealed": Case(moved_outside("arrays/0/c", plant_big), "data", "arrays/0/c"),
    "arrays/ links outside, resealed": Case(moved_outside(fmt.ARRAYS, plant_big), "data", fmt.ARRAYS),
    "packed chunk links outside, resealed": Case(moved_outside(PACKED_CHUNK, plant_packed), "data", PACKED_CHUNK),
    "packed/ links outside, resealed": Case(moved_outside(fmt.PACKED, plant_packed), "data", fmt.PACKED),
    "chunk links to /etc/passwd": Case(link_to("/etc/passwd")(BIG_CHUNK), "data", BIG_CHUNK),
    "chunk links to a file of another size": Case(link_to(None)(BIG_CHUNK), "data", BIG_CHUNK),
    "zarr.json links outside": Case(moved_outside("arrays/0/zarr.json", None), "zarr", "arrays/0/zarr.json"),
    "manifest links outside": Case(outside_manifest, "manifest", fmt.MANIFEST),
    "tree.json links outside": Case(outside_tree, "tree", fmt.TREE),
    # Sizes declared, never checked: each checked against the others and against the files.
    "shape [2**40, 0] in chunks [1, 0]": Case(in_tree(lambda t: (
        leaf(t).update(shape=[1 << 40, 0]), leaf(t)["array"]["metadata"].update(shape=[1 << 40, 0], chunk_grid={
            "name": "regular", "configuration": {"chunk_shape": [1, 0]}}))), "tree", fmt.TREE),
    "2**40 elements in one chunk": Case(in_tree(huge_big_leaf), "data", BIG_CHUNK),
    "packed leaf of 2**40 elements": Case(in_tree(huge_packed_leaf), "data", "packed/"),
    "packed nbytes 2**62": Case(in_tree(packed_nbytes(1 << 62)), "tree", fmt.TREE),
    "packed offset negative": Case(in_tree(packed_at(-64)), "tree", fmt.TREE),
    "packed offset past the end": Case(in_tree(packed_at(1 << 40)), "tree", fmt.TREE),
    "packed offset 2**63 - 64": Case(in_tree(packed_at((1 << 63) - 64)), "tree", fmt.TREE),  # int64 wraps past it
    "packed offset 2**64": Case(in_tree(packed_at(1 << 64)), "tree", fmt.TREE),
    "packed nbytes 2**63": Case(in_tree(packed_nbytes(1 << 63)), "tree", fmt.TREE),
    "packed offset unaligned": Case(in_tree(packed_at(8)), "tree", fmt.TREE),
    "packed nbytes not the leaf's": Case(in_tree(lambda t: leaf(t, "['s']").update(packed=[0, 16])), "tree", fmt.TREE),
    "leaf shape is not its array's": Case(in_tree(lambda t: leaf(t).update(shape=[700, 200])), "tree", fmt.TREE),
    "array shape is not its leaf's": Case(in_tree(lambda t: leaf(t)["array"]["metadata"].update(shape=[70_000])),
                                          "tree", fmt.TREE),
    "chunk checksums missing": Case(in_tree(lambda t: leaf(t).update(chunk_crc32=[], chunk_sum64=[])), "tree", fmt.TREE),
    "a compressing codec": Case(in_tree(lambda t: leaf(t)["array"]["metadata"]["codecs"].append(
        {"name": "zstd", "configuration": {"level": 1}})), "tree", fmt.TREE),
    # Malformed JSON with valid checksums.
    "zero chunk size": Case(in_tree(lambda t: leaf(t)["array"]["metadata"]["chunk_grid"]["configuration"].update(
        chunk_shape=[0])), "tree", fmt.TREE),
    "float shape": Case(in_tree(lambda t: leaf(t, "['s']").update(shape=[3.0])), "tree", fmt.TREE),
    "dtype S0": Case(in_tree(small_dtype("S0")), "tree", fmt.TREE),
    "dtype U0": Case(in_tree(small_dtype("U0")), "tree", fmt.TREE),
    "structured dtype": Case(in_tree(small_dtype("[('a', '<i4'), ('b', '<i4')]")), "tree", fmt.TREE),
    "subarray dtype": Case(in_tree(small_dtype("(3,)<f8")), "tree", fmt.TREE),
    "dtype M8[ns]": Case(in_tree(small_dtype("M8[ns]")), "tree", fmt.TREE),
    "tree.json nested 100,000 deep": Case(raw_tree(deep_tree), "tree", fmt.TREE),
    "a tree of nodes nested 505 levels (past json's parser, within orjson's)": Case(raw_tree(deep_nodes), "tree", fmt.TREE),
    "metrics nested 100,000 deep": Case(raw_manifest(lambda b: b.replace(b'"metrics":null', b'"metrics":' + b"[" * 100_000
                                                                       + b"]" * 100_000)), "manifest", fmt.MANIFEST),
    "metrics nested deeper than a save writes": Case(in_manifest(lambda m: m.update(metrics=nested(80))),
                                                     "manifest", fmt.MANIFEST),
    "tree.json not UTF-8": Case(raw_tree(lambda b: b.replace(b'"numpy"', b'"nu\xffpy"', 1)), "tree", fmt.TREE),
    "manifest not UTF-8": Case(raw_manifest(lambda b: b.replace(b'"ckpt"', b'"ckpt\xc3"', 1)), "manifest", fmt.MANIFEST),
    "leaf without type": Case(in_tree(lambda t: leaf(t, "['s']").pop("type")), "tree", fmt.TREE),
    "leaf of an unknown type": Case(in_tree(lambda t: leaf(t, "['n']").update(type="pickle")), "tree", fmt.TREE),
    "inline value of another type": Case(in_tree(lambda t: leaf(t, "['n']").update(value="7")), "tree", fmt.TREE),
    "checkpointable without leaves": Case(in_tree(lambda t: t["checkpointables"]["state"].pop("leaves")), "tree", fmt.TREE),
    "fewer leaves than the tree": Case(in_tree(lambda t: t["checkpointables"]["state"]["leaves"].pop()), "tree", fmt.TREE),
    "a tree node of an unknown kind": Case(in_tree(lambda t: t["checkpointables"]["state"]["tree"].update(t="set")),
                                           "tree", fmt.TREE),
    "a key of an unknown kind": Case(in_tree(lambda t: t["checkpointables"]["state"]["tree"]["k"][0].__setitem__(
        0, "lambda")), "tree", fmt.TREE),
    "a key true": Case(in_tree(lambda t: t["checkpointables"]["state"]["tree"]["k"][0].__setitem__(1, True)),
                       "tree", fmt.TREE),
    "a key whose kind is a list": Case(in_tree(lambda t: t["checkpointables"]["state"]["tree"]["k"][0].__setitem__(
        0, ["key"])), "tree", fmt.TREE),
    "a dict's keys repeat a key": Case(in_tree(lambda t: t["checkpointables"]["state"]["tree"]["k"][1].__setitem__(
        1, t["checkpointables"]["state"]["tree"]["k"][0][1])), "tree", fmt.TREE),  # (a load dropped a leaf)
    "a key of three parts": Case(in_tree(lambda t: t["checkpointables"]["state"]["tree"]["k"][0].append("x")),
                                 "tree", fmt.TREE),
    "every key an index, of a string": Case(in_tree(lambda t: [key.__setitem__(0, "idx") for key in
                                                                t["checkpointables"]["state"]["tree"]["k"]]),
                                            "tree", fmt.TREE),
    "checkpointables not the manifest's": Case(in_tree(lambda t: t["checkpointables"].update(
        other=t["checkpointables"]["state"])), "tree", fmt.TREE),
    "packed dtype O": Case(in_tree(small_dtype("O")), "tree", fmt.TREE),
    "a torch leaf of text": Case(in_tree(lambda t: leaf(t, "['s']").update(type="torch", dtype="<U2")), "tree", fmt.TREE),
    "a jax leaf of bytes": Case(in_tree(lambda t: leaf(t, "['s']").update(type="jax", dtype="|S8")), "tree", fmt.TREE),
    "manifest without tree_crc32": Case(in_manifest(lambda m: m.pop("tree_crc32")), "manifest", fmt.MANIFEST),
    "version true": Case(in_manifest(lambda m: m.update(version=True)), "manifest", fmt.MANIFEST),
    "step -1 in the manifest": Case(in_manifest(lambda m: m.update(step=-1)), "manifest", fmt.MANIFEST),
    "timestamp 10**30": Case(in_manifest(lambda m: m.update(commit_timestamp_nsecs=10 ** 30)), "manifest", fmt.MANIFEST),
    # The same for an array written by several processes, which tensorstore reads.
    "several processes' chunk links outside": Case(by_processes(copied_outside("arrays/0/c/1")), "data", "arrays/0/c/1"),
    "several processes' chunk is a FIFO": Case(by_processes(fifo("arrays/0/c/1")), "data", "arrays/0/c/1"),
    "several processes' zarr.json links outside": Case(by_processes(copied_outside("arrays/0/zarr.json")), "data",
                                                      "arrays/0/zarr.json"),
    "several processes' array of 2**40 chunks": Case(by_processes(in_tree(a_grid_of_2_40_chunks)), "data",
                                                     "arrays/0/c/0"),
    "several processes' empty array of 2**40 rows in chunks of one": Case(
        by_processes(in_tree(an_empty_grid_of_2_40_rows)), "data", "arrays/0"),
    "several processes' zarr.json with zarr v2's chunk names, the first a FIFO": Case(
        by_processes(other_key_encoding), "data", "arrays/0"),
    "timestamp a string": Case(in_manifest(lambda m: m.update(commit_timestamp_nsecs="yesterday")),
                               "manifest", fmt.MANIFEST),
}


# ----------------------------------------------------------------------- entry points (in the child)
def _leaked(value: Any) -> bool:
    """Whether SENTINEL (or /etc/passwd's first bytes) is anywhere in a loaded tree."""
    if isinstance(value, dict):
        return any(map(_leaked, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(_leaked, value))
    data = value.tobytes() if isinstance(value, np.ndarray) else str(value).encode()
    return SENTINEL in data or b"root:" in data


@contextlib.contextmanager
def _log() -> Any:
    text, handler = io.StringIO(), logging.StreamHandler()
    handler.stream = text
    logging.getLogger("ckpt").addHandler(handler)
    try:
        yield text
    finally:
        logging.getLogger("ckpt").removeHandler(handler)


def _open(root: Path, step: Path) -> dict:
    with _log() as log, Checkpointer(root) as ckptr:
        infos = list(ckptr.checkpoints)
    return {"steps": [i.step for i in infos], "text": log.getvalue() + repr([i.metrics for i in infos])}


def _checkpointer_load(root: Path, step: Path) -> dict:
    with Checkpointer(root) as ckptr:
        return {"leaked": _leaked(ckptr.load(1)), "text": ""}


def _command(*argv: str) -> Callable[[Path, Path], dict]:
    def run(root: Path, step: Path) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = cli.main([argv[0], str(root), *argv[1:]])
        return {"status": status, "text": out.getvalue()}
    return run


ENTRY_POINTS: dict[str, Callable[[Path, Path], dict]] = {
    "ckpt.load": lambda root, step: {"leaked": _leaked(ckpt.load(step)), "text": ""},
    "Checkpointer()": _open,
    "Checkpointer.load": _checkpointer_load,
    "ckpt.metadata": lambda root, step: {"text": repr(ckpt.metadata(step).metadata)},
    "ckpt ls": _command("ls"),
    "ckpt show": _command("show", "1"),
    "ckpt verify": _command("verify", "1"),
}


def run_entry_points(root: str, conn: Any) -> None:
    """The child: every entry point on step 1 of ``root`` under the memory cap, each outcome sent as JSON."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for name, entry in ENTRY_POINTS.items():
        try:
            result = {"outcome": "ok", **entry(Path(root), Path(root) / "1")}
        except BaseException as e:  # whatever it is, the test judges it
            result = {"outcome": "error", "error": f"{type(e).__module__}.{type(e).__qualname__}", "text": str(e)}
        conn.send_bytes(json.dumps({"entry": name, **result}).encode())


# -------------------------------------------------------------------------------- the test (parent)
def run_case(root: Path) -> dict[str, dict]:
    """Runs every entry point on ``root`` in a child; the outcomes by entry point (one that hung, or
    died, and those after it, are missing)."""
    ctx = procs.forkserver(__name__)
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=run_entry_points, args=(str(root), send), daemon=True)
    child.start()
    send.close()
    outcomes: dict[str, dict] = {}
    deadline = time.monotonic() + CASE_TIMEOUT_SECS
    try:
        while len(outcomes) < len(ENTRY_POINTS) and receive.poll(max(0.0, deadline - time.monotonic())):
            outcome = json.loads(receive.recv_bytes())
            outcomes[outcome.pop("entry")] = outcome
    except EOFError:
        pass
    finally:
        child.kill()
        child.join()
    return outcomes


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A root with two sound steps of STATE, copied for each case."""
    root = tmp_path_factory.mktemp("template") / "root"
    with Checkpointer(root) as ckptr:
        ckptr.save(0, STATE, force=True)
        ckptr.save(1, STATE, force=True)
    return root


# What each entry point must do, by what the damage reaches.
CORRUPTED, NOT_FOUND, OK, SKIPPED, LISTED, DAMAGED = "corrupted", "not found", "ok", "skipped", "listed", "damaged"
EXPECTED = {
    "manifest": {"ckpt.load": CORRUPTED, "Checkpointer()": SKIPPED, "Checkpointer.load": NOT_FOUND,
                 "ckpt.metadata": CORRUPTED, "ckpt ls": DAMAGED, "ckpt show": 1, "ckpt verify": 1},
    "tree": {"ckpt.load": CORRUPTED, "Checkpointer()": LISTED, "Checkpointer.load": CORRUPTED,
             "ckpt.metadata": CORRUPTED, "ckpt ls": LISTED, "ckpt show": 1, "ckpt verify": 1},
    "data": {"ckpt.load": CORRUPTED, "Checkpointer()": LISTED, "Checkpointer.load": CORRUPTED,
             "ckpt.metadata": OK, "ckpt ls": LISTED, "ckpt show": 0, "ckpt verify": 1},
    "zarr": {"ckpt.load": OK, "Checkpointer()": LISTED, "Checkpointer.load": OK,
             "ckpt.metadata": OK, "ckpt ls": LISTED, "ckpt show": 0, "ckpt verify": 1},
}


def _check(entry: str, outcome: dict, expected: Any, step: Path, file: str) -> None:
    text = outcome.get("text", "")
    names_it = str(step) in text and file in text
    if expected in (CORRUPTED, NOT_FOUND):
        error = "CheckpointCorruptedError" if expected == CORRUPTED else "StepNotFoundError"
        assert outcome.get("error") == f"ckpt.errors.{error}", f"{entry}: {outcome}"
        assert expected == NOT_FOUND or names_it, f"{entry} does not name {step} and {file}: {text}"
        return
    assert outcome["outcome"] == "ok", f"{entry}: {outcome}"
    if entry == "Checkpointer()":
        assert outcome["steps"] == ([0] if expected == SKIPPED else [0, 1]), f"{entry}: {outcome}"
        assert expected != SKIPPED or names_it, f"{entry} warns without naming {step} and {file}: {text}"
    elif entry == "ckpt ls":
        assert outcome["status"] == 0 and ("DAMAGED" in text) == (expected == DAMAGED), f"{entry}: {text}"
        assert expected != DAMAGED or names_it, f"{entry} does not name {step} and {file}: {text}"
    elif isinstance(expected, int):
        assert outcome["status"] == expected, f"{entry}: {text}"
        assert expected == 0 or names_it, f"{entry} does not name {step} and {file}: {text}"


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_step_fails_every_reader_clearly_and_nothing_outside_it_is_read(template, tmp_path, case):
    make, level, file = CASES[case]
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(template, root, symlinks=True)
    outside.mkdir()
    make(root / "1", outside)
    outcomes = run_case(root)
    missing = [entry for entry in ENTRY_POINTS if entry not in outcomes]
    assert not missing, f"{missing[0]} hung (over {CASE_TIMEOUT_SECS} s) or died; before it: {outcomes}"
    for entry, outcome in outcomes.items():
        text = outcome.get("text", "")
        assert not outcome.get("leaked"), f"{entry} returned bytes from outside the step"
        assert SENTINEL.decode() not in text and str(ODD_SIZE) not in text and "root:x" not in text, \
            f"{entry} printed what is outside the step: {text}"
        assert outcome["outcome"] == "ok" or outcome["error"].startswith("ckpt.errors."), f"{entry}: {outcome}"
        _check(entry, outcome, EXPECTED[level][entry], root / "1", file)
    load_failed = outcomes["ckpt.load"]["outcome"] == "error"
    verify_failed = outcomes["ckpt verify"]["status"] == 1
    assert verify_failed and (load_failed or level == "zarr"), "verify and load disagree"


# ---------------------------------------------------------------------------------- the command line
def run_cli(capsys, *argv: Any) -> tuple[int, str]:
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out + err


def test_the_command_prints_text_from_a_checkpoint_with_control_characters_escaped(tmp_path, capsys):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"\x1b]0;owned\x07w": np.ones(3), "name": "\x1b[31mred"}, force=True,
                   metrics={"\x1b[2Jloss": 0.5})
    for argv in (["ls", tmp_path], ["show", tmp_path], ["verify", tmp_path]):
        status, text = run_cli(capsys, *argv)
        assert status == 0 and "\x1b" not in text and "\x07" not in text, text
    _, shown = run_cli(capsys, "show", tmp_path)
    assert "\\x1b]0;owned\\x07w" in shown and "\\u001b[31mred" in shown
    _, listed = run_cli(capsys, "ls", tmp_path)
    assert "\\x1b[2Jloss=0.5" in listed


def test_ls_and_show_json_are_strict_json_with_numbers_that_are_not_finite_as_strings(tmp_path, capsys):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"w": np.ones(3)}, force=True, metrics={"loss": 1.0})
    rewrite_manifest(tmp_path / "0", lambda m: m.update(metrics={"loss": float("nan"), "acc": {"best": float("inf")}},
                                                        custom_metadata=[float("-inf")]))

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    _, text = run_cli(capsys, "ls", tmp_path, "--json")
    assert json.loads(text, parse_constant=refuse)["steps"][0]["metrics"] == {"loss": "nan", "acc": {"best": "inf"}}
    _, text = run_cli(capsys, "show", tmp_path, "--json")
    shown = json.loads(text, parse_constant=refuse)
    assert shown["metrics"]["loss"] == "nan" and shown["custom_metadata"] == ["-inf"]
    status, text = run_cli(capsys, "ls", tmp_path)
    assert status == 0 and "loss=nan" in text


def test_a_step_with_a_bad_timestamp_is_listed_as_damaged_and_the_rest_of_the_root_still_shows(template, tmp_path,
                                                                                              capsys):
    root = tmp_path / "root"
    shutil.copytree(template, root)
    rewrite_manifest(root / "1", lambda m: m.update(commit_timestamp_nsecs=10 ** 30))
    status, text = run_cli(capsys, "ls", root)
    assert status == 0 and "latest step 0" in text
    assert "DAMAGED" in text and "commit_timestamp_nsecs" in text
    status, text = run_cli(capsys, "show", root)
    assert status == 0 and text.startswith(f"step 0  {root / '0'}")


@pytest.mark.parametrize("impl", ["no_such_impl", "rbg"])  # (rbg: key data of 4 words, not threefry's 2)
def test_a_prng_key_leaf_of_an_implementation_jax_refuses_is_damage_for_verify_as_for_load(tmp_path, impl):
    jax = pytest.importorskip("jax")
    ckpt.save(tmp_path / "c", {"ok": np.ones(2), "k": jax.random.key(0)})
    rewrite_tree(tmp_path / "c", lambda t: leaf(t, "['k']").update(impl=impl))
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=rf"leaf state\['k'\] is damaged: jax refuses .*{impl}"):
        ckpt.load(tmp_path / "c")
    result = verify_step(tmp_path / "c")
    assert [d.where for d in result.damaged] == ["state['k']"] and impl in result.damaged[0].why


@pytest.mark.parametrize("kind, dtype", [("torch", "int4"), ("torch", "float8_e4m3b11fnuz"), ("jax", "float128")])
def test_a_framework_leaf_of_a_dtype_its_framework_has_no_type_for_is_damage_naming_the_leaf_for_load_and_verify(
        tmp_path, kind, dtype):
    """Was: verify passed them; a load raised TypeError as damage (torch), or jax's own error naming no leaf."""
    pytest.importorskip(kind)
    if np.dtype(np.longdouble).itemsize <= 8 and dtype == "float128":
        pytest.skip("numpy has no float128 here")
    ckpt.save(tmp_path / "c", {"ok": np.ones(2), "q": np.arange(48, dtype=np.uint8)})
    shape = [48 // ckpt.leaves.parse_dtype(dtype).itemsize]  # (its bytes as saved)
    rewrite_tree(tmp_path / "c", lambda t: leaf(t, "['q']").update(type=kind, dtype=dtype, shape=shape))
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=rf"leaf state\['q'\]: a {kind} leaf of dtype {dtype}"):
        ckpt.load(tmp_path / "c")
    assert not verify_step(tmp_path / "c").ok


def test_a_json_file_whose_values_would_take_more_memory_than_is_left_is_refused_before_it_is_parsed(tmp_path):
    """A byte of JSON ('[{},{},...]') decodes into up to 44 bytes: a tree.json of the 256 MiB a reader accepts (its
    checksum resealed) took 11 GiB to load, an Orbax _METADATA of 64 MiB 3 GiB; under a memory cap, orjson raised a
    bare SystemError after minutes. Run under a cap of 1 GiB more than the interpreter uses, each file 24 MiB."""
    junk = b"[" + b"{}," * (8 << 20) + b"{}]"
    ckpt.save(tmp_path / "c", STATE)
    tree = (tmp_path / "c" / fmt.TREE).read_bytes()
    write_tree(tmp_path / "c", tree[:-1] + b', "zz": ' + junk + b"}")
    orbax_step = Path(shutil.copytree(Path(__file__).parent / "orbax_0_5" / "aggregate" / "1", tmp_path / "orbax" / "1"))
    metadata = orbax_step / "default" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:-1] + b', "zz": ' + junk + b"}")
    script = f"""
import resource, ckpt
from ckpt import errors
from ckpt.verify import verify_step
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
for read in (lambda: ckpt.load({str(tmp_path / "c")!r}), lambda: verify_step({str(tmp_path / "c")!r}).damaged[0].why,
             lambda: ckpt.load({str(orbax_step)!r})):
    try:
        print("read:", read())
    except errors.CheckpointCorruptedError as e:
        print("refused:", e)
"""
    done = procs.run_script(script)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout + done.stderr
    for line, path in zip(lines, (tmp_path / "c" / fmt.TREE, tmp_path / "c" / fmt.TREE, metadata)):
        assert f"{path} holds {len(path.read_bytes())} bytes of JSON, whose values and keys" in line, line
        assert "more than this process may still allocate" in line, line
