"""CheckpointCallback with real Lightning Trainers: resume equivalence after SIGKILL and SIGTERM, DDP,
policies, and the errors a user meets. Crash and resume runs are subprocesses (tests/lightning_run.py);
the rest runs small Trainers in this process."""
from __future__ import annotations

import datetime
import logging
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest

pl = pytest.importorskip("pytorch_lightning")
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tests import fsutil, procs  # noqa: E402
from tests.lightning_run import example, final_state, parse_args, same, train  # noqa: E402

import ckpt  # noqa: E402
from ckpt.integrations.lightning import load_from_checkpoint, load_weights  # noqa: E402
from ckpt.integrations.lightning import translate  # noqa: E402
from ckpt.integrations.lightning.pytorch_lightning import CheckpointCallback  # noqa: E402
from ckpt.training import preservation_policies as pp  # noqa: E402
from ckpt.training import save_decision_policies as sdp  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "lightning_run.py"
EXAMPLE = procs.REPO / "examples" / "lightning_train.py"


class Run:
    """The training script, started now in its own process group; ``result()`` waits for it (bounded)
    and kills whatever is left of it (a DDP worker included)."""

    def __init__(self, *args: str):
        self.proc = procs.start(SCRIPT, *args)
        self._result: tuple[int, str] | None = None

    def result(self, timeout: float = 150) -> tuple[int, str]:
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=timeout)
            finally:
                procs.stop(self.proc)
            self._result = (self.proc.returncode, out)
        return self._result


def finished(*args: str) -> str:
    code, out = Run(*args).result()
    assert code == 0 and "finished at step" in out, out[-3000:]
    return out


