"""Chunks whose bytes lie aligned in memory (an async save's snapshot buffers, an aligned array in a
sync save) go straight from memory to their files (O_DIRECT, ``storage.write_direct``); the others
through tensorstore. Either way the files hold what tensorstore would write, are fsync'd before
tree.json, and load exactly, with ckpt or with tensorstore alone."""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

import ckpt
from ckpt import format as fmt
from ckpt import saving, storage, verify
from ckpt.objectstore import ObjectPath
from tests import fsutil


def aligned(nbytes: int) -> np.ndarray:
    """``nbytes`` of random bytes at the start of a mapping of their own (page-aligned)."""
    array = np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)
    array[:] = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    return array


@pytest.fixture
def direct(tmp_path, monkeypatch) -> dict[str, list[str]]:
    """Spies on the writes: each file ``write_direct`` wrote ("direct"), each whose writeback the writer
    started ("writeback"), each fsync'd ("fsynced"), and what was fsync'd when tree.json was written.
    Skips where this file system refuses O_DIRECT."""
    if not storage.write_direct(tmp_path / "probe", aligned(storage.DIRECT_ALIGN)):
        pytest.skip("this file system refuses O_DIRECT")
    (tmp_path / "probe").unlink()
    seen: dict[str, list] = {"direct": [], "writeback": [], "fsynced": [], "at_tree": []}
    real_direct, real_start, real_fsync, real_write = storage.write_direct, storage.start_writeback, os.fsync, storage.write_file

    def write_direct(path, data):
        done = real_direct(path, data)
        if done:
            seen["direct"].append(str(path))
        return done

    def fsync(fd):
        seen["fsynced"].append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def write_file(path, data, **kw):
        if path.name == fmt.TREE:
            seen["at_tree"].append(set(seen["fsynced"]))
        return real_write(path, data, **kw)

    monkeypatch.setattr(storage, "write_direct", write_direct)
    monkeypatch.setattr(storage, "start_writeback", lambda path: (seen["writeback"].append(str(path)), real_start(path)))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(storage, "write_file", write_file)
    return seen


def chunk_files(step: Path) -> dict[str, set[str]]:
    """A committed step's chunk files by array directory (each array's, the packed array's), as paths in
    the step's temporary directory, where they were written."""
    tmp = str(step) + fmt.TMP_SUFFIX
    arrays = [*(step / fmt.ARRAYS).iterdir(), step / fmt.PACKED] if (step / fmt.ARRAYS).is_dir() else [step / fmt.PACKED]
    return {str(array).replace(str(step), tmp): {os.path.join(d, name).replace(str(step), tmp)
                                                  for d, _, names in os.walk(array / "c") for name in names}
            for array in arrays if array.is_dir()}


def read_with_tensorstore(array: Path) -> np.ndarray:
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{array}/"}}).result().read().result()


def assert_exact_everywhere(step: Path, state: dict) -> None:
    """ckpt loads ``state`` exactly and verifies the step; tensorstore alone reads every leaf's bytes
    (its own array, or its span of the packed array) as they were saved."""
    loaded = ckpt.load(step)
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert verify.verify_step(step).ok
    leaves = json.loads((step / fmt.TREE).read_bytes())["checkpointables"]["state"]["leaves"]
    packed = read_with_tensorstore(step / fmt.PACKED) if (step / fmt.PACKED).is_dir() else None
    for path, span, more in zip(leaves["path"], leaves["packed"], leaves["more"]):
        value = np.asarray(state[path[2:-2]])  # "['big']"
        if span is not None:
            assert packed is not None and packed[span[0]: span[0] + span[1]].tobytes() == value.tobytes(), path
        else:
            np.testing.assert_array_equal(read_with_tensorstore(step / more["array"]["kvstore"]["path"]), value)


STATE_BYTES = 5 << 20  # a snapshot buffer of 4 MiB or more starts on a 2 MiB boundary, so page-aligned


