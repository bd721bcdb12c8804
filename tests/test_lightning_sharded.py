"""CheckpointCallback under ModelParallelStrategy (FSDP2 in configure_model, gloo on CPU): every rank
writes its shards; a run SIGKILLed after a committed step resumes bit for bit, at the same number of
devices and at another; ``load_weights`` gives the full weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pl = pytest.importorskip("pytorch_lightning")
import torch  # noqa: E402

import ckpt  # noqa: E402
from ckpt.integrations.lightning import load_weights  # noqa: E402
from tests.lightning_run import ShardedStoppingRegressor, same  # noqa: E402
from tests.test_lightning import Run, finished, kill_then_restart, reference, started_at, steps_in  # noqa: E402,F401

FLAGS = ("--max-steps", "12", "--policy", "every:4")


def test_model_parallel_run_killed_after_a_committed_step_resumes_bit_exact_at_two_devices_and_at_one(
        tmp_path, reference):
    expected = reference("--model-parallel", "2", "--max-steps", "12")
    killed, out, final = kill_then_restart(tmp_path, "--model-parallel", "2", *FLAGS, kill_at=10)
    assert killed == [4, 8]
    assert "rank 0 started at step 8 of 2 ranks" in out and "rank 1 started at step 8 of 2 ranks" in out, out
    assert steps_in(tmp_path / "ckpt") == [4, 8, 12]
    assert same(final, expected())
    saved = sorted((tmp_path / "ckpt" / "8" / "arrays").iterdir())
    assert len(saved) == 2  # the wide layer's weight and its momentum, each written by both ranks
    assert all(len(list((a / "c").iterdir())) == 2 for a in saved)

    # Step 8 resumed on one device: it starts from exactly the state saved.
    other = tmp_path / "one"
    shutil.copytree(tmp_path / "ckpt" / "8", other / "ckpt" / "8")
    out = finished("--model-parallel", "1", *FLAGS, "--dir", str(other / "ckpt"), "--out", str(other / "final.pt"))
    assert started_at(out) == 8 and "of 1 ranks" in out
    assert_started_from(other / "final.pt", other / "ckpt" / "8")

    # The full weights, for inference in a plain process.
    model = ShardedStoppingRegressor(None, None, False, None)
    assert load_weights(model, tmp_path / "ckpt") == 12
    assert same(model.state_dict(), final["model"])


def assert_started_from(final: Path, step_dir: Path) -> None:
    """The resumed run's weights and optimizer state at its start (``final``.start) are the step's, exactly."""
    start = torch.load(str(final) + ".start")
    saved = ckpt.load_checkpointables(step_dir)
    assert same(start["model"], saved["model"])
    optimizer = saved["trainer"]["optimizer_states"][0]
    names = optimizer["param_groups"][0]["params"]
    assert same([start["optimizer"]["state"][i] for i in range(len(names))], [optimizer["state"][n] for n in names])


def test_a_model_parallel_strategy_giving_the_state_to_rank_0_alone_is_refused_on_every_rank_before_training(tmp_path):
    """ModelParallelStrategy(save_distributed_checkpoint=False) gathers the state whole on rank 0 and gives the other
    ranks none: the first save failed with a TreeMismatchError listing every key of the model and optimizer."""
    code, out = Run("--model-parallel", "2", *FLAGS, "--full-state-dict", "--dir", str(tmp_path / "ckpt"),
                    "--out", str(tmp_path / "final.pt")).result()
    assert code != 0 and "ValueError: ModelParallelStrategy(save_distributed_checkpoint=False) gives the state" in out, out
    assert "TreeMismatchError" not in out and "step 1 train_loss" not in out, out  # before any training step
    assert steps_in(tmp_path / "ckpt") == []


def test_a_model_parallel_run_whose_module_shards_nothing_resumes_its_weights_and_optimizer(tmp_path):
    """A configure_model that leaves the parameters plain (a small model): the resume restored the loops alone,
    and went on from step 8 with the freshly initialized weights and an empty optimizer state."""
    flags = ("--model-parallel", "2", "--unsharded", "--policy", "every:4", "--dir", str(tmp_path / "ckpt"),
             "--out", str(tmp_path / "final.pt"))
    finished("--max-steps", "8", *flags)
    out = finished("--max-steps", "12", *flags)
    assert started_at(out) == 8
    assert_started_from(tmp_path / "final.pt", tmp_path / "ckpt" / "8")