def steps_in(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def started_at(out: str) -> int:
    return int(re.search(r"rank 0 started at step (\d+)", out).group(1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(*flags)`` starts (once per flags) an uninterrupted run without the callback, in the
    background, and returns a function that waits for it and returns its final state."""
    runs: dict[tuple[str, ...], tuple[Run, Path]] = {}

    def start(*flags: str):
        if flags not in runs:
            out = tmp_path_factory.mktemp("reference") / "final.pt"
            runs[flags] = (Run("--no-callback", "--out", str(out), *flags), out)
        run, out = runs[flags]

        def final_state() -> dict:
            code, log = run.result()
            assert code == 0 and "finished at step" in log, log[-3000:]
            return torch.load(out)

        return final_state

    yield start
    for run, _ in runs.values():
        procs.stop(run.proc)


def kill_then_restart(tmp_path: Path, *flags: str, kill_at: int,
                      in_flight: bool = False) -> tuple[list[int], str, dict]:
    """Runs until step ``kill_at``, SIGKILLs the run, runs the same command again; returns the steps on
    disk after the kill, and the second run's output and final state."""
    directory, out = tmp_path / "ckpt", tmp_path / "final.pt"
    common = ("--dir", str(directory), "--out", str(out), *flags)
    code, log = Run(*common, "--kill-at", str(kill_at), *(["--kill-in-flight"] if in_flight else [])).result()
    assert code == -9 and f"killing at step {kill_at}" in log, log[-3000:]
    killed = steps_in(directory)
    return killed, finished(*common), torch.load(out)


# ----------------------------------------------------------------------------- resume equivalence
@pytest.mark.parametrize("flags", [
    ("--max-steps", "30"),  # 20 batches per epoch: mid-epoch, last batch and next epoch
    ("--max-steps", "16", "--accumulate", "2", "--samples", "336"),  # 21 batches: a lone last one
], ids=["shuffle_dropout_lr_schedule", "accumulate_grad_batches_2"])
def test_resuming_from_any_saved_step_gives_the_uninterrupted_final_state_bit_for_bit(flags):
    result = procs.run_script(SCRIPT, "--sweep", "--policy", "every:1000", *flags, timeout=400)
    lines = re.findall(r"^sweep (\d+) (.+)$", result.stdout, re.M)
    assert lines, result.stdout[-2000:] + result.stderr[-3000:]
    assert [status for _, status in lines] == ["ok"] * int(flags[1]), lines


def test_sigkill_after_fixed_interval_checkpoint_with_accumulation_resumes_exactly_keeping_latest_n(
        tmp_path, reference):
    expected = reference("--max-steps", "16", "--accumulate", "2")
    flags = ("--max-steps", "16", "--accumulate", "2", "--policy", "every:4", "--preserve", "latest:2")
    killed, out, final = kill_then_restart(tmp_path, *flags, kill_at=10)  # 10 steps per epoch
    assert killed == [4, 8]
    assert started_at(out) == 8
    assert steps_in(tmp_path / "ckpt") == [12, 16]
    assert same(final, expected())


def test_sigkill_with_monitor_keeps_the_best_and_latest_steps_and_resumes_exactly(tmp_path, reference):
    expected = reference("--max-steps", "24")
    flags = ("--max-steps", "24", "--policy", "every:3", "--monitor", "train_loss")
    directory, out = tmp_path / "ckpt", tmp_path / "final.pt"
    code, log = Run("--dir", str(directory), "--out", str(out), *flags, "--kill-at", "13").result()
    assert code == -9, log[-3000:]
    losses = {int(s): float(v) for s, v in re.findall(r"^step (\d+) train_loss (\S+)$", log, re.M)}
    best = min((s for s in losses if s % 3 == 0 and s <= 12), key=losses.get)
    assert steps_in(directory) == sorted({best, 12})
    resumed = finished("--dir", str(directory), "--out", str(out), *flags)
    assert started_at(resumed) == 12
    assert same(torch.load(out), expected())


def test_sigkill_while_a_save_is_in_flight_resumes_from_the_last_committed_step_and_leaves_no_partial_step(
        tmp_path, reference):
    expected = reference("--max-steps", "24")
    # every step is saved; the run is killed right after handing step 13 to the background writer
    killed, out, final = kill_then_restart(tmp_path, "--max-steps", "24", "--policy", "every:1", kill_at=13,
                                           in_flight=True)
    assert killed[-1] in (12, 13) and started_at(out) == killed[-1]
    assert not [p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.isdigit() and not p.name.startswith(".")]
    assert same(final, expected())


def test_sigterm_saves_the_current_step_then_lightning_stops_and_a_restart_resumes_exactly(tmp_path, reference):
    expected = reference("--max-steps", "24")
    directory, out = tmp_path / "ckpt", tmp_path / "final.pt"
    flags = ("--dir", str(directory), "--out", str(out), "--max-steps", "24", "--policy", "every:5")
    code, log = Run(*flags, "--sigterm-at", "13").result()
    assert "finished at step" not in log and steps_in(directory) == [5, 10, 13], log[-3000:]
    resumed = finished(*flags)
    assert started_at(resumed) == 13
    assert same(torch.load(out), expected())


def test_two_callbacks_keep_their_own_steps_and_the_newest_step_of_either_resumes_exactly(tmp_path, reference):
    """A periodic callback and one keeping the best step, as with two ModelCheckpoints: the restart resumes
    once, from the newest step of the two directories, and each callback goes on with its own steps."""
    expected = reference("--max-steps", "24")
    second = tmp_path / "second"
    flags = ("--max-steps", "24", "--policy", "every:5", "--sync-save", "--second-dir", str(second))
    killed, out, final = kill_then_restart(tmp_path, *flags, kill_at=13)
    assert killed == [5, 10]
    assert started_at(out) == 12  # the second directory's step 12 is newer than the first's 10
    assert re.findall(r"Restored all states from the ckpt checkpoint at (\S+)", out) == [str(second / "12")]
    assert steps_in(tmp_path / "ckpt") == [5, 10, 15, 20, 24]
    assert steps_in(second)[-1] == 24
    assert same(final, expected())


def test_a_directory_written_before_the_state_key_named_it_resumes_exactly(tmp_path):
    """Older versions stored the callback's state under the key "CheckpointCallback"."""
    expected = final_state(train(parse_args(["--max-steps", "30"]), None, kill=False))
    train(parse_args(["--max-steps", "13"]), str(tmp_path / "new"), kill=False)
    checkpoint = translate.read(str(tmp_path / "new" / "13"))
    checkpoint["callbacks"] = {"CheckpointCallback" if k.startswith("CheckpointCallback") else k: v
                               for k, v in checkpoint["callbacks"].items()}
    with ckpt.Checkpointer(tmp_path / "old") as old:
        old.save_checkpointables(13, translate.to_checkpointables(checkpoint), force=True)
    trainer = train(parse_args(["--max-steps", "30"]), str(tmp_path / "old"), kill=False)
    assert trainer.lightning_module.started_at == 13
    assert same(final_state(trainer), expected)


def test_ddp_two_processes_agree_write_once_survive_sigkill_and_resume_exactly(tmp_path, reference):
    expected = reference("--ddp", "--max-steps", "20")
    flags = ("--ddp", "--max-steps", "20", "--policy", "every:4")
    killed, out, final = kill_then_restart(tmp_path, *flags, kill_at=14)  # 10 batches per rank and epoch
    assert killed == [4, 8, 12]
    assert "rank 0 started at step 12 of 2 ranks" in out and "rank 1 started at step 12 of 2 ranks" in out, out
    assert steps_in(tmp_path / "ckpt") == [4, 8, 12, 16, 20]
    assert same(final, expected())


def test_resumed_mid_epoch_by_another_number_of_processes_is_warned_of(tmp_path, caplog):
    """Each of the saved run's processes trained its own share of the epoch, which no run of another size can
    continue (Lightning replays the epoch, with its warning of a loader that is not resumable); the callback went on
    after the saved batch count of one process's share at one process, and silenced Lightning's warning."""
    finished("--ddp", "--dir", str(tmp_path), "--max-steps", "6", "--policy", "every:4", "--out", str(tmp_path / "o"))
    with caplog.at_level(logging.WARNING):
        trainer = train(parse_args(["--max-steps", "8"]), str(tmp_path), kill=False)
    assert trainer.lightning_module.started_at == 6
    warned = [r.getMessage() for r in caplog.records if "processes" in r.getMessage()]
    assert warned == ["ckpt: step 6 was saved mid-epoch by 2 processes and this run has 1: each process trained its "
                      "own share of epoch 0's samples, so the rest of the epoch cannot be the samples the saved run had "
                      "left; it goes on after batch 6 of each process's share at 1 processes (some samples are seen "
                      "twice in this epoch, others not at all). Resume with 2 processes, or from a step saved at an "
                      "epoch's end, to continue exactly."]


def test_ddp_a_stop_on_rank_0_alone_saves_its_step_on_every_rank(tmp_path):
    """A save that rank 0 forces (its ``should_stop``, its SIGTERM) is forced on every rank: each rank's own
    flag made rank 1 save without ``force`` and every rank raise "process 1 saves step 6 without force=True",
    losing the step. (Lightning does not share this stop: rank 0 ends, then rank 1 loses its peer.)"""
    code, log = Run("--ddp", "--dir", str(tmp_path / "ckpt"), "--max-steps", "20", "--policy", "every:4",
                    "--stop-rank0-at", "6").result()
    assert "force=True" not in log and steps_in(tmp_path / "ckpt") == [4, 6], log[-3000:]


def test_example_resumes_where_it_stopped(tmp_path):
    directory = str(tmp_path / "run")
    first = procs.run_script(EXAMPLE, "--dir", directory, "--max-steps", "12", "--save-every", "5", timeout=120)
    assert "finished at step 12" in first.stdout, first.stdout + first.stderr[-3000:]
    second = procs.run_script(EXAMPLE, "--dir", directory, "--max-steps", "20", "--save-every", "5", timeout=120)
    assert f"Restored all states from the ckpt checkpoint at {directory}/12" in second.stdout + second.stderr
    assert "finished at step 20" in second.stdout and "[12, 15, 20]" in second.stdout, second.stdout


# ---------------------------------------------------------------------------- in-process behaviour
@pytest.mark.parametrize("first, second, start", [
    (("--max-steps", "-1", "--max-epochs", "1"), ("--max-steps", "-1", "--max-epochs", "2"), 20),
    (("--max-steps", "30"), ("--max-steps", "45"), 30),  # the final save came after max_steps, mid-epoch
    # Lightning counts an epoch that max_steps or a stop cuts short as completed: a resume from a save
    # taken after that skipped the epoch's other batches
    (("--max-steps", "30"), ("--max-steps", "-1", "--max-epochs", "3"), 30),
    # Timer's max_time (1 microsecond: up after the first step); the run started again has none
    (("--max-steps", "-1", "--max-epochs", "3", "--max-time-us", "1"), ("--max-steps", "-1", "--max-epochs", "3"), 1),
], ids=["max_epochs", "max_steps", "max_steps_then_max_epochs", "stopped_by_max_time"])
def test_extending_a_finished_run_continues_as_if_it_had_never_stopped(tmp_path, first, second, start):
    expected = final_state(train(parse_args(list(second)), None, kill=False))
    train(parse_args(["--policy", "every:7", *first]), str(tmp_path), kill=False)
    trainer = train(parse_args(["--policy", "every:7", *second]), str(tmp_path), kill=False)
    assert trainer.lightning_module.started_at == start
    assert same(final_state(trainer), expected)


def test_a_fit_whose_max_epochs_is_below_the_restored_steps_epoch_trains_nothing_and_ends_that_epoch_unfinished(
        tmp_path):
    """Lightning skips such a fit and counts the restored epoch as not ended (its own resume from the step does);
    the epoch end of a run that max_steps or max_time ended mid-epoch is not to be run there."""
    train(parse_args(["--policy", "every:25", "--max-steps", "-1", "--max-epochs", "2"]), str(tmp_path), kill=False)
    shutil.rmtree(tmp_path / "40")  # killed after step 25, mid-epoch 1
    trainer = train(parse_args(["--max-steps", "-1", "--max-epochs", "1"]), str(tmp_path), kill=False)
    assert (trainer.global_step, trainer.current_epoch) == (25, 1)



def fit(directory: Path, *, model: pl.LightningModule | None = None, max_steps: int = 4, **kwargs):
    """A small fit in this process; returns the trainer and its callback."""
    pl.seed_everything(0, verbose=False)
    trainer_kwargs = {k: kwargs.pop(k) for k in ("accumulate_grad_batches",) if k in kwargs}
    ckpt_path = kwargs.pop("ckpt_path", None)
    callback = CheckpointCallback(directory, **kwargs)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(model or example.Regressor(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True),
                ckpt_path=ckpt_path)
    return trainer, callback


class RecordingPolicy:
    """A save-decision policy that saves every step and records which steps it was asked about."""

    def __init__(self):
        self.asked: list[int] = []

    def should_save(self, step, previous_steps, *, context):
        self.asked.append(step.step)
        return True


def test_one_decision_per_global_step_under_gradient_accumulation(tmp_path):
    policy = RecordingPolicy()
    fit(tmp_path, max_steps=5, accumulate_grad_batches=3, save_decision_policy=policy)
    assert policy.asked == [1, 2, 3, 4, 5]
    assert steps_in(tmp_path) == [1, 2, 3, 4, 5]


def test_a_trainer_fits_again_after_the_callback_is_taken_out_of_it(tmp_path):
    """The callback leaves its fit-start callback in the Trainer; the next fit of a Trainer whose callbacks no longer
    hold it raised ValueError: '<CheckpointCallback object> is not in list'."""
    trainer, callback = fit(tmp_path, max_steps=3)
    trainer.callbacks = [c for c in trainer.callbacks if c is not callback]
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(trainer.lightning_module, DataLoader(example.synthetic_data(), batch_size=16, shuffle=True))
    assert trainer.global_step == 6 and steps_in(tmp_path)[-1] == 3


def test_callback_is_the_trainers_checkpoint_callback_and_exposes_best_and_last_paths(tmp_path):
    trainer, callback = fit(tmp_path, max_steps=6, monitor="train_loss", mode="min",
                            save_decision_policy=sdp.FixedIntervalPolicy(2), preservation_policy=pp.LatestN(1))
    assert trainer.checkpoint_callback is callback
    assert not [c for c in trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    checkpoints = callback.checkpointer.checkpoints
    best = min(checkpoints, key=lambda c: c.metrics["train_loss"])
    assert callback.last_model_path == str(tmp_path / "6")
    assert callback.best_model_path == str(best.path)
    assert all(math.isfinite(c.metrics["train_loss"]) for c in checkpoints)



@pytest.mark.parametrize("ours", [1, 2])
def test_a_model_checkpoint_listed_after_the_callback_runs_before_it_and_the_callback_stays_the_first_after_fit(
        tmp_path, ours):
    """The callback's saves run after the other callbacks' hooks (its step then holds the ModelCheckpoint state
    naming the file it saved at the step: tests/lightning_matrix.py's model_checkpoint_listed_after_ours); after
    fit the Trainer has the order given, so that ckpt_path="best" reads the callback listed first. With two
    CheckpointCallbacks the ModelCheckpoint stayed first: the second's setup added a callback after the first
    recorded the order given."""
    callback = CheckpointCallback(tmp_path / "ckpt", save_decision_policy=sdp.FixedIntervalPolicy(2))
    others = [CheckpointCallback(tmp_path / "other", restore=False)] if ours == 2 else []
    model_checkpoint = pl.callbacks.ModelCheckpoint(tmp_path / "lightning", every_n_train_steps=2)
    trainer = pl.Trainer(max_steps=2, callbacks=[callback, *others, model_checkpoint], accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    given = list(trainer.callbacks)
    model = ReadsTheCheckpointCallbackAtFitEnd()
    trainer.fit(model, DataLoader(example.synthetic_data(), batch_size=16))
    saved = translate.read(callback.last_model_path)["callbacks"][model_checkpoint.state_key]
    assert Path(saved["best_model_path"]).name == "epoch=0-step=2.ckpt"
    assert [c for c in trainer.callbacks if c in given] == given and trainer.checkpoint_callback is callback
    assert model.read_at_fit_end is callback


class ReadsTheCheckpointCallbackAtFitEnd(example.Regressor):
    def on_fit_end(self):
        self.read_at_fit_end = self.trainer.checkpoint_callback

class ValidatedAt(example.Regressor):
    """Logs a ``val_loss`` chosen by the step it is validated at."""

    VAL_LOSS = {4: 1.0, 8: 5.0, 12: 6.0}

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.VAL_LOSS.get(self.trainer.global_step, 9.0))


@pytest.mark.parametrize("stops", [[14], [6, 14]], ids=["one_fit", "resumed_between_validations"])
def test_monitor_scores_a_step_only_by_a_validation_run_since_the_previous_save(tmp_path, stops):
    """Every step is saved, validation runs every 4: steps 5-7 must not carry step 4's val_loss, or the
    latest of them would be kept as the best (as ModelCheckpoint does, step 4 is)."""
    for max_steps in stops:
        pl.seed_everything(0, verbose=False)
        callback = CheckpointCallback(tmp_path, monitor="val_loss", save_decision_policy=sdp.FixedIntervalPolicy(1),
                                      async_save=False)
        trainer = pl.Trainer(max_steps=max_steps, val_check_interval=4, check_val_every_n_epoch=None,
                             num_sanity_val_steps=0, callbacks=[callback], accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(ValidatedAt(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True),
                    DataLoader(example.synthetic_data(32), batch_size=16))
    assert callback.best_model_path == str(tmp_path / "4")
    assert {c.step: c.metrics.get("val_loss") for c in callback.checkpointer.checkpoints} == {4: 1.0, 14: None}
    assert CheckpointCallback(tmp_path, monitor="val_loss").best_model_path == str(tmp_path / "4")


class ValidatesEachEpoch(example.Regressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))


def test_a_fit_with_a_larger_max_epochs_after_early_stopping_trains_on_as_lightnings_own_resume_and_stops_again(
        tmp_path):
    """EarlyStopping stopped the first fit at epoch 1; a fit of a larger max_epochs from its last step trains
    epoch 2 and stops again, EarlyStopping's wait_count restored (a recorded stop ended every later fit at once);
    the same command run again still ends at once. Deterministic data without dropout: Lightning's own resume
    does not restore the RNG states."""
    def fit_until_stopped(max_epochs: int, directory: Path | None = None, ckpt_path: Path | None = None):
        pl.seed_everything(0, verbose=False)
        stopping = pl.callbacks.EarlyStopping("val_loss", patience=1, min_delta=100.0)  # stops at each 2nd check
        saving = (CheckpointCallback(directory) if directory else
                  pl.callbacks.ModelCheckpoint(tmp_path / "lightning", save_last=True))
        trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[stopping, saving], num_sanity_val_steps=0,
                             accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        data = DataLoader(example.synthetic_data(64), batch_size=16)
        trainer.fit(ValidatesEachEpoch(dropout=0.0), data, data, ckpt_path=ckpt_path)
        return trainer, stopping.state_dict()

    assert fit_until_stopped(10)[0].global_step == 8
    lightning, lightnings_stopping = fit_until_stopped(20, ckpt_path=tmp_path / "lightning" / "last.ckpt")
    assert fit_until_stopped(10, tmp_path / "ckpt")[0].global_step == 8
    ours, our_stopping = fit_until_stopped(20, tmp_path / "ckpt")
    assert (ours.global_step, lightning.global_step) == (12, 12)
    assert same(final_state(ours), final_state(lightning)) and same(our_stopping, lightnings_stopping)
    again, _ = fit_until_stopped(20, tmp_path / "ckpt")
    assert again.global_step == 12 and same(final_state(again), final_state(ours))


class StopsAtStep5(example.Regressor):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 5:
            self.trainer.should_stop = True  # held back by min_epochs
        return super().training_step(batch, batch_idx)


def test_a_stop_min_epochs_holds_back_is_restored_in_a_fit_of_other_bounds_and_ends_it_when_they_are_met(tmp_path):
    """The stop requested at step 5 did not end the fit (min_epochs=4: it ends at step 16, 4 batches an epoch); a
    fit of a larger max_epochs resumed from step 10 keeps it, as the run never stopped did, and ends at step 16."""
    def fit_to(max_epochs: int, directory: Path | None = None) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        callbacks = [CheckpointCallback(directory, save_decision_policy=sdp.FixedIntervalPolicy(5))] if directory else []
        trainer = pl.Trainer(max_epochs=max_epochs, min_epochs=4, callbacks=callbacks, enable_checkpointing=bool(directory),
                             accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(StopsAtStep5(), DataLoader(example.synthetic_data(64), batch_size=16, shuffle=True))
        return trainer

    expected = fit_to(8)
    assert fit_to(6, tmp_path).global_step == expected.global_step == 16
    shutil.rmtree(tmp_path / "15")
    shutil.rmtree(tmp_path / "16")  # as if killed after step 10
    resumed = fit_to(8, tmp_path)
    assert resumed.global_step == 16 and same(final_state(resumed), final_state(expected))


class BestAtTheEnd(ValidatedAt):
    VAL_LOSS = {4: 5.0, 8: 1.0}


def test_the_step_max_steps_ends_at_is_saved_after_its_validation(tmp_path):
    """It was saved at once, before the validation due at it: its metrics lacked that validation's val_loss,
    so a best last step was not best_model_path (ModelCheckpoint's is), and a longer run resumed from it
    skipped that validation (EarlyStopping, plateau schedulers and callback_metrics without it)."""
    callback = CheckpointCallback(tmp_path, monitor="val_loss", save_decision_policy=sdp.FixedIntervalPolicy(4),
                                  async_save=False)
    trainer = pl.Trainer(max_steps=8, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                         callbacks=[callback], accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(BestAtTheEnd(), DataLoader(example.synthetic_data(), batch_size=16),
                DataLoader(example.synthetic_data(32), batch_size=16))
    assert callback.best_model_path == str(tmp_path / "8")
    assert callback.checkpointer.checkpoints[-1].metrics["val_loss"] == 1.0


@pytest.mark.parametrize("every_n_epochs, saved", [(1, [4, 12, 16]), (2, [4, 13, 16])])
def test_a_save_waiting_for_a_validation_that_does_not_run_is_taken_at_the_next_step(tmp_path, every_n_epochs, saved):
    """A validation loader without batches: Lightning skips the validation due at steps 4 and 12 and its
    ``on_validation_end``, where their saves waited; they went to the epoch's end (steps 8 and 16), where the
    policy declined them, and step 16 counted as saved: the fit ended with no checkpoint at all. A loader
    Lightning has made (at the start of an epoch that validates) is known to be empty, and such a step is
    saved at once; at step 12 of the second (every_n_epochs=2) it is not yet made."""
    callback = CheckpointCallback(tmp_path, save_decision_policy=sdp.SpecificStepsPolicy([4, 12]))
    trainer = pl.Trainer(max_epochs=2, val_check_interval=0.5, check_val_every_n_epoch=every_n_epochs,
                         num_sanity_val_steps=0, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    empty = DataLoader(torch.utils.data.Subset(example.synthetic_data(), []), batch_size=16)
    trainer.fit(ValidatedAt(), DataLoader(example.synthetic_data(128), batch_size=16), empty)  # 8 batches an epoch
    assert [c.step for c in callback.checkpointer.checkpoints] == saved


def test_a_bound_at_a_step_whose_validation_has_no_batches_extends_as_if_it_had_never_stopped(tmp_path):
    """The step max_steps ends at waits for its validation; one that Lightning skips (no batches) left the save
    to the end of the epoch the bound cut short, and the longer run started the next epoch instead of its rest."""
    def fit_to(directory, max_steps):
        pl.seed_everything(0, verbose=False)
        only_the_last = sdp.SpecificStepsPolicy([])
        callbacks = [CheckpointCallback(directory, save_decision_policy=only_the_last)] if directory else []
        trainer = pl.Trainer(max_steps=max_steps, val_check_interval=0.5, num_sanity_val_steps=0, callbacks=callbacks,
                             enable_checkpointing=bool(directory), accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False)
        empty = DataLoader(torch.utils.data.Subset(example.synthetic_data(), []), batch_size=16)
        trainer.fit(ValidatedAt(), DataLoader(example.synthetic_data(128), batch_size=16, shuffle=True), empty)
        return trainer

    expected = final_state(fit_to(None, 12))
    fit_to(tmp_path, 4)
    assert same(final_state(fit_to(tmp_path, 12)), expected)


def test_a_monitor_that_no_step_logged_is_warned_of_at_the_end_of_fit(tmp_path, caplog):
    """Lightning's ModelCheckpoint raises for a monitored key it cannot find; steps saved before a
    validation lack a validation metric, so the callback says it once the fit is over."""
    with caplog.at_level(logging.WARNING):
        fit(tmp_path / "misspelt", max_steps=4, monitor="train_los", save_decision_policy=sdp.FixedIntervalPolicy(2))
    warned = [r.getMessage() for r in caplog.records if "monitor=" in r.getMessage()]
    assert warned == ["ckpt: monitor='train_los' is in the metrics of none of the steps, so none is kept as the "
                      "best and best_model_path is ''. Metrics logged: ['train_loss'] (did you mean 'train_loss'?)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fit(tmp_path / "right", max_steps=4, monitor="train_loss", save_decision_policy=sdp.FixedIntervalPolicy(2))
    assert not [r for r in caplog.records if "monitor=" in r.getMessage()]


class UploadsModels(pl.loggers.CSVLogger):
    """A logger told to upload the model's checkpoints, as ``WandbLogger(log_model=True)`` or ``MLFlowLogger``'s
    (which need their services): it records the paths ``after_save_checkpoint`` hands it, as they scan them."""

    def __init__(self, save_dir):
        super().__init__(save_dir)
        self._log_model = True
        self.uploaded: list[str] = []

    def after_save_checkpoint(self, checkpoint_callback):
        self.uploaded.append(Path(checkpoint_callback.best_model_path).name)


def test_a_logger_told_to_upload_the_models_checkpoints_is_warned_of(tmp_path, caplog):
    """(WandbLogger(log_model=True) and MLFlowLogger's upload the .ckpt files ModelCheckpoint gives them in
    after_save_checkpoint; beside the callback alone they recorded no model, without a word.) A ModelCheckpoint
    beside the callback still gives them its files."""
    def run(directory, *extra):
        pl.seed_everything(0, verbose=False)
        logger = UploadsModels(tmp_path / "logs")
        trainer = pl.Trainer(max_steps=4, callbacks=[CheckpointCallback(directory), *extra], accelerator="cpu",
                             logger=logger, enable_progress_bar=False, enable_model_summary=False)
        with caplog.at_level(logging.WARNING):
            trainer.fit(example.Regressor(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True))
        return logger.uploaded, [r.getMessage() for r in caplog.records if "log_model" in r.getMessage()]

    uploaded, warned = run(tmp_path / "alone")
    assert uploaded == [] and len(warned) == 1
    assert warned[0].startswith("ckpt: UploadsModels(log_model=True) uploads the .ckpt files of Lightning's "
                                "ModelCheckpoint; a CheckpointCallback's steps are directories")
    caplog.clear()
    uploaded, _ = run(tmp_path / "beside", pl.callbacks.ModelCheckpoint(tmp_path / "files", every_n_train_steps=2))
    assert uploaded == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]


class HydraConfigured(example.Regressor):
    """A module made from a Hydra config, which it saves as its hyperparameters (Lightning stores the DictConfig and
    its class)."""

    def __init__(self, cfg):
        super().__init__(hidden=cfg.model.hidden, lr=cfg.lr)
        self.save_hyperparameters(cfg)


def test_hyperparameters_of_a_hydra_config_are_saved_and_loaded_as_the_config(tmp_path):
    """(``save_hyperparameters(cfg)`` of a DictConfig failed every fit with the callback at its start: "checkpoint
    ['hyper_parameters'] is a omegaconf.dictconfig.DictConfig", then its class in 'hparams_type'.)"""
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"model": {"hidden": 8}, "lr": 0.1, "lr_step_size": 20, "name": "${model.hidden}"})
    fit(tmp_path, model=HydraConfigured(cfg), max_steps=2)
    stored = ckpt.load_checkpointables(str(tmp_path / "2"), {"trainer": None})["trainer"]
    assert stored["hyper_parameters"]["name"] == "${model.hidden}" and stored["hparams_type"] == "DictConfig"
    loaded = load_from_checkpoint(HydraConfigured, tmp_path)
    assert isinstance(loaded.hparams, omegaconf.DictConfig) and loaded.hparams == cfg and loaded.hparams.name == 8
    trainer, _ = fit(tmp_path, model=HydraConfigured(cfg), max_steps=4)
    assert trainer.global_step == 4 and steps_in(tmp_path)[-1] == 4


class HoldsHydraConfigs(example.Regressor):
    """Keeps the configs it is made from among its hyperparameters, as ``save_hyperparameters()`` in ``__init__(self,
    cfg: DictConfig)`` does, and in the checkpoint (Lightning pickles them)."""

    def __init__(self, cfg, schedule=None):
        super().__init__(hidden=cfg.hidden)
        self.save_hyperparameters()
        self.loaded: list = []

    def on_save_checkpoint(self, checkpoint):
        checkpoint["config"] = {"runs": [self.hparams.cfg]}

    def on_load_checkpoint(self, checkpoint):
        self.loaded.append(checkpoint["config"]["runs"][0])


def test_hydra_configs_held_in_hyperparameters_or_anywhere_in_the_checkpoint_are_saved_and_loaded_as_configs(tmp_path):
    """(A DictConfig or ListConfig held in the hyperparameters failed every fit with the callback at its start:
    "checkpoint['hyper_parameters']['cfg'] is a omegaconf.dictconfig.DictConfig"; so did one an on_save_checkpoint
    added.) The callback's restore and a fit given the step as ckpt_path= get them too, as from Lightning's own file."""
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"hidden": 8, "name": "${hidden}"})
    schedule = {"milestones": omegaconf.OmegaConf.create([2, 4]), "gamma": 0.5}
    fit(tmp_path, model=HoldsHydraConfigs(cfg, schedule), max_steps=2)
    stored = ckpt.load_checkpointables(str(tmp_path / "2"), {"trainer": None})["trainer"]
    assert stored["hyper_parameters"]["cfg"]["name"] == "${hidden}"
    assert stored["omegaconf_configs_at"] == [[["hyper_parameters", "cfg"], "DictConfig"],
                                              [["hyper_parameters", "schedule", "milestones"], "ListConfig"],
                                              [["config", "runs", 0], "DictConfig"]]
    loaded = load_from_checkpoint(HoldsHydraConfigs, tmp_path).hparams
    assert isinstance(loaded.cfg, omegaconf.DictConfig) and loaded.cfg == cfg and loaded.cfg.name == 8
    assert isinstance(loaded.schedule["milestones"], omegaconf.ListConfig) and loaded.schedule == schedule
    read = translate.read(str(tmp_path / "2"))
    assert "omegaconf_configs_at" not in read and isinstance(read["hyper_parameters"]["cfg"], omegaconf.DictConfig)
    for directory, ckpt_path in ((tmp_path, None), (tmp_path / "other", tmp_path / "2")):
        trainer, _ = fit(directory, model=HoldsHydraConfigs(cfg, schedule), max_steps=4, ckpt_path=ckpt_path)
        assert trainer.global_step == 4 and trainer.lightning_module.loaded == [cfg]
        assert isinstance(trainer.lightning_module.loaded[0], omegaconf.DictConfig)


@pytest.mark.parametrize("configs_at, refused", [
    ({"cfg": "DictConfig"}, "omegaconf_configs_at is 'dict', where ckpt stores a list of [key path, class name]"),
    ([[["hyper_parameters", "cfg"], "Popen"]], "omegaconf_configs_at holds [['hyper_parameters', 'cfg'], 'Popen'], "
                                               "where ckpt stores [key path, one of"),
    ([[[], "DictConfig"]], "omegaconf_configs_at holds [[], 'DictConfig'], where"),
    ([[["hyper_parameters", "missing"], "DictConfig"]],
     "omegaconf_configs_at names checkpoint['hyper_parameters']['missing'], which it does not hold"),
    ([[["hyper_parameters", "cfg", 3], "DictConfig"]],
     "omegaconf_configs_at names checkpoint['hyper_parameters']['cfg'][3], which it does not hold"),
    ([[["hyper_parameters", "cfg"], "ListConfig"]],
     "checkpoint['hyper_parameters']['cfg'] are stored as a ListConfig, and hold 'dict', not a list"),
], ids=["no list", "class", "the root", "missing key", "index into a dict", "wrong class"])
def test_a_record_of_configs_that_leads_nowhere_is_a_damaged_checkpoint_naming_the_step(tmp_path, configs_at, refused):
    pytest.importorskip("omegaconf")
    trainer = {"hyper_parameters": {"cfg": {"hidden": 8}}, "omegaconf_configs_at": configs_at,
               "pytorch-lightning_version": pl.__version__}
    ckpt.save_checkpointables(tmp_path / "1", {"model": example.Regressor().state_dict(), "trainer": trainer})
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=re.escape(f"{tmp_path / '1'}: its ")) as raised:
        load_from_checkpoint(example.Regressor, tmp_path)
    assert refused in str(raised.value)


class TakesAnOptimizerFactory(example.Regressor):
    def __init__(self, optimizer=None):
        super().__init__()
        self.save_hyperparameters()


def test_a_hyperparameter_ckpt_cannot_store_is_refused_at_fit_start_naming_it_and_how_to_leave_it_out(tmp_path):
    """(The refusal named the key, then said "for example with `save_hyperparameters(ignore=[...])`".)"""
    import functools
    model = TakesAnOptimizerFactory(functools.partial(torch.optim.Adam, lr=1e-3))
    with pytest.raises(TypeError, match=re.escape(
            "checkpoint['hyper_parameters']['optimizer'] is a functools.partial: ") + ".*" + re.escape(
            "It is the LightningModule's hyperparameter 'optimizer': leave it out with "
            "`self.save_hyperparameters(ignore=['optimizer'])` in its `__init__`")):
        fit(tmp_path, model=model, max_steps=2)
    assert steps_in(tmp_path) == []


def _nested(depth: int) -> dict:
    """A dict nested ``depth`` levels deep."""
    tree: dict = {}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


@pytest.mark.parametrize("trainer, refused", [
    ({"hyper_parameters": "!!python/object/apply:os.system ['echo x']", "hparams_type": "DictConfig"},
     "hyper_parameters are stored as a DictConfig, and hold 'str', not a dict"),  # (omegaconf reads a text as YAML)
    ({"hyper_parameters": {"lr": torch.ones(2)}, "hparams_type": "DictConfig"},
     "hyper_parameters are stored as a DictConfig, which cannot hold them"),
    ({"hyper_parameters": _nested(150), "hparams_type": "DictConfig"},  # (omegaconf raised RecursionError)
     "hyper_parameters are stored as a DictConfig, nested deeper than omegaconf can make one"),
    ({"hyper_parameters": 5, "pytorch-lightning_version": pl.__version__},
     "hyper_parameters are 'int', where Lightning stores a dict"),
    ({"hyper_parameters": {"hidden": 8}, "hparams_type": 7, "pytorch-lightning_version": pl.__version__},
     "hparams_type is 7, where Lightning stores the name"),
    ({"hyper_parameters": {}}, "'pytorch-lightning_version' is None, not the version of Lightning"),
    ({"pytorch-lightning_version": "x"}, "'pytorch-lightning_version' is 'x', not the version of Lightning"),
], ids=["text config", "array in config", "deep config", "int", "type", "no version", "version"])
def test_hyperparameters_that_lightning_never_stores_are_a_damaged_checkpoint_naming_the_step(tmp_path, trainer, refused):
    """(A step whose hyperparameters are no dict, whose class is no name, which 'hparams_type' says are a DictConfig
    that cannot hold them, or that records no Lightning version raised AttributeError "'int' object has no attribute
    'update'", TypeError "'int' object is not callable", yaml's ConstructorError, omegaconf's UnsupportedValueType,
    KeyError 'pytorch-lightning_version' or InvalidVersion, naming no step.)"""
    if trainer.get("hparams_type") == "DictConfig":
        pytest.importorskip("omegaconf")
    ckpt.save_checkpointables(tmp_path / "1", {"model": example.Regressor().state_dict(), "trainer": trainer})
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=re.escape(f"{tmp_path / '1'}: its {refused}")):
        load_from_checkpoint(example.Regressor, tmp_path)


class CountsSaves(example.Regressor):
    """Records the steps its ``on_save_checkpoint`` is called at."""

    def __init__(self):
        super().__init__()
        self.saved_at: list = []

    def on_save_checkpoint(self, checkpoint):
        self.saved_at.append(("module", self.trainer.global_step))


class CountsCallbackSaves(pl.Callback):
    def __init__(self, model):
        self.model = model

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.model.saved_at.append(("callback", trainer.global_step))


def test_on_save_checkpoint_hooks_run_once_per_saved_step_and_at_no_other(tmp_path):
    """The callback dumps the state before training and after the first step to prepare the memory of
    its saves; those dumps save nothing, so no hook may see them."""
    pl.seed_everything(0, verbose=False)
    model = CountsSaves()
    callback = CheckpointCallback(tmp_path, save_decision_policy=sdp.SpecificStepsPolicy([5]))
    trainer = pl.Trainer(max_steps=10, callbacks=[CountsCallbackSaves(model), callback], accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(example.synthetic_data(), batch_size=16, shuffle=True))
    assert steps_in(tmp_path) == [5, 10]
    assert model.saved_at == [("callback", 5), ("module", 5), ("callback", 10), ("module", 10)]
    assert "on_save_checkpoint" not in vars(model)  # the module's own method again


class LogsEpochLoss(example.Regressor):
    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


class RecordingLogger(pl.loggers.Logger):
    """Records what Lightning hands a logger (CSVLogger, TensorBoardLogger): each call's step and metrics."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, metrics))


@pytest.mark.parametrize("saved_at", [20, 13], ids=["epochs_end", "mid_epoch"])
def test_resumed_the_loggers_get_what_the_run_never_stopped_logged_after_the_saved_step_as_with_lightnings_files(
        tmp_path, saved_at):
    """Lightning sends the loggers a step's values (and at an epoch's end the epoch's metrics) right after the
    hook that saves the step: the run that saved it sent them, and neither a resume from ckpt nor Lightning's own
    from its file of the step sends them again (logger steps 0-39, 20 batches an epoch)."""
    def fit_logged(callbacks, ckpt_path=None) -> list:
        pl.seed_everything(0, verbose=False)
        logger = RecordingLogger()
        trainer = pl.Trainer(max_epochs=2, logger=logger, log_every_n_steps=1, accelerator="cpu",
                             enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
        trainer.fit(LogsEpochLoss(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True),
                    ckpt_path=ckpt_path)
        return logger.calls

    def ours():
        return CheckpointCallback(tmp_path / "ckpt", save_decision_policy=sdp.SpecificStepsPolicy([saved_at]))

    when = {"every_n_epochs": 1} if saved_at == 20 else {"every_n_train_steps": saved_at}
    uninterrupted = fit_logged([ours(), pl.callbacks.ModelCheckpoint(tmp_path / "lightning", save_top_k=-1, **when)])
    shutil.rmtree(tmp_path / "ckpt" / "40")
    resumed = fit_logged([ours()])
    assert resumed[0][0] == saved_at and resumed == uninterrupted[-len(resumed):]  # from the step after it
    lightnings = fit_logged([], ckpt_path=next((tmp_path / "lightning").glob(f"*step={saved_at}.ckpt")))
    assert [(step, metrics.keys()) for step, metrics in resumed] == [
        (step, metrics.keys()) for step, metrics in lightnings]


class EpochScheduled(LogsEpochLoss):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]  # per epoch


class Stream(torch.utils.data.IterableDataset):
    """The samples of ``example.synthetic_data(64)`` in order, without a length (Lightning knows an epoch's
    end only when the iterator ends)."""

    def __iter__(self):
        yield from example.synthetic_data(64)


@pytest.mark.parametrize("data", [
    lambda: DataLoader(example.synthetic_data(64), batch_size=16, shuffle=True),
    lambda: DataLoader(Stream(), batch_size=16),
], ids=["shuffled", "iterable_without_length"])
def test_a_run_that_max_steps_ends_at_an_epochs_last_batch_extends_as_if_it_had_never_stopped(tmp_path, data):
    """Saved at once, before the epoch's end (as mid-epoch), the longer run skipped that end (its hooks and
    metrics: epoch 1's train_loss_epoch averaged 8 batches), and without a length the next epoch (12 steps
    became 8)."""
    def fit_bounded(directory, **bounds) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        callbacks = [CheckpointCallback(directory)] if directory else []
        trainer = pl.Trainer(callbacks=callbacks, enable_checkpointing=bool(directory), accelerator="cpu",
                             logger=RecordingLogger(), log_every_n_steps=1, enable_progress_bar=False,
                             enable_model_summary=False, **bounds)
        trainer.fit(EpochScheduled(), data())  # 4 batches an epoch
        return trainer

    expected = fit_bounded(None, max_epochs=3)
    fit_bounded(tmp_path, max_steps=4)
    extended = fit_bounded(tmp_path, max_steps=-1, max_epochs=3)
    assert extended.lightning_module.global_step == 12 and same(final_state(extended), final_state(expected))
    logged = extended.logger.calls  # what the run never stopped logged after epoch 0 (whose end the first one logged)
    assert logged[0][0] == 4 and logged == expected.logger.calls[-len(logged):]


class ShortStream(torch.utils.data.IterableDataset):
    """The first 16 samples of ``Stream``: the data of a run resumed after it became shorter."""

    def __iter__(self):
        data = example.synthetic_data(64)
        yield from (data[i] for i in range(16))


def test_resumed_mid_epoch_into_an_iterable_dataset_now_shorter_than_the_saved_position_ends_that_epoch(
        tmp_path, caplog):
    """The epoch's replay ran out of batches (2 of the 3 trained) and the fit raised a bare StopIteration."""
    def fit_stream(dataset, **bounds) -> pl.Trainer:
        trainer = pl.Trainer(callbacks=[CheckpointCallback(tmp_path)], accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False, **bounds)
        trainer.fit(example.Regressor(), DataLoader(dataset, batch_size=8))
        return trainer

    fit_stream(Stream(), max_steps=11)  # 8 batches an epoch: saved after epoch 1's third
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        resumed = fit_stream(ShortStream(), max_epochs=3)  # 2 batches an epoch
    assert resumed.global_step == 11 + 2 * 1  # epoch 1 ends at once; epoch 2 trains its 2 batches
    assert "the training data of epoch 1 ended after 2 batches, where the checkpoint had trained 3" in caplog.text