@pytest.mark.parametrize("hurried", [False, True], ids=["background", "hurried"])
def test_an_async_saves_whole_chunks_go_direct_and_its_edge_chunks_through_tensorstore(tmp_path, monkeypatch, direct, hurried):
    monkeypatch.setattr(fmt, "ARRAY_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(fmt, "PACKED_CHUNK_BYTES", 1 << 16)
    big = np.arange(STATE_BYTES // 4 + 1024, dtype=np.float32)  # 5 whole chunks of 1 MiB, then an edge chunk:
    # its 4 KiB are aligned, but its file holds a whole chunk (the rows past the end as fill)
    small = {f"s{i}": np.full(8192, i, np.float64) for i in range(80)}  # 5 MiB packed: 80 chunks of 64 KiB,
    small["tail"] = np.arange(512.0)  # then an edge chunk of 4 KiB
    state = {"big": big, **small}
    writer = saving.StepWriter(saving.plan({"state": state}), tmp_path / "0.ckpt-tmp", tmp_path / "0")
    writer.hand_off()
    if hurried:  # as wait() or result() right after save_async returned: direct writes are at full speed already
        writer.hurry()
    writer.run(0)
    step = tmp_path / "0"
    files = chunk_files(step)
    big_dir = next(d for d in files if f"/{fmt.ARRAYS}/" in d)
    packed_dir = str(tmp_path / "0.ckpt-tmp" / fmt.PACKED)
    assert sorted(Path(f).name for f in direct["direct"] if f.startswith(big_dir + "/")) == ["0", "1", "2", "3", "4"]
    packed_chunks = len(files[packed_dir])
    assert packed_chunks == 81 and len([f for f in direct["direct"] if f.startswith(packed_dir + "/")]) == packed_chunks - 1
    written_by_tensorstore = set().union(*files.values()) - set(direct["direct"])
    assert written_by_tensorstore == {f"{big_dir}/c/5", f"{packed_dir}/c/{packed_chunks - 1}"}, "only the edge chunks"
    assert set(direct["writeback"]) == (set() if hurried else written_by_tensorstore)
    data_files = set().union(*files.values()) | {f"{d}/zarr.json" for d in files}
    assert data_files <= direct["at_tree"][0], f"not fsync'd before tree.json: {sorted(data_files - direct['at_tree'][0])}"
    modes = {os.stat(f.replace(fmt.TMP_SUFFIX, "")).st_mode for f in set().union(*files.values())}
    assert len(modes) == 1, "a file written direct has the mode of one tensorstore wrote"
    assert_exact_everywhere(step, state)


def test_a_sync_save_writes_an_aligned_array_direct_and_the_others_through_tensorstore(tmp_path, direct):
    whole, other = aligned(8 << 20), aligned(8 << 20)
    state = {"aligned": whole.view(np.float64), "unaligned": whole[64:].view(np.float32)[: (6 << 20) // 4],
             "transposed": other.view(np.float32).reshape(1024, 2048).T}  # aligned, but not C-contiguous
    with ckpt.Checkpointer(tmp_path / "root") as ckptr:
        ckptr.save(0, state)
    step = tmp_path / "root" / "0"
    files = chunk_files(step)
    assert len(direct["direct"]) == 1 and direct["direct"][0] in set().union(*files.values())
    assert direct["writeback"] == [], "a sync save's tensorstore writes are fsync'd by tensorstore"
    assert set(direct["direct"]) <= direct["at_tree"][0]
    assert_exact_everywhere(step, state)


def test_write_direct_writes_exactly_or_declines_leaving_no_file(tmp_path):
    data = aligned(3 * storage.DIRECT_ALIGN)
    if not storage.write_direct(tmp_path / "a" / "b" / "file", data):
        pytest.skip("this file system refuses O_DIRECT")
    assert (tmp_path / "a" / "b" / "file").read_bytes() == data.tobytes()
    declined = {"memory off the alignment": data[64: 64 + storage.DIRECT_ALIGN],
                "a length off the alignment": data[: storage.DIRECT_ALIGN + 512], "no bytes": data[:0]}
    for why, part in declined.items():
        assert storage.write_direct(tmp_path / why, part) is False, why
        assert not (tmp_path / why).exists(), why
    assert storage.write_direct(ObjectPath("s3://bucket/x"), data) is False


def test_write_direct_never_follows_or_replaces_what_is_at_its_path(tmp_path):
    data = aligned(storage.DIRECT_ALIGN)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ckpt's")
    os.symlink(outside, tmp_path / "link")
    (tmp_path / "file").write_bytes(b"there before")
    for name in ("link", "file"):
        with pytest.raises(OSError, match=name) as info:
            storage.write_direct(tmp_path / name, data)
        assert info.value.errno == errno.EEXIST
    assert outside.read_bytes() == b"not ckpt's" and (tmp_path / "file").read_bytes() == b"there before"


def refusing_direct(monkeypatch, where: str) -> None:
    """Makes O_DIRECT refused as some file systems do: the open makes the file, then fails with EINVAL
    (``where="open"``), or writes take part of a file's bytes and then fail (``where="write"``)."""
    real_open, real_write = os.open, os.write

    def open_refusing(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, mode))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def write_refusing(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            if len(data) > storage.DIRECT_ALIGN:  # part of it lands first
                return real_write(fd, memoryview(data)[: storage.DIRECT_ALIGN])
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    if where == "open":
        monkeypatch.setattr(os, "open", open_refusing)
    else:
        monkeypatch.setattr(os, "write", write_refusing)


@pytest.mark.parametrize("where", ["open", "write"])
def test_write_direct_declines_where_the_file_system_refuses_o_direct(tmp_path, monkeypatch, where):
    refusing_direct(monkeypatch, where)
    assert storage.write_direct(tmp_path / "file", aligned(3 * storage.DIRECT_ALIGN)) is False
    assert not (tmp_path / "file").exists()


@pytest.mark.parametrize("where", ["open", "write"])
def test_a_save_where_o_direct_is_refused_goes_through_tensorstore_and_loads_exactly(tmp_path, monkeypatch, where):
    if not storage.write_direct(tmp_path / "probe", aligned(storage.DIRECT_ALIGN)):
        pytest.skip("this file system refuses O_DIRECT")
    refusing_direct(monkeypatch, where)
    state = {"big": np.arange(STATE_BYTES // 4, dtype=np.float32), "small": np.arange(7)}
    with ckpt.Checkpointer(tmp_path / "root") as ckptr:
        ckptr.save_async(0, state).result()
        loaded = ckptr.load(0)
    np.testing.assert_array_equal(loaded["big"], state["big"])
    np.testing.assert_array_equal(loaded["small"], state["small"])
    assert verify.verify_step(tmp_path / "root" / "0").ok


def test_a_full_disk_under_a_direct_write_names_the_file_and_commits_nothing(tmp_path):
    with fsutil.tmpfs(tmp_path / "mnt", size="4m") as mnt:
        if not storage.write_direct(mnt / "probe", aligned(storage.DIRECT_ALIGN)):
            pytest.skip("this tmpfs refuses O_DIRECT")
        (mnt / "probe").unlink()
        with ckpt.Checkpointer(mnt / "root") as ckptr:
            ckptr.save(0, {"w": np.arange(10.0)})
            with pytest.raises(OSError) as info:
                ckptr.save_async(1, {"big": np.ones(640_000)}).result()  # 5.12 MB: one whole aligned chunk
            assert info.value.errno == errno.ENOSPC
            chunk = mnt / "root" / ("1" + fmt.TMP_SUFFIX) / fmt.ARRAYS / "0" / "c" / "0"
            assert str(chunk) in str(info.value), info.value
            assert [c.step for c in ckptr.checkpoints] == [0]
            assert set(os.listdir(mnt / "root")) == {"0", ".ckpt.lock"}, "no step 1, no temporary left"
            np.testing.assert_array_equal(ckptr.load(0)["w"], np.arange(10.0))
