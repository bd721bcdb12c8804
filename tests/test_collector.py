"""ckpt.collector: the garbage collector is paused inside the block and resumed as it was found; a load
leaves it no cycles to find (its per-leaf objects are freed as soon as they are done with)."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import ckpt
from ckpt import collector


def test_the_collector_is_paused_inside_and_resumed_after_even_on_error():
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with collector.paused():
            assert not gc.isenabled()
            with collector.paused():
                assert not gc.isenabled()
            assert not gc.isenabled(), "an inner block leaves the outer one paused"
            raise KeyError("x")
    assert gc.isenabled()


def test_a_collector_paused_by_the_caller_stays_paused():
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("as_abstract", [True, False], ids=["abstract tree", "as saved"])
def test_a_load_leaves_no_reference_cycle_for_the_collector(tmp_path, as_abstract):
    state = {"a": {f"w{i}": np.ones(3) for i in range(50)}, "b": [np.zeros(2), 3, "x"], "n": 1}
    ckpt.save(tmp_path / "c", state)
    ckpt.load(tmp_path / "c", state)  # whatever a first load sets up once
    gc.collect()
    gc.disable()
    try:
        loaded = ckpt.load(tmp_path / "c", state if as_abstract else None)
        del loaded
        assert gc.collect() == 0
    finally:
        gc.enable()