@pytest.mark.parametrize("policy", [sdp.SpecificStepsPolicy([]), sdp.FixedIntervalPolicy(4)],
                         ids=["saved_at_train_end", "saved_at_the_epochs_end"])
def test_a_run_that_an_epoch_interval_timer_ends_extends_as_if_it_had_never_stopped(tmp_path, policy):
    """``Timer(interval="epoch")`` stops at an epoch's end, after the step's save was decided: the stop was
    recorded as one that code requested, and the longer run ended at once."""
    def fit_timed(directory, duration: datetime.timedelta) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        callbacks = [pl.callbacks.Timer(duration=duration, interval="epoch")]
        if directory:
            callbacks.append(CheckpointCallback(directory, save_decision_policy=policy))
        trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, enable_checkpointing=bool(directory),
                             accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(EpochScheduled(), DataLoader(example.synthetic_data(64), batch_size=16, shuffle=True))
        return trainer

    expected = fit_timed(None, datetime.timedelta(hours=1))
    assert fit_timed(tmp_path, datetime.timedelta(milliseconds=1)).global_step == 4  # 4 batches an epoch
    extended = fit_timed(tmp_path, datetime.timedelta(hours=1))
    assert extended.global_step == 12 and same(final_state(extended), final_state(expected))


def test_fast_dev_run_trains_its_batches_without_restoring_saving_or_taking_the_directory(tmp_path):
    """Lightning's smoke test of the code suppresses checkpointing: restored, it would start at the latest
    step and train no batch; and it may run beside the training that writes the directory."""
    fit(tmp_path, max_steps=6)
    steps = steps_in(tmp_path)
    with ckpt.Checkpointer(tmp_path, cleanup_tmp_directories=True):  # the training run, holding the directory
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(fast_dev_run=2, callbacks=[CheckpointCallback(tmp_path)], accelerator="cpu",
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(example.Regressor(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True))
    assert trainer.global_step == 2
    assert steps_in(tmp_path) == steps and steps[-1] == 6


def test_final_step_is_saved_on_train_end_when_the_policy_skips_it(tmp_path):
    fit(tmp_path, max_steps=5, save_decision_policy=sdp.FixedIntervalPolicy(2), async_save=False)
    assert steps_in(tmp_path) == [2, 4, 5]


def test_with_a_local_tier_steps_go_where_each_policy_wants_them_and_fit_resumes_from_the_newest(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(2))
    _, callback = fit(tmp_path / "durable", max_steps=5, save_decision_policy=sdp.FixedIntervalPolicy(3), local=local)
    assert steps_in(tmp_path / "durable") == [3, 5]  # the final step goes to both tiers
    assert steps_in(tmp_path / "local") == [4, 5]
    trainer, _ = fit(tmp_path / "durable", max_steps=6, save_decision_policy=sdp.FixedIntervalPolicy(3), local=local)
    assert trainer.global_step == 6 and steps_in(tmp_path / "durable") == [3, 5, 6]


def test_with_a_local_tier_a_damaged_local_copy_resumes_from_the_durable_copy_of_the_same_step(tmp_path, caplog):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(2))
    first, _ = fit(tmp_path / "durable", max_steps=4, save_decision_policy=sdp.FixedIntervalPolicy(4), local=local)
    assert steps_in(tmp_path / "durable") == [4] and steps_in(tmp_path / "local") == [2, 4]
    chunk = max((p for p in (tmp_path / "local" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        trainer, callback = fit(tmp_path / "durable", max_steps=4, save_decision_policy=sdp.FixedIntervalPolicy(4),
                                local=local)
    assert "step 4 on the local tier cannot be loaded" in caplog.text
    assert trainer.global_step == 4 and same(trainer.lightning_module.state_dict(), first.lightning_module.state_dict())


def test_load_weights_reads_the_latest_or_a_given_step_into_a_fresh_model(tmp_path):
    trainer, _ = fit(tmp_path, max_steps=4, save_decision_policy=sdp.FixedIntervalPolicy(2))
    fresh = example.Regressor()
    assert load_weights(fresh, tmp_path) == 4
    assert same(fresh.state_dict(), trainer.lightning_module.state_dict())
    assert load_weights(fresh, tmp_path, step=2) == 2
    assert not same(fresh.state_dict(), trainer.lightning_module.state_dict())
    with pytest.raises(ckpt.errors.StepNotFoundError, match="no checkpoint at step 3"):
        load_weights(fresh, tmp_path, step=3)


def test_load_weights_without_the_step_name_format_the_steps_were_saved_with_names_the_format_to_pass(tmp_path):
    """It said 'no checkpoints in DIR' of a directory full of steps (the callback given a step_name_format)."""
    named = ckpt.path.step.standard_name_format(step_prefix="step", step_format_fixed_length=6)
    with ckpt.Checkpointer(tmp_path, step_name_format=named) as checkpointer:
        checkpointer.save_checkpointables(3, {"model": {"w": torch.ones(2)}}, force=True)
    with pytest.raises(ckpt.errors.StepNotFoundError, match=r"no checkpoints in .*holds steps named step_000003.*pass "
                                                            r"step_name_format=ckpt.path.step.StandardNameFormat\("
                                                            r"step_prefix='step', step_format_fixed_length=6\)"):
        load_weights(torch.nn.Linear(2, 1), tmp_path)
    assert load_weights(torch.nn.Module(), tmp_path, step_name_format=named, strict=False) == 3


def test_load_weights_reads_the_weights_of_a_model_compiled_otherwise_than_the_one_saved(tmp_path):
    """A submodule compiled in training (``self.net = torch.compile(net)``: its keys hold ``net._orig_mod.``), read into
    the same model uncompiled for inference, or a model saved uncompiled into a compiled one, raised 'holds a different
    model ... missing keys [...]; unexpected keys [...]', as Lightning's own load does (Lightning issue 17415)."""
    def model(compiled: str = "") -> torch.nn.Module:
        torch.manual_seed(len(compiled))
        outer = torch.nn.Module()
        outer.net, outer.head = torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.nn.Linear(4, 2)
        if compiled == "net":
            outer.net = torch.compile(outer.net)  # (a wrapper: nothing is compiled before its first call)
        return torch.compile(outer) if compiled == "outer" else outer

    for saved_as, loaded_as in (("net", ""), ("", "net"), ("net", "outer"), ("outer", "net")):
        saved, fresh, run = model(saved_as), model(loaded_as), tmp_path / f"{saved_as or 0} to {loaded_as or 0}"
        with ckpt.Checkpointer(run) as checkpointer:
            checkpointer.save_checkpointables(1, {"model": saved.state_dict()}, force=True)
        assert load_weights(fresh, run) == 1
        assert same(list(fresh.state_dict().values()), list(saved.state_dict().values())), (saved_as, loaded_as)
    with pytest.raises(ValueError, match=r"missing keys \['0.weight', '0.bias'\]; unexpected keys \['net._orig_mod"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 4)), tmp_path / "net to 0")


def test_load_weights_refuses_two_saved_keys_that_differ_only_by_torch_compiles_segments(tmp_path):
    """(A saved model with a child named ``_orig_mod`` beside a compiled child: keys '_orig_mod.a.weight' and
    'a._orig_mod.weight' were both renamed to the plain model's 'a.weight', and one of them loaded without a word.)"""
    saved = torch.nn.Module()
    saved.add_module("_orig_mod", torch.nn.Module())
    saved._orig_mod.a, saved.a = torch.nn.Linear(2, 2), torch.compile(torch.nn.Linear(2, 2))
    with ckpt.Checkpointer(tmp_path) as checkpointer:
        checkpointer.save_checkpointables(1, {"model": saved.state_dict()}, force=True)
    plain = torch.nn.Module()
    plain.a = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"unexpected keys \['a._orig_mod.weight', 'a._orig_mod.bias'\]"):
        load_weights(plain, tmp_path)


