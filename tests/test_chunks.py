"""The checks of a leaf's bytes: the word sum a load computes changes with every single flipped bit."""
from __future__ import annotations

import numpy as np
import pytest

import ckpt
from ckpt import chunks
from tests import procs


@pytest.mark.parametrize("size", [0, 1, 7, 8, 13, 4096, 4099])
def test_sum64_changes_when_any_single_bit_flips(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    base = chunks.sum64(data)
    rng = np.random.default_rng(1)
    for position in rng.integers(0, size, min(size, 64)) if size else []:
        for bit in range(8):
            damaged = data.copy()
            damaged[position] ^= 1 << bit
            assert chunks.sum64(damaged) != base


def test_sum64_is_the_wrapping_sum_of_little_endian_words_with_a_zero_padded_tail():
    data = np.frombuffer(b"\xff" * 16 + b"\x01\x02", np.uint8)
    expected = (2 * (2**64 - 1) + 0x0201) % 2**64
    assert chunks.sum64(data) == expected


@pytest.mark.timeout(60)
def test_a_child_forked_after_a_load_loads_too(tmp_path):
    """The reading threads are not inherited by a fork (a DataLoader worker, a forked evaluation process):
    the child's first load makes its own instead of queueing its reads for threads that are not there."""
    state = {"w": np.arange(1 << 20, dtype=np.float32), "b": np.arange(5.0)}
    with ckpt.training.Checkpointer(tmp_path) as ckptr:
        ckptr.save(1, state, force=True)
        ckptr.load(1)  # the parent's reading threads now exist

    def load() -> bytes:
        with ckpt.training.Checkpointer(tmp_path) as ckptr:
            loaded = ckptr.load(1)
        return b"same" if all(np.array_equal(loaded[k], state[k]) for k in state) else b"different"

    assert procs.in_fork(load) == b"same"
