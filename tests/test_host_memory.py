"""New host memory (ckpt.host_memory): aligned, large buffers on 2 MiB pages asked to be huge, spare
buffers handed out again (a Checkpointer's use of them: tests/test_async.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from ckpt import format as fmt
from ckpt import host_memory

MiB = 1 << 20


def _advised_huge(start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of [start, stop) in mappings whose VmFlags have ``hg`` (MADV_HUGEPAGE)."""
    found, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = (lo, hi)
            elif head == "VmFlags:" and "hg" in line.split()[1:]:
                lo, hi = max(current[0], start), min(current[1], stop)
                if lo < hi:
                    found.append((lo, hi))
    return found


@pytest.mark.parametrize("nbytes", [0, 1, 100, MiB, 4 * MiB - 1, 4 * MiB, 5 * MiB + 3])
def test_buffers_are_aligned_and_zeros_are_zeros(nbytes):
    for make in (host_memory.empty, host_memory.zeros):
        buffer = make(nbytes)
        assert buffer.dtype == np.uint8 and buffer.shape == (nbytes,) and buffer.flags.writeable
        assert nbytes == 0 or buffer.ctypes.data % fmt.ALIGN == 0  # (an empty array has no memory)
    assert not host_memory.zeros(nbytes).any()


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="a kernel without huge pages")
@pytest.mark.parametrize("nbytes", [4 * MiB, 5 * MiB + 3, 9 * MiB])
def test_a_large_buffer_starts_on_a_2_mib_page_and_its_whole_pages_are_asked_to_be_huge(nbytes):
    for make in (host_memory.empty, host_memory.zeros):
        buffer = make(nbytes)
        start = buffer.ctypes.data
        assert start % (2 * MiB) == 0
        whole = (start, start + nbytes // (2 * MiB) * (2 * MiB))
        advised = _advised_huge(*whole)
        assert sum(hi - lo for lo, hi in advised) == whole[1] - whole[0]  # (numpy's madvise)
        buffer[-1] = 1  # writable to its last byte


def test_small_buffers_are_not_placed_on_huge_pages():
    assert any(host_memory.empty(100 + i).ctypes.data % (2 * MiB) for i in range(8))  # only ALIGN asked for


def test_within_reusing_empty_hands_out_the_spare_buffers_of_its_size_first():
    spare = [host_memory.empty(5 * MiB), host_memory.empty(5 * MiB), host_memory.empty(100)]
    addresses = {b.ctypes.data for b in spare}
    with host_memory.reusing(spare):
        assert spare == []  # taken out of the caller's list
        got = [host_memory.empty(5 * MiB) for _ in range(3)] + [host_memory.empty(100), host_memory.empty(100)]
        zeros = host_memory.zeros(5 * MiB)
    assert [b.ctypes.data in addresses for b in got] == [True, True, False, True, False]
    assert zeros.ctypes.data not in addresses and not zeros.any()  # zeros never reuses: a spare holds old bytes
    assert host_memory.empty(100).ctypes.data not in addresses | {b.ctypes.data for b in got}


def _write(directory, **files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def test_the_memory_left_counts_the_limits_of_this_process_control_groups_with_their_page_cache_free(tmp_path):
    # A container's limit (cgroup v2, and v1's memory controller), which MemAvailable does not show: a hostile
    # JSON file that fits the machine but not the container would have the reader killed, not refused.
    gib = 1 << 30
    _write(tmp_path / "fs" / "pod", memory_max=str(8 * gib), memory_current=str(7 * gib),
           memory_stat=f"anon {5 * gib}\nfile {6 * gib}\n")
    _write(tmp_path / "fs" / "pod" / "job", memory_max="max", memory_current=str(gib), memory_stat="file 0\n")
    (tmp_path / "v2").write_text("0::/pod/job\n")
    assert host_memory.cgroup_room(str(tmp_path / "v2"), str(tmp_path / "fs")) == 7 * gib  # 8 - (7 - 6)

    _write(tmp_path / "fs" / "memory" / "box", memory_limit_in_bytes=str(2 * gib),
           memory_usage_in_bytes=str(3 * gib // 2), memory_stat=f"cache {gib}\ntotal_cache {gib}\n")
    _write(tmp_path / "fs" / "memory", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes="0",
           memory_stat="")
    (tmp_path / "v1").write_text("5:cpu,cpuacct:/box\n4:memory:/box\n")
    assert host_memory.cgroup_room(str(tmp_path / "v1"), str(tmp_path / "fs")) == 3 * gib // 2  # 2 - (1.5 - 1)

    (tmp_path / "none").write_text("0::/elsewhere\n")  # no limit set, or none readable: no bound
    assert host_memory.cgroup_room(str(tmp_path / "none"), str(tmp_path / "fs")) == float("inf")
    assert 0 < host_memory.allocatable() <= host_memory.cgroup_room()


def test_a_control_groups_tmpfs_and_shared_memory_are_not_counted_free_and_its_limit_holds_without_memory_stat(
        tmp_path):
    # memory.stat's file (v2) and total_cache (v1) count tmpfs and shared memory too, which the kernel cannot reclaim
    # without swap: a group at its 1 GiB limit holding 900 MiB of shared memory was said to have 900 MiB left. A
    # memory.stat that cannot be read dropped the limit altogether, and usage past the limit gave negative room.
    mib = 1 << 20
    _write(tmp_path / "fs" / "shm", memory_max=str(1024 * mib), memory_current=str(1024 * mib),
           memory_stat=f"anon {100 * mib}\nfile {924 * mib}\nshmem {900 * mib}\n")
    (tmp_path / "v2").write_text("0::/shm\n")
    assert host_memory.cgroup_room(str(tmp_path / "v2"), str(tmp_path / "fs")) == 24 * mib  # 1024 - (1024 - 24)
    _write(tmp_path / "fs" / "memory" / "box", memory_limit_in_bytes=str(1024 * mib),
           memory_usage_in_bytes=str(1000 * mib), memory_stat=f"total_cache {800 * mib}\ntotal_shmem {700 * mib}\n")
    (tmp_path / "v1").write_text("4:memory:/box\n")
    assert host_memory.cgroup_room(str(tmp_path / "v1"), str(tmp_path / "fs")) == 124 * mib  # 1024 - (1000 - 100)
    _write(tmp_path / "fs" / "nostat", memory_max=str(1024 * mib), memory_current=str(1000 * mib))
    (tmp_path / "nostat.cg").write_text("0::/nostat\n")
    assert host_memory.cgroup_room(str(tmp_path / "nostat.cg"), str(tmp_path / "fs")) == 24 * mib
    _write(tmp_path / "fs" / "past", memory_max=str(1024 * mib), memory_current=str(1100 * mib), memory_stat="")
    (tmp_path / "past.cg").write_text("0::/past\n")
    assert host_memory.cgroup_room(str(tmp_path / "past.cg"), str(tmp_path / "fs")) == 0


def test_a_json_file_that_fits_the_machine_but_not_the_containers_limit_is_refused_before_it_is_parsed(
        tmp_path, monkeypatch):
    from ckpt import storage
    big = tmp_path / "tree.json"
    big.write_bytes(b"[" + b"{}," * (1 << 19) + b"{}]")  # 1.5 MiB: checked (48x its size is 72 MiB)
    assert storage.read_json_bytes(big, limit=1 << 30)  # the machine has room
    monkeypatch.setattr(host_memory, "cgroup_room", lambda: 64 << 20)  # a container with 64 MiB left
    assert host_memory.allocatable() == 64 << 20
    with pytest.raises(ValueError, match=r"tree\.json holds .* more than this process may still allocate"):
        storage.read_json_bytes(big, limit=1 << 30)


def test_a_control_group_whose_name_is_not_utf8_is_read_as_its_directory_is_named(tmp_path):
    # A group's name is any bytes (mkdir of a name in Latin-1): /proc/self/cgroup printed it as it is, and reading that
    # file as UTF-8 raised UnicodeDecodeError out of every load of a tree.json past 1 MiB.
    group = os.fsencode(tmp_path / "fs") + b"/caf\xe9"
    os.makedirs(group)
    for name, text in ((b"memory.max", b"1000"), (b"memory.current", b"100"), (b"memory.stat", b"file 50\n")):
        with open(group + b"/" + name, "wb") as f:
            f.write(text)
    (tmp_path / "v2").write_bytes(b"0::/caf\xe9\n")
    assert host_memory.cgroup_room(str(tmp_path / "v2"), str(tmp_path / "fs")) == 950  # 1000 - (100 - 50)


def test_a_genuine_tree_json_of_long_key_names_loads_where_48_times_its_size_is_not_left_and_a_hostile_one_does_not(
        tmp_path, monkeypatch):
    # A tree.json of long key names takes 3 bytes decoded a byte, and was refused (as damage) wherever 48 times its
    # size was not left: in a container with 256 MiB left, a genuine 6 MiB tree.json (288 MiB at 48) never loaded.
    import ckpt
    from ckpt import storage
    tree = {f"layer_{i}_" + "k" * 30_000: np.float32(i) for i in range(100)}
    ckpt.save(tmp_path / "step", tree)
    size = (tmp_path / "step" / fmt.TREE).stat().st_size
    monkeypatch.setattr(host_memory, "cgroup_room", lambda: 256 << 20)
    assert size * storage.JSON_DECODED_BYTES > host_memory.allocatable()
    assert ckpt.load(tmp_path / "step")["layer_7_" + "k" * 30_000] == 7
    hostile = tmp_path / "hostile.json"
    hostile.write_bytes(b"[" + b"{}," * (size // 3) + b"{}]")  # as large, 44 bytes decoded a byte
    with pytest.raises(ValueError, match=r"hostile\.json holds .* more than this process may still allocate"):
        storage.read_json_bytes(hostile, limit=1 << 30)