def test_load_weights_refuses_a_saved_weight_that_is_no_tensor_naming_the_step_and_key(tmp_path):
    """(A step whose weight of the model's shape was stored as an array of text, or any value but a tensor, raised
    load_state_dict's RuntimeError 'expected torch.Tensor or Tensor-like object', naming no step.)"""
    state = example.Regressor().state_dict()
    state["net.0.weight"] = torch.zeros(state["net.0.weight"].shape).numpy().astype(str)
    ckpt.save_checkpointables(tmp_path / "1", {"model": state})
    with pytest.raises(ValueError, match=r"step 1 in .* holds a different model than this Regressor: 'net.0.weight' is "
                                         r"of type ndarray there, no tensor"):
        load_weights(example.Regressor(), tmp_path)


def test_a_step_directory_such_as_best_model_path_gives_its_weights_or_the_module_it_saved(tmp_path):
    trainer, callback = fit(tmp_path, model=example.Regressor(hidden=8, lr=0.02), max_steps=4,
                            save_decision_policy=sdp.FixedIntervalPolicy(2))
    trained = trainer.lightning_module.state_dict()
    fresh = example.Regressor(hidden=8)
    assert load_weights(fresh, callback.best_model_path) == 4 and same(fresh.state_dict(), trained)
    model = load_from_checkpoint(example.Regressor, callback.last_model_path)  # built from the saved hparams
    assert type(model) is example.Regressor and model.hparams.hidden == 8 and model.hparams.lr == 0.02
    assert same(model.state_dict(), trained)
    earlier = load_from_checkpoint(example.Regressor, tmp_path, step=2, lr=0.5)  # kwargs override, as in Lightning
    assert earlier.hparams.lr == 0.5 and not same(earlier.state_dict(), trained)
    with pytest.raises(ckpt.errors.StepNotFoundError, match="no checkpoint at step 3"):
        load_from_checkpoint(example.Regressor, tmp_path, step=3)
    with pytest.raises(TypeError, match=r"makes a LightningModule or LightningDataModule, and .*Linear.* is neither"):
        load_from_checkpoint(torch.nn.Linear, tmp_path)  # was a bare StopIteration


