"""A background write goes on at full speed once someone waits for it (wait, close, a new save, the
response's result) or a preemption is announced; a write switched half-way is whole and exact."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import ckpt
from ckpt import format as fmt
from ckpt import preemption, saving, storage, verify


@pytest.fixture
def writes(monkeypatch):
    """The tensorstore context (background or not) of every array opened for writing."""
    seen: list[bool] = []
    original = storage.open_for_write

    def open_for_write(spec, *, background=False):
        seen.append(background)
        return original(spec, background=background)

    monkeypatch.setattr(storage, "open_for_write", open_for_write)
    return seen


def handed_off(tmp_path, state) -> saving.StepWriter:
    writer = saving.StepWriter(saving.plan({"state": state}), tmp_path / "0.ckpt-tmp", tmp_path / "0")
    writer.hand_off()
    return writer


def test_a_write_hurried_between_two_chunks_finishes_at_full_speed_and_loads_exactly(tmp_path, monkeypatch, writes):
    monkeypatch.setattr(fmt, "ARRAY_CHUNK_BYTES", 1 << 20)  # the big leaf spans 3 chunk files
    state = {"big": np.arange((5 << 20) // 8, dtype=np.float32), "small": np.arange(7)}
    writer = handed_off(tmp_path, state)
    chunks_written = []
    original = writer._slow

    def slow() -> bool:  # hurried by a waiter just after the first chunk is on disk
        chunks_written.append(1)
        if len(chunks_written) == 3:
            writer.hurry()
        return original()

    writer._slow = slow
    writer.run(0)
    assert writes == [True, False, False], "the big leaf opened in the background, reopened at full speed, then packed"
    loaded = ckpt.load(tmp_path / "0")
    np.testing.assert_array_equal(loaded["big"], state["big"])
    np.testing.assert_array_equal(loaded["small"], state["small"])
    assert verify.verify_step(tmp_path / "0").ok  # every chunk checksum holds


def test_a_preemption_notice_switches_a_background_write_to_full_speed(tmp_path, writes):
    writer = handed_off(tmp_path, {"big": np.ones((1 << 20) // 4 + 1, np.float32)})
    preemption.notify()
    try:
        writer.run(0)
    finally:
        preemption.reset()
    assert writes == [False]


@pytest.mark.parametrize("how", ["wait", "result", "close", "next save"])
def test_waiting_for_a_background_save_hurries_it(tmp_path, writes, how, monkeypatch):
    gate, hurried = threading.Event(), []
    original_run, original_hurry = saving.StepWriter.run, saving.StepWriter.hurry

    def run(self, step):
        assert gate.wait(30)
        return original_run(self, step)

    def hurry(self):
        hurried.append(self.final_dir.name)
        gate.set()
        original_hurry(self)

    monkeypatch.setattr(saving.StepWriter, "run", run)
    monkeypatch.setattr(saving.StepWriter, "hurry", hurry)
    ckptr = ckpt.Checkpointer(tmp_path)
    response = ckptr.save_async(0, {"big": np.ones((1 << 20) // 4 + 1, np.float32)})
    {"wait": ckptr.wait, "result": response.result, "close": ckptr.close,
     "next save": lambda: ckptr.save_async(1, {"big": np.ones(3)})}[how]()
    ckptr.close()
    assert hurried[0] == "0" and writes[0] is False, "the write of step 0 ran at full speed"
    assert ckpt.load(tmp_path / "0")["big"].sum() == (1 << 20) // 4 + 1
