"""ckpt.collector: the garbage collector is paused inside the block and resumed as it was found."""
from __future__ import annotations

import gc

import pytest

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