class CountingData(pl.LightningDataModule):
    """Saves its hyperparameters and counts the batches it gave (its state)."""

    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.given = 0

    def train_dataloader(self):
        return DataLoader(example.synthetic_data(), batch_size=self.hparams.batch_size)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.given += 1
        return batch

    def state_dict(self):
        return {"given": self.given}

    def load_state_dict(self, state):
        self.given = state["given"]


def test_load_from_checkpoint_makes_the_datamodule_a_step_saved(tmp_path):
    """As LightningDataModule.load_from_checkpoint does for a file; a DataModule class raised a bare StopIteration."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=3, callbacks=[CheckpointCallback(tmp_path)], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(example.Regressor(), datamodule=CountingData(batch_size=8))
    data = load_from_checkpoint(CountingData, tmp_path)
    assert type(data) is CountingData and data.hparams.batch_size == 8 and data.given == 3


def test_load_weights_reads_a_read_only_directory(tmp_path):
    trainer, _ = fit(tmp_path, max_steps=2, save_decision_policy=sdp.FixedIntervalPolicy(2))
    fresh = example.Regressor()
    with fsutil.read_only(tmp_path):  # an evaluation job that may not write where training did
        assert load_weights(fresh, tmp_path) == 2
    assert same(fresh.state_dict(), trainer.lightning_module.state_dict())


class Evaluated(example.Regressor):
    """Records the weights it is validated or tested with."""

    def validation_step(self, batch, batch_idx):
        self.evaluated = {key: value.clone() for key, value in self.state_dict().items()}

    test_step = validation_step


def test_validate_and_test_read_ckpt_path_best_a_step_directory_or_a_lightning_file(tmp_path):
    """``trainer.test(ckpt_path="best")`` after a fit (and ``trainer.test()``, which means it) read the
    best step; a step directory may be given as ``ckpt_path`` by a fresh Trainer too."""
    run = tmp_path / "run"
    trainer, callback = fit(run, model=Evaluated(), max_steps=6, monitor="train_loss", mode="max",
                            save_decision_policy=sdp.FixedIntervalPolicy(2))
    best = max(callback.checkpointer.checkpoints, key=lambda c: c.metrics["train_loss"]).step
    assert callback.best_model_path == str(run / str(best)) and best != 6  # the loss fell: the first step is "best"

    def weights(step):
        model = Evaluated()
        load_weights(model, run, step=step)
        return model.state_dict()

    model, data = trainer.lightning_module, DataLoader(example.synthetic_data(32), batch_size=16)
    trainer.test(model, data, ckpt_path="best", verbose=False)
    assert same(model.evaluated, weights(best))
    trainer.validate(model, data, ckpt_path=str(run / "6"), verbose=False)
    assert same(model.evaluated, weights(6))
    trainer.save_checkpoint(tmp_path / "step6.ckpt")  # a file: Lightning's own reader still reads it
    trainer.test(dataloaders=data, verbose=False)
    assert same(model.evaluated, weights(best))
    trainer.validate(model, data, ckpt_path=tmp_path / "step6.ckpt", verbose=False)
    assert same(model.evaluated, weights(6))

    reader = CheckpointCallback(run, monitor="train_loss", mode="max")  # a fresh process's: no fit, no Checkpointer
    evaluation = pl.Trainer(callbacks=[reader], accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
    assert (reader.best_model_path, reader.last_model_path) == (str(run / str(best)), str(run / "6"))
    assert CheckpointCallback(f"file://{run}", monitor="train_loss", mode="max").best_model_path == str(run / str(best))
    fresh = Evaluated()
    evaluation.test(fresh, data, ckpt_path="best", verbose=False)
    assert same(fresh.evaluated, weights(best))
    evaluation.test(fresh, data, ckpt_path=run / "6", verbose=False)
    assert same(fresh.evaluated, weights(6))
    evaluation.test(fresh, data, ckpt_path=run / str(best), verbose=False)
    assert same(fresh.evaluated, weights(best))
    evaluation.validate(fresh, data, ckpt_path=run, verbose=False)  # the callback's directory: its latest step
    assert same(fresh.evaluated, weights(6))

    names = ckpt.path.step.standard_name_format(step_prefix="step")
    _, named = fit(tmp_path / "named", model=Evaluated(), max_steps=2, step_name_format=names)
    evaluation = pl.Trainer(callbacks=[CheckpointCallback(tmp_path / "named", step_name_format=names)],
                            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    evaluation.validate(fresh, data, ckpt_path=tmp_path / "named", verbose=False)
    saved = Evaluated()
    load_weights(saved, named.last_model_path)
    assert named.last_model_path.endswith("step_2") and same(fresh.evaluated, saved.state_dict())


def test_the_callbacks_directory_on_s3_as_ckpt_path_reads_its_latest_step(bucket):
    _, callback = fit(bucket, model=Evaluated(), max_steps=4, save_decision_policy=sdp.FixedIntervalPolicy(2))
    evaluation = pl.Trainer(callbacks=[CheckpointCallback(bucket)], accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
    fresh, saved = Evaluated(), Evaluated()
    data = DataLoader(example.synthetic_data(32), batch_size=16)
    evaluation.validate(fresh, data, ckpt_path=bucket, verbose=False)  # was: Lightning's reader, a torch.load error
    assert load_weights(saved, bucket) == 4 and same(fresh.evaluated, saved.state_dict())


class WithScalarState(example.Regressor):
    """BatchNorm (a 0-d ``num_batches_tracked`` buffer) and Adam (a 0-d ``step`` per parameter)."""

    def __init__(self):
        super().__init__()
        self.net.insert(1, torch.nn.BatchNorm1d(64))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_zero_dimensional_tensors_resume_with_their_shapes(tmp_path):
    fit(tmp_path, model=WithScalarState(), max_steps=2)
    trainer, _ = fit(tmp_path, model=WithScalarState(), max_steps=3)
    assert trainer.lightning_module.net[1].num_batches_tracked.shape == ()
    assert {tuple(s["step"].shape) for s in trainer.optimizers[0].state.values()} == {()}
    fresh = WithScalarState()
    load_weights(fresh, tmp_path)
    assert same(fresh.state_dict(), trainer.lightning_module.state_dict())


class Counted(torch.nn.Module):
    """A module whose state holds a value that is no tensor (``get_extra_state``: a dict of counts)."""

    def __init__(self):
        super().__init__()
        self.seen = {"batches": 0}

    def forward(self, x):
        self.seen = {"batches": self.seen["batches"] + 1}
        return x

    def get_extra_state(self):
        return self.seen

    def set_extra_state(self, state):
        self.seen = dict(state)


class WithExtraState(example.Regressor):
    def __init__(self):
        super().__init__()
        self.net.insert(0, Counted())


def test_a_module_with_extra_state_that_is_no_tensor_resumes_and_loads_its_weights(tmp_path):
    fit(tmp_path, model=WithExtraState(), max_steps=2)
    trainer, _ = fit(tmp_path, model=WithExtraState(), max_steps=3)
    assert trainer.lightning_module.net[0].seen == {"batches": 3}
    fresh = WithExtraState()
    assert load_weights(fresh, tmp_path) == 3
    assert fresh.net[0].seen == {"batches": 3} and same(fresh.state_dict(), trainer.lightning_module.state_dict())


class Lazy(example.Regressor):
    """Its layers take their input sizes at the first forward (``nn.LazyLinear``): a fresh one has no shapes."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LazyLinear(64), torch.nn.ReLU(), torch.nn.LazyLinear(1))


def test_a_module_with_lazy_layers_resumes_and_loads_its_weights(tmp_path):
    fit(tmp_path, model=Lazy(), max_steps=2)
    trainer, _ = fit(tmp_path, model=Lazy(), max_steps=3)
    assert trainer.global_step == 3
    fresh = Lazy()
    assert load_weights(fresh, tmp_path) == 3
    assert same(fresh.state_dict(), trainer.lightning_module.state_dict())


class FailsAt(example.Regressor):
    def __init__(self, step: int):
        super().__init__()
        self.fail_at = step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.fail_at:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_waits_for_the_save_in_flight_and_releases_the_directory(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, model=FailsAt(3), max_steps=10, save_decision_policy=sdp.FixedIntervalPolicy(1))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["1", "2", "3"]
    with ckpt.Checkpointer(tmp_path) as checkpointer:  # the lock was released
        assert checkpointer.save(4, {"x": 1}, force=True)


class HoldsAnObject(example.Regressor):
    def __init__(self, helper=None):
        super().__init__()
        self.save_hyperparameters()


def test_unstorable_object_in_the_checkpoint_fails_at_fit_start_naming_its_key(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['hyper_parameters'\]\['helper'\] is a .*HoldsAnObject"):
        fit(tmp_path, model=HoldsAnObject(helper=HoldsAnObject()))
    assert steps_in(tmp_path) == []


class ConvertsItsObjectOnSave(HoldsAnObject):
    """Does what the error above advises: its ``on_save_checkpoint`` makes the object storable."""

    def on_save_checkpoint(self, checkpoint):
        checkpoint["hyper_parameters"]["helper"] = type(checkpoint["hyper_parameters"]["helper"]).__name__


def test_an_unstorable_object_that_on_save_checkpoint_converts_is_saved_as_converted(tmp_path):
    """The fit-start check dumps the checkpoint without the hooks (it is no save), and refused the object that
    the module's hook converts, with an error advising to convert it in on_save_checkpoint."""
    fit(tmp_path, model=ConvertsItsObjectOnSave(helper=HoldsAnObject()), max_steps=2)
    assert translate.read(str(tmp_path / "2"))["hyper_parameters"]["helper"] == "HoldsAnObject"


def test_restoring_a_directory_written_by_a_different_model_names_the_differing_keys(tmp_path):
    fit(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"different model.*'net.0.weight' has shape \(64, 16\) there and \(8, 16\)"):
        fit(tmp_path, model=example.Regressor(hidden=8), max_steps=4)


class HoldsLargeValues(example.Regressor):
    """A float32 buffer, and SGD momentum after its second step, of values that float16 cannot hold."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([70000.0, 2.0]))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        for state in self.trainer.optimizers[0].state.values() if self.trainer.global_step else ():
            state["momentum_buffer"].fill_(1e10)


class InHalf(example.Regressor):
    """The same model in float16 (its buffer in float32 where ``buffer`` says so)."""

    def __init__(self, buffer: torch.dtype = torch.float16):
        super().__init__()
        self.half()
        self.register_buffer("scale", torch.zeros(2, dtype=buffer))


def test_restoring_values_that_the_models_dtypes_cannot_hold_is_refused_naming_them(tmp_path):
    """(load_state_dict's and Optimizer.load_state_dict's casts made a saved float32 70000.0 inf in a float16
    buffer, and a momentum of 1e10 inf for float16 parameters, without a word: the restored run went on.)"""
    fit(tmp_path, model=HoldsLargeValues(), max_steps=2)
    with pytest.raises(ValueError, match=r"holds values that this InHalf's tensors cannot hold \(their dtypes differ\): "
                                         r"'scale': its float32 value 70000.0 does not fit float16 \(it would become inf"):
        fit(tmp_path, model=InHalf(), max_steps=2)
    with pytest.raises(ValueError, match=r"'scale': its float32 value 70000.0 does not fit float16"):
        load_weights(InHalf(), tmp_path)
    with pytest.raises(ValueError, match=r"holds optimizer states that this run's parameters cannot hold: "
                                         r"optimizer_states\[0\]\['state'\]\[0\]\['momentum_buffer'\]: its float32 "
                                         r"value 10000000000.0 does not fit float16"):
        fit(tmp_path, model=InHalf(buffer=torch.float32), max_steps=2)


class TestsInHalf(example.Regressor):
    """The example's model in float16, with a float16 buffer and a test step."""

    def __init__(self):
        super().__init__()
        self.half()
        self.register_buffer("scale", torch.zeros(2, dtype=torch.float16))

    def test_step(self, batch, batch_idx):
        pass


def test_a_step_given_as_ckpt_path_whose_values_the_models_dtypes_cannot_hold_is_refused_naming_them(tmp_path):
    """(Lightning loads the weights of ``ckpt_path=`` itself: fit, test and validate of a step directory made a
    saved float32 70000.0 inf in the float16 buffer without a word, where the callback's own restore refuses it.)"""
    large = example.Regressor()
    large.register_buffer("scale", torch.tensor([70000.0, 2.0]))
    fit(tmp_path / "saved", model=large, max_steps=2)
    refused = r"saved/2 holds values that this TestsInHalf's tensors cannot hold .*'scale': its float32 value 70000.0"
    with pytest.raises(ValueError, match=refused):
        fit(tmp_path / "resumed", model=TestsInHalf(), max_steps=2, ckpt_path=str(tmp_path / "saved" / "2"))
    assert steps_in(tmp_path / "resumed") == []
    trainer = pl.Trainer(callbacks=[CheckpointCallback(tmp_path / "saved")], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1)
    model = TestsInHalf()
    with pytest.raises(ValueError, match=refused):
        trainer.test(model, DataLoader(example.synthetic_data(), batch_size=16), ckpt_path=str(tmp_path / "saved"))
    assert model.scale.tolist() == [0.0, 0.0]


class RaisesOnLoad(TestsInHalf):
    """A module whose ``on_load_checkpoint`` fails, so that Lightning's restore stops before it loads the weights."""

    def on_load_checkpoint(self, checkpoint):
        raise RuntimeError("on_load_checkpoint failed")


def test_a_step_read_as_ckpt_path_whose_restore_failed_leaves_no_check_on_the_next_checkpoints_load(tmp_path):
    """(A step read for ``ckpt_path=`` whose restore stopped in the module's ``on_load_checkpoint`` left its check on
    the strategy: the same trainer's next test of a Lightning ``.ckpt`` file was refused as if it were that step.)"""
    fit(tmp_path / "saved", max_steps=2)
    trainer = pl.Trainer(callbacks=[CheckpointCallback(tmp_path / "saved")], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1)
    data = DataLoader(example.synthetic_data(), batch_size=16)
    with pytest.raises(RuntimeError, match="on_load_checkpoint failed"):
        trainer.test(RaisesOnLoad(), data, ckpt_path=str(tmp_path / "saved" / "2"))
    large = example.Regressor()
    large.register_buffer("scale", torch.tensor([70000.0, 2.0]))
    torch.save({"state_dict": large.state_dict(), "pytorch-lightning_version": pl.__version__}, tmp_path / "x.ckpt")
    model = TestsInHalf()
    trainer.test(model, data, ckpt_path=str(tmp_path / "x.ckpt"))  # (Lightning's cast of its own file, as it is)
    assert model.scale.tolist() == [float("inf"), 2.0]
    assert "load_model_state_dict" not in trainer.strategy.__dict__


class LargeBuffer(example.Regressor):
    """A float32 buffer of a value float16 cannot hold; the module is made in float16 where ``half`` says so."""

    def __init__(self, half: bool = False):
        super().__init__()
        self.register_buffer("scale", torch.tensor([70000.0, 2.0]))
        if half:
            self.half()


def test_load_from_checkpoint_into_a_module_made_in_dtypes_that_cannot_hold_the_values_is_refused_naming_them(tmp_path):
    """(load_from_checkpoint of a module whose ``__init__`` makes it float16 loaded the saved 70000.0 as inf, without a
    word, as Lightning's own does.)"""
    fit(tmp_path, model=LargeBuffer(), max_steps=2)
    with pytest.raises(ValueError, match=r"2 holds values that this LargeBuffer's tensors cannot hold \(their dtypes "
                                         r"differ\): 'scale': its float32 value 70000.0 does not fit float16"):
        load_from_checkpoint(LargeBuffer, tmp_path, half=True)
    assert load_from_checkpoint(LargeBuffer, tmp_path).scale.tolist() == [70000.0, 2.0]


class LeavesOutItsFrozenLayer(example.Regressor):
    """Keeps its frozen first layer out of checkpoints (``on_save_checkpoint``) and puts the one it has back
    in ``on_load_checkpoint``, where Lightning lets a module complete or migrate the saved weights."""

    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)
        self.started_at = None

    def on_train_start(self):
        self.started_at = self.trainer.global_step

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("net.0.")}

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"].update({k: v for k, v in self.state_dict().items() if k.startswith("net.0.")})


def test_the_weights_are_checked_as_the_modules_on_load_checkpoint_leaves_them(tmp_path):
    """The module's hook runs first, as in Lightning's restore: the check named the layer left out as missing."""
    fit(tmp_path, model=LeavesOutItsFrozenLayer(), max_steps=2)
    trainer, _ = fit(tmp_path, model=LeavesOutItsFrozenLayer(), max_steps=3)
    assert trainer.lightning_module.started_at == 2


class AdamRegressor(example.Regressor):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_restoring_a_directory_saved_with_other_optimizers_names_them(tmp_path):
    """SGD's state loads into Adam without complaint; Adam's first step then failed with KeyError: 'step'."""
    fit(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"saved with the optimizers \['SGD'\], and this run has \['Adam'\]"):
        fit(tmp_path, model=AdamRegressor(), max_steps=4)


@pytest.fixture(scope="module")
def saved_mid_epoch(tmp_path_factory):
    """A directory whose step 2 a fit saved mid-epoch (its callback's record of the run: RNG states, logged values)."""
    directory = tmp_path_factory.mktemp("saved_mid_epoch")
    fit(directory, max_steps=2)
    return directory


def _forged_records():
    results = {"key": "training_step.train_loss", "reduce_fx": "manual_seed"}  # (looked up in torch, and called)
    return [("rng", 5), ("rng", [{"torch": "x"}]), ("epoch_rng", [{"epoch": "zz"}]), ("logged", 5),
            ("logged", [{"results": [results]}]), ("accumulate_grad_batches", 0), ("accumulate_grad_batches", -3),
            ("should_stop", "yes"), ("optimizers", 5), ("pruning", [1]), ("loaders_made_in", "x")]


@pytest.mark.parametrize("field, forged", _forged_records(), ids=lambda x: repr(x)[:30])
@pytest.mark.parametrize("how", ["restore", "ckpt_path"])
def test_a_callback_record_holding_what_the_callback_never_stores_is_a_damaged_checkpoint_naming_the_step_and_field(
        saved_mid_epoch, tmp_path, field, forged, how):
    """(The callback's record of the run forged in a step raised bare TypeError, KeyError, AttributeError or
    ZeroDivisionError from the resume, naming no step, or was taken as it was: accumulate_grad_batches -3 and
    should_stop 'yes' trained on.)"""
    loaded = ckpt.load_checkpointables(saved_mid_epoch / "2")
    (record,) = loaded["trainer"]["callbacks"].values()
    if field == "logged":  # (a genuine record's logged values with one field forged)
        forged = forged if isinstance(forged, int) else [{**record["logged"][0], "results": [
            {**record["logged"][0]["results"][0], **forged[0]["results"][0]}]}]
    record[field] = forged
    ckpt.save_checkpointables(tmp_path / "run" / "2", loaded)
    step = tmp_path / "run" / "2"
    with pytest.raises(ckpt.errors.CheckpointCorruptedError,
                       match=re.escape(f"{step}: its CheckpointCallback record holds {field} = ")):
        if how == "restore":
            fit(tmp_path / "run", max_steps=4)
        else:
            fit(tmp_path / "new", max_steps=4, ckpt_path=step)


@pytest.mark.parametrize("field, forged", [
    ("loops", 5), ("loops", {"fit_loop": 5}), ("callbacks", 5), ("optimizer_states", 5),
    ("optimizer_states", [{"state": 5, "param_groups": 5}]), ("optimizer_states", [{"state": {}, "param_groups": [5]}]),
    ("lr_schedulers", [5]), ("global_step", "x")], ids=lambda x: repr(x)[:30])
@pytest.mark.parametrize("how", ["restore", "ckpt_path"])
def test_a_lightning_field_holding_what_lightning_never_stores_is_a_damaged_checkpoint_naming_the_step_and_field(
        saved_mid_epoch, tmp_path, field, forged, how):
    """(The loops', callbacks', optimizers' or schedulers' states forged in a step raised a bare TypeError from a fit's
    restore, or from ckpt_path=, naming no step.)"""
    loaded = ckpt.load_checkpointables(saved_mid_epoch / "2")
    loaded["trainer"][field] = forged
    ckpt.save_checkpointables(tmp_path / "run" / "2", loaded)
    step = tmp_path / "run" / "2"
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=re.escape(f"{step}: its {field} is ")):
        if how == "restore":
            fit(tmp_path / "run", max_steps=4)
        else:
            fit(tmp_path / "new", max_steps=4, ckpt_path=step)


@pytest.mark.parametrize("forged", [5, [1, 2], {0: torch.ones(1)}, "abc"], ids=repr)
@pytest.mark.parametrize("how", ["restore", "ckpt_path", "load_weights", "load_from_checkpoint"])
def test_a_model_checkpointable_that_is_no_state_dict_is_a_damaged_checkpoint_naming_the_step(
        saved_mid_epoch, tmp_path, forged, how):
    """(A step whose "model" was forged into no dict of texts raised a bare TypeError or AttributeError from a fit's
    restore, ckpt_path=, load_weights and load_from_checkpoint: "argument of type 'int' is not iterable", "'list'
    object has no attribute 'items'", "expected string or bytes-like object, got 'int'".)"""
    loaded = ckpt.load_checkpointables(saved_mid_epoch / "2")
    loaded["model"] = forged
    step = tmp_path / "run" / "2"
    ckpt.save_checkpointables(step, loaded)
    with pytest.raises(ckpt.errors.CheckpointCorruptedError,
                       match=re.escape(f"{step}: its 'model' checkpointable is ")):
        if how == "restore":
            fit(tmp_path / "run", max_steps=4)
        elif how == "ckpt_path":
            fit(tmp_path / "new", max_steps=4, ckpt_path=step)
        elif how == "load_weights":
            load_weights(example.Regressor(), step)
        else:
            load_from_checkpoint(example.Regressor, step)


class TrainsItsHeadOnly(example.Regressor):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[3].parameters(), lr=0.1)


def test_restoring_a_directory_saved_with_optimizers_of_other_parameters_names_them(tmp_path):
    """A second stage of training (the whole model, after its head alone) in the first stage's directory: torch
    refused the restore with "loaded state dict contains a parameter group that doesn't match the size of
    optimizer's group", naming neither the directory nor the step."""
    fit(tmp_path, model=TrainsItsHeadOnly(), max_steps=2)
    saved = steps_in(tmp_path)
    with pytest.raises(ValueError, match=r"/2 was saved with optimizers whose parameter groups hold \[\[2\]\] "
                                         r"parameters, and this run's hold \[\[4\]\]"):
        fit(tmp_path, max_steps=4)
    assert steps_in(tmp_path) == saved


def test_a_tuners_search_before_a_resumed_fit_starts_from_the_module_as_given_and_the_fit_resumes(tmp_path):
    """Tuner.lr_find runs a fit of its own, which its finder ends at fit start: the callback restored the latest
    step there, so the script run again searched from the trained weights and put another learning rate in the
    module's hparams than the first run did; Lightning's own resume (ckpt_path= of the training fit) searches
    from the module as given, as the first run did."""
    def tuned_fit(max_steps: int) -> tuple[list[float], float, pl.Trainer]:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_steps=max_steps, callbacks=[CheckpointCallback(tmp_path / "ckpt")],
                             default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        model, loader = example.Regressor(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True)
        search = pl.tuner.Tuner(trainer).lr_find(model, loader, num_training=6, update_attr=True)
        trainer.fit(model, loader)
        return search.results["loss"], model.hparams.lr, trainer

    first_losses, first_lr, _ = tuned_fit(max_steps=4)
    losses, lr, trainer = tuned_fit(max_steps=8)  # resumed from step 4 (else: "already holds step 4")
    assert (losses, lr) == (first_losses, first_lr)
    assert trainer.global_step == 8


class SavedAfterValidation(example.Regressor):
    """The example's model, which saves the Trainer's checkpoint to ``self.path`` at the end of a ``trainer.validate()``."""

    path: Path | None = None

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def on_validation_end(self):
        if self.trainer.state.fn == "validate":
            self.trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("when", ["after_fit", "in_a_later_validate"])
def test_a_fit_resumed_from_a_file_trainer_save_checkpoint_wrote_after_fit_ends_as_that_fit_ended(tmp_path, when):
    """trainer.save_checkpoint after a fit that max_steps ended mid-epoch: the file's loops have that epoch ended, and
    the callback's record in it took the save as one at a step's end, so a fit of the same max_steps resumed from the
    file (which trains nothing) ended the epoch again: epoch 2, where the fit that wrote it, and Lightning's own resume
    from the file, stand at epoch 1."""
    model = SavedAfterValidation()
    trainer, _ = fit(tmp_path / "first", model=model, max_steps=12)  # 20 batches per epoch
    if when == "after_fit":
        trainer.save_checkpoint(tmp_path / "final.ckpt")
    else:
        model.path = tmp_path / "final.ckpt"
        trainer.validate(model, DataLoader(example.synthetic_data(32), batch_size=16))
    resumed, _ = fit(tmp_path / "second", model=SavedAfterValidation(), max_steps=12,
                     ckpt_path=str(tmp_path / "final.ckpt"))
    assert (resumed.global_step, resumed.current_epoch) == (trainer.global_step, trainer.current_epoch) == (12, 1)
    assert resumed.fit_loop.state_dict() == trainer.fit_loop.state_dict()


def test_ckpt_path_given_by_the_user_wins_over_the_directorys_latest_step(tmp_path):
    trainer, _ = fit(tmp_path / "a", max_steps=4, save_decision_policy=sdp.FixedIntervalPolicy(2))
    lightning_file = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(lightning_file)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "2", tmp_path / "b" / "2")
    trainer, _ = fit(tmp_path / "b", max_steps=6, ckpt_path=lightning_file, save_decision_policy=sdp.FixedIntervalPolicy(2))
    assert steps_in(tmp_path / "b") == [2, 6]  # continued from step 4 of the file, not from step 2
    assert trainer.global_step == 6


def lightning_fit(max_steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
    """A fit with Lightning alone (no checkpoint callback)."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(example.Regressor(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True),
                ckpt_path=ckpt_path)
    return trainer


def lightning_file_mid_epoch(directory: Path) -> Path:
    """A file of Lightning's own, ``directory/step3.ckpt``, taken mid-epoch (step 3 of 20 batches an epoch)."""
    lightning_fit(max_steps=3).save_checkpoint(directory / "step3.ckpt")
    return directory / "step3.ckpt"


def test_resumed_mid_epoch_from_a_file_of_lightnings_own_the_callback_keeps_lightnings_warning(tmp_path):
    """Such a file holds no record of the epoch's data order, so its epoch goes on in another order (as with
    Lightning alone); Lightning's warning that results may differ was silenced all the same."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "ckpt", max_steps=5, ckpt_path=lightning_file_mid_epoch(tmp_path))
    assert [w for w in caught if "checkpoint that ended before the epoch ended" in str(w.message)]


def test_lightnings_warning_of_a_replayed_epoch_is_silenced_for_the_fit_the_callback_positions_alone(tmp_path):
    """The callback silences the warning in the fit whose data it positions; its filter stayed for the life of the
    process, so a later fit resumed mid-epoch from a file of Lightning's own replayed its epoch unwarned."""
    fit(tmp_path / "ckpt", max_steps=3)
    lightning_file = lightning_file_mid_epoch(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "ckpt", max_steps=5)  # resumed from step 3 by the callback, which continues the epoch
        assert not [w for w in caught if "checkpoint that ended before the epoch ended" in str(w.message)]
        lightning_fit(max_steps=5, ckpt_path=lightning_file)
    assert [w for w in caught if "checkpoint that ended before the epoch ended" in str(w.message)]


def test_resuming_an_older_ckpt_path_into_a_directory_with_later_steps_is_refused(tmp_path):
    trainer, _ = fit(tmp_path, max_steps=2, save_decision_policy=sdp.FixedIntervalPolicy(2))
    lightning_file = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(lightning_file)
    fit(tmp_path, max_steps=4, save_decision_policy=sdp.FixedIntervalPolicy(2))
    with pytest.raises(ValueError, match="already holds step 4, but this run starts at step 2"):
        fit(tmp_path, max_steps=6, ckpt_path=lightning_file)


def test_model_checkpoints_options_are_refused_naming_what_to_pass_instead():
    with pytest.raises(TypeError, match=r"(?s)\['dirpath', 'every_n_train_steps'\]; these are ModelCheckpoint's.*"
                                        r"dirpath: the directory.*FixedIntervalPolicy\(n\)"):
        CheckpointCallback(dirpath="runs/exp1", every_n_train_steps=100)
    with pytest.raises(TypeError, match=r"(?s)\['save_on_exception'\]; these are ModelCheckpoint's.*saved on SIGTERM"):
        CheckpointCallback("runs/exp1", save_on_exception=True)  # ModelCheckpoint's since Lightning 2.5
    with pytest.raises(TypeError, match=r"\['saev_top_k'\]\nIt takes: directory, save_decision_policy, "):
        CheckpointCallback("runs/exp1", saev_top_k=2)
    with pytest.raises(TypeError, match="needs the directory"):
        CheckpointCallback()
    with pytest.raises(TypeError, match=r"save_decision_policy must be an object with a should_save method .*"
                                        r"class_path configuration that was not instantiated"):
        CheckpointCallback("runs/exp1", save_decision_policy={"class_path": "my_policies.EveryHour"})


def test_save_top_k_as_its_refusal_says_keeps_the_k_best_validated_steps(tmp_path):
    """The refusal's BestN read m['val_loss'], which a step saved before the first validation lacks: the fit
    failed with KeyError: 'val_loss' at its first garbage collection."""
    with pytest.raises(TypeError) as refused:
        CheckpointCallback(tmp_path, save_top_k=2)
    advice = re.search(r"the k best: (.*) \(reverse", str(refused.value)).group(1).replace("n=k", "n=2")
    options = eval(f"dict({advice})", {"preservation_policies": pp, "math": math})  # as a user would type it
    callback = CheckpointCallback(tmp_path, save_decision_policy=sdp.FixedIntervalPolicy(1), async_save=False,
                                  **options)
    trainer = pl.Trainer(max_steps=14, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                         callbacks=[callback], accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(ValidatedAt(), DataLoader(example.synthetic_data(), batch_size=16),
                DataLoader(example.synthetic_data(32), batch_size=16))
    assert [c.step for c in callback.checkpointer.checkpoints] == [4, 8, 14]  # val_loss 1.0 and 5.0, the latest


@pytest.mark.parametrize("option", ["async_save", "restore"])
def test_a_switch_that_is_not_a_bool_is_refused_at_construction_naming_it(option):
    with pytest.raises(TypeError, match=f"{option} must be an instance of bool, got str 'no'"):
        CheckpointCallback("runs/exp1", **{option: "no"})  # a truthy string would have switched it on


class SyntheticData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(example.synthetic_data(), batch_size=16, shuffle=True)


CLI_CONFIG = """
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: ckpt.integrations.lightning.pytorch_lightning.CheckpointCallback
      init_args:
        directory: {durable}
        async_save: false  # each promotion ends before the next save (a newer one replaces one waiting)
        save_decision_policy:
          class_path: ckpt.training.save_decision_policies.AnySavePolicy
          init_args:
            policies:
              - {{class_path: ckpt.training.save_decision_policies.FixedIntervalPolicy, init_args: {{interval: 4}}}}
              - {{class_path: ckpt.training.save_decision_policies.SpecificStepsPolicy, init_args: {{steps: [1, 6]}}}}
              - class_path: ckpt.training.save_decision_policies.PreemptionCheckpointingPolicy
        preservation_policy:
          class_path: ckpt.training.preservation_policies.AnyPreservationPolicy
          init_args:
            policies:
              - {{class_path: ckpt.training.preservation_policies.LatestN, init_args: {{n: 1}}}}
              - {{class_path: ckpt.training.preservation_policies.CustomSteps, init_args: {{steps: [4, 5, 6]}}}}
              - {{class_path: ckpt.training.preservation_policies.EveryNSteps, init_args: {{interval_steps: 8}}}}
        context:
          class_path: ckpt.Context
          init_args:
            async_options: {{class_path: ckpt.AsyncOptions, init_args: {{timeout_secs: 100}}}}
        local:
          class_path: ckpt.LocalCheckpointOptions
          init_args:
            directory: {local}
            save_decision_policy:
              class_path: ckpt.training.save_decision_policies.FixedIntervalPolicy
              init_args: {{interval: 3}}
"""


def test_lightning_cli_configures_the_callback_its_policies_and_local_tier_from_yaml_and_resumes(
        tmp_path, monkeypatch, caplog):
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr("sys.argv", ["train.py"])
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CLI_CONFIG.format(durable=tmp_path / "durable", local=tmp_path / "local"))

    def fit(max_steps: int) -> pl.Trainer:
        return LightningCLI(example.Regressor, SyntheticData, seed_everything_default=0, save_config_callback=None,
                            args=["fit", "--config", str(config), f"--trainer.max_steps={max_steps}"]).trainer

    first = fit(12)
    assert steps_in(tmp_path / "durable") == [4, 6, 8, 12] and steps_in(tmp_path / "local") == [9, 12]
    with caplog.at_level(logging.INFO):
        second = fit(16)
    assert f"Restored all states from the ckpt checkpoint at {tmp_path / 'local'}/12" in caplog.text
    assert steps_in(tmp_path / "durable") == [4, 6, 8, 16] and steps_in(tmp_path / "local") == [15, 16]
    assert first.global_step == 12 and second.global_step == 16


def test_resuming_mid_epoch_with_stochastic_weight_averaging_is_warned_of(tmp_path, caplog):
    def fit_with_swa(max_steps: int) -> None:
        pl.seed_everything(0, verbose=False)
        swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[CheckpointCallback(tmp_path), swa])
        trainer.fit(example.Regressor(), DataLoader(example.synthetic_data(), batch_size=16, shuffle=True))

    fit_with_swa(2)
    with caplog.at_level(logging.WARNING):
        fit_with_swa(3)
    assert "resuming mid-epoch with StochasticWeightAveraging" in caplog.text


def test_a_trainer_of_the_other_namespace_is_refused_with_the_class_to_use(tmp_path):
    other = type("Trainer", (), {"__module__": "lightning.pytorch.trainer.trainer"})()
    with pytest.raises(TypeError, match=r"ckpt.integrations.lightning.lightning_pytorch.CheckpointCallback"):
        CheckpointCallback(tmp_path).setup(other, None, "fit")


def test_top_level_callback_is_the_one_of_the_imported_namespace():
    import ckpt.integrations.lightning as integration

    assert integration.CheckpointCallback is CheckpointCallback
    assert isinstance(CheckpointCallback("unused"), pl.callbacks.Checkpoint)
