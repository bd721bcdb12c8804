"""Kill-and-restart matrix for CheckpointCallback: one worker process runs Trainer configurations on request.

    python tests/lightning_matrix.py          # reads a configuration name per line, answers a JSON line each

For each configuration the worker forks three children from one interpreter that has imported torch and
Lightning once: an uninterrupted reference run (shared by configurations that differ only in the kill
step), and a run with the callback that SIGKILLs itself (its DataLoader workers are orphaned, as after
an OOM kill) as soon as the checkpoint of the kill step is committed, then, at once, the same run again. It answers
``{"name", "ok", "problems", "seconds"}``: the restarted run must start from the kill step and end
with the reference's final state (weights, optimizer and scheduler states, loop progress, callback and datamodule
states, torchmetrics states, logged metrics), and the killed run's trace up to its checkpoint followed
by the restarted run's must be the reference's per-batch trace (sample ids, loss, learning rate) with
its epoch metrics, bit for bit. Closing stdin ends the worker.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLES, BATCH = 64, 8  # 8 batches per epoch


@dataclasses.dataclass(frozen=True)
class Config:
    """A Trainer configuration, and the step after whose checkpoint the run is killed."""

    kill_at: int
    max_epochs: int = 3
    max_steps: int = -1
    trainer: tuple = ()  # extra Trainer keyword arguments, as (name, value) pairs
    val: bool = False  # a validation loader and a logged val_loss
    early_stopping: bool = False  # EarlyStopping on val_loss
    model: str = "mlp"  # mlp | batchnorm | manual (two optimizers, manual optimization) | finetune (a backbone) |
    # module_hooks (buffers its own on_train_batch_end and on_validation_end change, after the callbacks' hooks) |
    # manual_two_schedulers (manual, the second scheduler a plateau the module steps at each epoch's end) |
    # collection (a torchmetrics MetricCollection logged per epoch, one of its metrics keeping list states)
    scheduler: str = "step"  # step | onecycle | onecycle_estimated (its total steps from
    # trainer.estimated_stepping_batches, which makes the loaders before the restore) | plateau_step | plateau_epoch |
    # plateau_val (per epoch, on val_loss) | lbfgs (the LBFGS optimizer) | sequential (SequentialLR of LinearLR and
    # CosineAnnealingWarmRestarts)
    epoch_metrics: bool = False  # self.log(on_epoch=True) and torchmetrics Metrics logged per epoch and validation
    data: str = "map"  # map | iterable | datamodule | stateful (a loader with state_dict, as torchdata's) |
    # batch_sampler (a BatchSampler over a RandomSampler with a generator of its own) | epoch_sampler (a sampler
    # that shuffles by the number set_epoch gives it, as DistributedSampler)
    workers: int = 0
    model_checkpoint: str = ""  # "before" | "after": Lightning's ModelCheckpoint (a file every 3 steps, the latest
    # kept) listed before or after ours; "val_loss": one keeping every file, by val_loss (saved after validation, or
    # at the epoch's end when it validates there); its state and files are compared; "on_exception": an
    # OnExceptionCheckpoint (its file is the restarted run's ckpt_path="model_checkpoint")
    ckpt_path: str | None = None  # "last_model_path": the restarted run passes the callback's (a step directory);
    # "model_checkpoint": the ModelCheckpoint's file of the kill step
    namespace: str = "pytorch_lightning"
    callbacks: tuple = ()  # Lightning's beside ours: "swa", "ema", "accumulation_scheduler", "batch_size_finder", "lr_finder",
    # "stop_at_second_validation" (EarlyStopping that stops at the second validation, mid-epoch), "pruning"
    # (ModelPruning, whose files hold the pruned weights without their masks), "pruning_masks_saved" (with the masks)
    stop_at: int | None = None  # the module sets trainer.should_stop in the training step that ends at this step
    sigterm_in: str = ""  # "on_validation_end": the run to stop sends itself SIGTERM there at kill_at (no SIGKILL; the
    # policy saves nothing by itself: the callback saves the step on SIGTERM), and exits by Lightning's SIGTERMException

    def reference_key(self) -> "Config":
        return dataclasses.replace(self, kill_at=0)


CONFIGS: dict[str, Config] = {
    "epochs_mid_epoch": Config(kill_at=11),
    "epochs_last_batch": Config(kill_at=8),
    "val_every_2_epochs_last_batch": Config(kill_at=8, val=True, trainer=(("check_val_every_n_epoch", 2),)),
    "val_every_2_epochs_last_batch_of_val_epoch": Config(kill_at=16, val=True,
                                                        trainer=(("check_val_every_n_epoch", 2),)),
    "val_every_2_epochs_half_batches_last_batch": Config(
        kill_at=4, val=True, trainer=(("check_val_every_n_epoch", 2), ("limit_train_batches", 0.5))),
    "max_steps_last_batch": Config(kill_at=8, max_epochs=-1, max_steps=20, scheduler="plateau_epoch",
                                   epoch_metrics=True),
    "sanity_check_val_last_batch": Config(kill_at=8, val=True, trainer=(("num_sanity_val_steps", 2),)),
    "val_torchmetric_due_at_checkpoint": Config(kill_at=12, val=True, epoch_metrics=True,
                                                trainer=(("val_check_interval", 0.5),)),
    "val_due_at_checkpoint_early_stopping": Config(kill_at=20, max_epochs=6, val=True, early_stopping=True,
                                                   trainer=(("val_check_interval", 0.5),)),
    "plateau_step": Config(kill_at=10, scheduler="plateau_step"),
    "plateau_epoch_metric": Config(kill_at=11, scheduler="plateau_epoch", epoch_metrics=True),
    "epoch_metrics_mid_epoch": Config(kill_at=13, epoch_metrics=True),
    "dataloader_workers": Config(kill_at=11, workers=2),
    "dataloader_workers_first_epoch": Config(kill_at=5, workers=2),
    "accumulate_and_clip": Config(kill_at=6, trainer=(("accumulate_grad_batches", 3),
                                                      ("gradient_clip_val", 0.05))),
    "manual_two_optimizers": Config(kill_at=22, model="manual"),
    "one_cycle_lr": Config(kill_at=11, scheduler="onecycle"),
    "bf16_mixed": Config(kill_at=11, trainer=(("precision", "bf16-mixed"),)),
    "iterable_dataset": Config(kill_at=11, data="iterable", max_epochs=-1, max_steps=20),
    "stateful_loader_mid_epoch": Config(kill_at=11, data="stateful"),  # positioned by Lightning
    # Lightning leaves the loader's state unloaded (its issue #20550): it is loaded for Lightning
    "stateful_loader_mid_epoch_estimated_stepping_batches": Config(kill_at=11, data="stateful",
                                                                  scheduler="onecycle_estimated"),
    # the loader's state ends the saved epoch; the next epoch's iterator then draws the seeds it drew
    "stateful_loader_last_batch": Config(kill_at=8, data="stateful"),
    "datamodule_state": Config(kill_at=11, data="datamodule"),
    "batch_sampler_with_a_generator": Config(kill_at=11, data="batch_sampler"),
    # workers draw the first indices as the iterator is made: the sampler must have its epoch by then
    "epoch_sampler_with_workers_mid_epoch": Config(kill_at=11, data="epoch_sampler", workers=2),
    "model_checkpoint_beside": Config(kill_at=11, model_checkpoint="before"),
    # its file of the kill step is saved after our checkpoint of it was taken, unless ours runs after it
    "model_checkpoint_listed_after_ours": Config(kill_at=12, model_checkpoint="after"),
    "fit_ckpt_path_last": Config(kill_at=11, ckpt_path="last"),
    "fit_ckpt_path_step_directory": Config(kill_at=11, ckpt_path="last_model_path"),
    # a file of ModelCheckpoint's holds the callback's record too, taken in ModelCheckpoint's hook
    "fit_ckpt_path_model_checkpoints_epoch_end_file": Config(
        kill_at=8, val=True, epoch_metrics=True, scheduler="plateau_epoch", model_checkpoint="val_loss",
        ckpt_path="model_checkpoint"),
    "fit_ckpt_path_model_checkpoints_validation_end_file": Config(
        kill_at=12, val=True, epoch_metrics=True, model_checkpoint="val_loss", ckpt_path="model_checkpoint",
        trainer=(("val_check_interval", 0.5),)),
    "fit_ckpt_path_step_directory_max_steps_last_batch": Config(
        kill_at=8, max_epochs=-1, max_steps=20, scheduler="plateau_epoch", epoch_metrics=True,
        ckpt_path="last_model_path"),
    # BatchSizeFinder's trials at fit start restore a checkpoint of their own, which ends Lightning's of ckpt_path
    "fit_ckpt_path_step_directory_batch_size_finder": Config(
        kill_at=11, data="datamodule", callbacks=("batch_size_finder",), trainer=(("limit_val_batches", 0),),
        ckpt_path="last_model_path"),
    "batchnorm_buffers": Config(kill_at=11, model="batchnorm"),
    # saved after the module's own hook of the step, which Lightning runs after the callbacks'
    "module_hooks_mid_epoch": Config(kill_at=11, model="module_hooks", val=True, trainer=(("val_check_interval", 0.5),)),
    "module_hooks_validated_step": Config(kill_at=12, model="module_hooks", val=True,
                                          trainer=(("val_check_interval", 0.5),)),
    "reload_dataloaders_with_workers": Config(kill_at=11, workers=2,
                                              trainer=(("reload_dataloaders_every_n_epochs", 1),)),
    # resumed in an epoch without a reload: the next reload comes when it came in the run never stopped
    "reload_dataloaders_every_2_epochs_mid_epoch": Config(kill_at=11,
                                                         trainer=(("reload_dataloaders_every_n_epochs", 2),)),
    "reload_dataloaders_every_2_epochs_last_batch": Config(kill_at=16, data="datamodule",
                                                          trainer=(("reload_dataloaders_every_n_epochs", 2),)),
    "val_every_3_steps_across_epochs": Config(kill_at=9, val=True, trainer=(("val_check_interval", 3),
                                                                              ("check_val_every_n_epoch", None))),
    "swa_last_batch": Config(kill_at=8, callbacks=("swa",)),  # mid-epoch: warned of (Lightning skips its hook)
    "backbone_finetuning_unfrozen": Config(kill_at=11, model="finetune"),
    "backbone_finetuning_frozen": Config(kill_at=5, model="finetune"),
    "backbone_finetuning_epoch_after_unfreezing": Config(kill_at=16, model="finetune"),  # Lightning #21901
    "batch_size_finder": Config(kill_at=11, data="datamodule", callbacks=("batch_size_finder",),
                                trainer=(("limit_val_batches", 0),)),
    "ema_weight_averaging": Config(kill_at=11, callbacks=("ema",)),
    "ema_weight_averaging_val_due": Config(kill_at=16, val=True, callbacks=("ema",)),
    "accumulation_scheduler": Config(kill_at=10, callbacks=("accumulation_scheduler",)),
    # the masks epoch 0's end made are in force in epoch 1: no Lightning checkpoint gives them back
    "model_pruning_mid_epoch": Config(kill_at=11, callbacks=("pruning",)),
    "model_pruning_masks_saved_mid_epoch": Config(kill_at=11, callbacks=("pruning_masks_saved",)),
    "fit_ckpt_path_step_directory_model_pruning": Config(kill_at=11, callbacks=("pruning",), ckpt_path="last_model_path"),
    "max_time_timer_state": Config(kill_at=11, trainer=(("max_time", "00:01:00:00"),)),
    # the killed run is killed after fit (as during a trainer.test after it); the restarted one ends at once
    "module_should_stop_mid_epoch": Config(kill_at=11, stop_at=11, scheduler="plateau_epoch", epoch_metrics=True),
    "module_should_stop_validates": Config(kill_at=11, stop_at=11, val=True, epoch_metrics=True),
    # a stop min_epochs holds back: the run trains on, and its restart runs the rest of the iteration itself
    "module_should_stop_before_min_epochs": Config(kill_at=12, stop_at=12, val=True, scheduler="plateau_step",
                                                   trainer=(("val_check_interval", 0.5), ("min_epochs", 3))),
    # the stop comes with the saved step's validation: the step is saved after the epoch it cuts short
    "early_stopping_mid_epoch": Config(kill_at=6, val=True, epoch_metrics=True, scheduler="plateau_epoch",
                                       callbacks=("stop_at_second_validation",),
                                       trainer=(("val_check_interval", 3), ("check_val_every_n_epoch", None))),
    # the killed run is killed after fit; the restarted one, restored at its end, skips training
    "finished_by_max_epochs": Config(kill_at=24, val=True, epoch_metrics=True, scheduler="plateau_epoch"),
    "finished_by_max_steps_at_an_epochs_last_batch": Config(kill_at=16, max_epochs=-1, max_steps=16,
                                                            epoch_metrics=True, scheduler="plateau_epoch"),
    # max_steps ends the epoch early: the finished run ended it after the step's save (and its validation)
    "finished_by_max_steps_mid_epoch": Config(kill_at=12, max_epochs=-1, max_steps=12, epoch_metrics=True,
                                              scheduler="plateau_epoch"),
    "finished_by_max_steps_mid_epoch_after_validation": Config(
        kill_at=12, max_epochs=-1, max_steps=12, val=True, epoch_metrics=True, trainer=(("val_check_interval", 4),)),
    # SIGTERM after the validation of a step no save was due at: the step is saved after its whole iteration, which
    # Lightning's restart takes for a save in on_validation_end (as ModelCheckpoint's) and runs the step's end again
    "sigterm_after_a_steps_validation": Config(kill_at=12, val=True, epoch_metrics=True, scheduler="plateau_step",
                                               trainer=(("val_check_interval", 0.5),), sigterm_in="on_validation_end"),
    # the same SIGTERM, resumed from OnExceptionCheckpoint's file, which holds the callback's record too
    "sigterm_after_a_steps_validation_on_exception_checkpoints_file": Config(
        kill_at=12, val=True, epoch_metrics=True, scheduler="plateau_step", trainer=(("val_check_interval", 0.5),),
        sigterm_in="on_validation_end", model_checkpoint="on_exception", ckpt_path="model_checkpoint"),
    # its trials at fit start restore a checkpoint of their own and set the module's lr, which the restore overrides
    "learning_rate_finder": Config(kill_at=11, callbacks=("lr_finder",)),
    "manual_two_schedulers_epoch_end": Config(kill_at=16, model="manual_two_schedulers", epoch_metrics=True),
    "plateau_on_val_loss_mid_epoch": Config(kill_at=11, val=True, scheduler="plateau_val", epoch_metrics=True),
    # validation after every 3 batches, also after a batch that only accumulates (batch 3, step 1)
    "accumulate_with_val_every_3_batches_val_due": Config(kill_at=3, val=True, trainer=(
        ("accumulate_grad_batches", 2), ("val_check_interval", 3), ("check_val_every_n_epoch", None))),
    "val_every_2_epochs_at_half_epochs_val_due": Config(kill_at=12, val=True, trainer=(
        ("check_val_every_n_epoch", 2), ("val_check_interval", 0.5))),
    "metric_collection_with_list_states_mid_epoch": Config(kill_at=11, model="collection", epoch_metrics=True),
    "lbfgs": Config(kill_at=11, scheduler="lbfgs"),  # its state holds floats and lists of tensors
    "sequential_lr_with_warm_restarts": Config(kill_at=11, scheduler="sequential"),  # nested scheduler states
    "gradient_clip_by_value": Config(kill_at=11, trainer=(("gradient_clip_val", 0.05),
                                                          ("gradient_clip_algorithm", "value"))),
    "detect_anomaly": Config(kill_at=11, trainer=(("detect_anomaly", True),)),
    # Lightning trains (and validates) on the first 3 batches, its sampler made sequential
    "overfit_batches": Config(kill_at=5, val=True, trainer=(("overfit_batches", 3),)),
    "progress_bar_and_model_summary": Config(kill_at=11, trainer=(("enable_progress_bar", True),
                                                                  ("enable_model_summary", True))),
    "bf16_true": Config(kill_at=11, trainer=(("precision", "bf16-true"),)),  # the module's own tensors in bfloat16
    "lightning_pytorch_namespace": Config(kill_at=13, val=True, epoch_metrics=True,
                                          namespace="lightning.pytorch"),
}


# ------------------------------------------------------------------------------------ one run
def _classes(namespace: str) -> dict[str, Any]:
    """The model, data and callback classes of one Lightning namespace (made once per namespace)."""
    if namespace in _CLASSES:
        return _CLASSES[namespace]
    pl = importlib.import_module(namespace)
    import torchmetrics
    from torch import nn

    class Model(pl.LightningModule):
        def __init__(self, cfg: Config) -> None:
            super().__init__()
            self.cfg = cfg
            layers = [nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)]
            if cfg.model == "batchnorm":
                layers.insert(1, nn.BatchNorm1d(16))
            self.net = nn.Sequential(*layers)
            if cfg.model == "finetune":  # what BackboneFinetuning freezes, then unfreezes into a new param group
                self.backbone = self.net[0]
            self.other = nn.Linear(4, 1)  # the second optimizer's parameters (manual optimization)
            if cfg.model == "module_hooks":
                self.register_buffer("average", torch.zeros(16, 4))  # of the first layer's weights, per step
                self.register_buffer("validations", torch.zeros((), dtype=torch.long))
            self.train_mse = torchmetrics.MeanSquaredError()
            self.val_mse = torchmetrics.MeanSquaredError()  # Lightning resets it after each validation
            if cfg.model == "collection":  # a MetricCollection, one of whose metrics keeps list states
                self.collection = torchmetrics.MetricCollection({"mae": torchmetrics.MeanAbsoluteError(),
                                                                 "spearman": torchmetrics.SpearmanCorrCoef()},
                                                                prefix="train_")
            self.automatic_optimization = not cfg.model.startswith("manual")
            self.lr = 0.05  # what LearningRateFinder sets
            self.trace: list = []
            self.trace_file: Any = None  # each entry is also written here as it is made (a JSON line)
            self.kill_at: int | None = None
            self.started_at: int | None = None

        def _loss(self, batch: Any) -> torch.Tensor:
            ids, x, y = batch
            prediction = self.net(x)
            loss = nn.functional.mse_loss(prediction, y)
            self._batch = ["batch", self.trainer.current_epoch, ids.tolist(), float(loss),
                           self.trainer.optimizers[0].param_groups[0]["lr"]]
            self.log("train_loss", loss, on_step=True, on_epoch=self.cfg.epoch_metrics)
            if self.cfg.epoch_metrics:
                self.train_mse(prediction.detach().float(), y)
                self.log("train_mse", self.train_mse, on_step=False, on_epoch=True)
                self.log("train_loss_max", loss, on_step=False, on_epoch=True, reduce_fx="max")
            if self.cfg.model == "collection":
                self.collection(prediction.detach().flatten(), y.flatten())
                self.log_dict(self.collection, on_step=False, on_epoch=True)
            return loss

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.cfg.stop_at is not None and self.trainer.global_step == self.cfg.stop_at - 1:
                self.trainer.should_stop = True
            loss = self._loss(batch)
            if self.automatic_optimization:
                return loss
            first, second = self.optimizers()
            first.zero_grad()
            self.manual_backward(loss)
            first.step()
            other = nn.functional.mse_loss(self.other(batch[1]), batch[2])
            second.zero_grad()
            self.manual_backward(other)
            second.step()
            schedulers = self.lr_schedulers()
            (schedulers[0] if isinstance(schedulers, list) else schedulers).step()
            return None

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            _, x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))
            if self.cfg.epoch_metrics:
                self.val_mse(self.net(x), y)
                self.log("val_mse", self.val_mse)

        def configure_optimizers(self) -> Any:
            kind = self.cfg.scheduler
            if self.cfg.model == "manual":
                first = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
                second = torch.optim.Adam(self.other.parameters(), lr=0.01)
                return [first, second], [torch.optim.lr_scheduler.StepLR(first, 5, 0.5)]
            if self.cfg.model == "manual_two_schedulers":  # the second stepped by the module at each epoch's end
                first = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
                second = torch.optim.Adam(self.other.parameters(), lr=0.01)
                return [first, second], [torch.optim.lr_scheduler.StepLR(first, 5, 0.5),
                                         torch.optim.lr_scheduler.ReduceLROnPlateau(second, patience=0, factor=0.5)]
            optimizer = torch.optim.SGD([p for p in self.net.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)
            if kind.startswith("onecycle"):
                total = self.trainer.estimated_stepping_batches if kind == "onecycle_estimated" else 40
                scheduler = {"scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=total),
                             "interval": "step"}
            elif kind == "plateau_step":
                scheduler = {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=1, factor=0.7),
                             "interval": "step", "monitor": "train_loss"}
            elif kind == "lbfgs":
                optimizer = torch.optim.LBFGS(self.net.parameters(), lr=0.05, history_size=3, max_iter=2)
                scheduler = {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.7), "interval": "step"}
            elif kind == "sequential":
                warm = torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, total_iters=4)
                cos = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=5)
                scheduler = {"scheduler": torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cos], milestones=[4]),
                             "interval": "step"}
            elif kind == "plateau_val":
                scheduler = {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5),
                             "interval": "epoch", "monitor": "val_loss"}
            elif kind == "plateau_epoch":
                scheduler = {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5),
                             "interval": "epoch", "monitor": "train_loss_epoch"}
            else:
                scheduler = {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.7), "interval": "step"}
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

        # the kill: at the first hook after the kill step's checkpoint is committed
        def _maybe_kill(self) -> None:
            checkpointer = next((c.checkpointer for c in self.trainer.callbacks if hasattr(c, "checkpointer")), None)
            if self.kill_at is None or checkpointer is None or self.cfg.sigterm_in:
                return
            checkpointer.wait()
            latest = checkpointer.latest
            if latest is not None and latest.step >= self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # the trainer only: its DataLoader workers are orphaned

        def on_train_start(self) -> None:
            self.started_at = self.trainer.global_step

        def on_fit_end(self) -> None:
            if self.started_at is None:  # a fit restored at its end skips training, on_train_start included
                self.started_at = self.trainer.global_step

        def _record(self, entry: list) -> None:
            if "batch_size_finder" in self.cfg.callbacks and not self.trainer.callbacks:
                return  # a trial of BatchSizeFinder's (without callbacks), run again by a resumed fit
            if any(type(c).__name__ == "_LRCallback" for c in self.trainer.callbacks):
                return  # a trial of LearningRateFinder's (its callback alone), run again by a resumed fit
            self.trace.append(entry)
            self.trace_file.write(entry)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.cfg.model == "module_hooks":
                self.average.mul_(0.9).add_(self.net[0].weight.detach(), alpha=0.1)
            self._record([self._batch[0], self.trainer.global_step, *self._batch[1:]])
            self._maybe_kill()

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self._maybe_kill()

        def on_validation_end(self) -> None:
            if self.cfg.model == "module_hooks":
                self.validations += 1
            if self.kill_at == self.trainer.global_step and self.cfg.sigterm_in == "on_validation_end":
                self.kill_at = None
                os.kill(os.getpid(), signal.SIGTERM)
            self._maybe_kill()

        def on_train_end(self) -> None:
            self._maybe_kill()

        def on_train_epoch_end(self) -> None:
            if self.cfg.model == "manual_two_schedulers":
                self.lr_schedulers()[1].step(self.trainer.callback_metrics["train_loss_epoch"])

        def on_train_epoch_start(self) -> None:
            if self.trainer.current_epoch > 0:
                self._record(["epoch", self.trainer.current_epoch, _metrics(self.trainer.callback_metrics)])
            self._maybe_kill()

    class Samples(torch.utils.data.IterableDataset):
        """The samples in an order drawn from torch's global generator at each iteration."""

        def __init__(self, data: Any) -> None:
            self.data = data

        def __iter__(self):
            for i in torch.randperm(len(self.data)).tolist():
                yield self.data[i]

    class Data(pl.LightningDataModule):
        """Counts the batches it handed to the model; the count is its state."""

        def __init__(self, cfg: Config) -> None:
            super().__init__()
            self.cfg, self.seen, self.batch_size = cfg, 0, BATCH  # BatchSizeFinder sets batch_size

        def train_dataloader(self) -> Any:
            return _loader(self.cfg, self.batch_size)

        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            self.seen += 1
            return batch

        def state_dict(self) -> dict:
            return {"seen": self.seen}

        def load_state_dict(self, state: dict) -> None:
            self.seen = state["seen"]

    _CLASSES[namespace] = {"pl": pl, "Model": Model, "Samples": Samples, "Data": Data}
    return _CLASSES[namespace]


_CLASSES: dict[str, dict[str, Any]] = {}


class TraceFile:
    """The file of a run's trace, one JSON line per entry, shared by the module's copies
    (``StochasticWeightAveraging`` deep-copies the module)."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "w")

    def __deepcopy__(self, memo: dict) -> "TraceFile":
        return self

    def write(self, entry: list) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()


def _dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 4, generator=generator)
    y = x @ torch.randn(4, 1, generator=generator) + 0.1 * torch.randn(SAMPLES, 1, generator=generator)
    return torch.utils.data.TensorDataset(torch.arange(SAMPLES), x, y)


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffles each epoch by a generator seeded with the epoch's number and counts what it yielded."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch, self.position = size, 0, 0
        self.next_epoch, self.start = 0, 0  # where the next iteration begins

    def __len__(self) -> int:
        return self.size

    def begin(self) -> None:
        """Moves to where the next iteration begins (as its DataLoader's iterator is made)."""
        self.epoch, self.position = self.next_epoch, self.start
        self.next_epoch, self.start = self.epoch + 1, 0

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        for i in order[self.position:]:
            self.position += 1
            yield i


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles by a generator seeded with the number ``set_epoch`` gave it, as ``DistributedSampler`` does."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch)).tolist())


class StatefulLoader(torch.utils.data.DataLoader):
    """A DataLoader that resumes where its state says (Lightning saves and loads it), as torchdata's
    ``StatefulDataLoader`` does: from a state taken at an epoch's end, its next iterator ends at once and
    the one after starts the next epoch. Its iterators still draw a seed from torch's generator."""

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "position": self.sampler.position}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.next_epoch, self.sampler.start = state["epoch"], state["position"]

    def __iter__(self):
        self.sampler.begin()  # the state applies to the iterator made now, as in torchdata
        return super().__iter__()


def _loader(cfg: Config, batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    data = _dataset()
    if cfg.data == "iterable":
        return torch.utils.data.DataLoader(_classes(cfg.namespace)["Samples"](data), batch_size=batch_size)
    if cfg.data == "stateful":
        return StatefulLoader(data, batch_size=batch_size, sampler=ResumableSampler(len(data)))
    if cfg.data == "epoch_sampler":
        return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=EpochSampler(len(data)),
                                           num_workers=cfg.workers)
    if cfg.data == "batch_sampler":
        sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(9))
        batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
        return torch.utils.data.DataLoader(data, batch_sampler=batches)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=cfg.workers,
                                       persistent_workers=False)


def _metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in sorted(metrics.items())}


def run(cfg: Config, directory: str | None, kill: bool, trace_path: str) -> dict:
    """Runs ``cfg`` (with the callback when ``directory`` is given); returns its trace and final state.
    The trace is also written to ``trace_path`` as it grows (what a killed run leaves)."""
    classes = _classes(cfg.namespace)
    pl = classes["pl"]
    pl.seed_everything(0, verbose=False)
    callback_module = importlib.import_module(f"ckpt.integrations.lightning.{cfg.namespace.replace('.', '_')}")
    from ckpt.training import save_decision_policies as sdp

    callbacks: list = []
    if cfg.early_stopping:
        callbacks.append(pl.callbacks.EarlyStopping("val_loss", patience=3, min_delta=0.05))
    if "swa" in cfg.callbacks:
        callbacks.append(pl.callbacks.StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1))
    if cfg.model == "finetune":
        callbacks.append(pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1))
    if "batch_size_finder" in cfg.callbacks:  # its trials at fit start end by restoring a checkpoint of its own
        callbacks.append(pl.callbacks.BatchSizeFinder(init_val=4, max_trials=1, steps_per_trial=2))
    if "stop_at_second_validation" in cfg.callbacks:
        callbacks.append(pl.callbacks.EarlyStopping("val_loss", patience=1, min_delta=100.0))
    if "lr_finder" in cfg.callbacks:
        callbacks.append(pl.callbacks.LearningRateFinder(min_lr=1e-4, max_lr=0.1, num_training_steps=5))
    if "ema" in cfg.callbacks:
        callbacks.append(pl.callbacks.EMAWeightAveraging(decay=0.9))
    if "accumulation_scheduler" in cfg.callbacks:
        callbacks.append(pl.callbacks.GradientAccumulationScheduler({0: 1, 1: 2}))
    for option in ("pruning", "pruning_masks_saved"):  # at each epoch's end
        if option in cfg.callbacks:
            callbacks.append(pl.callbacks.ModelPruning("l1_unstructured", amount=0.2, use_lottery_ticket_hypothesis=False,
                                                       make_pruning_permanent=option == "pruning"))
    if cfg.model_checkpoint:
        mc_dir = os.path.join(directory or trace_path + ".d", "lightning")
        every = {"monitor": "val_loss", "save_top_k": -1} if cfg.model_checkpoint == "val_loss" else {
            "every_n_train_steps": 3}
        callbacks.append(pl.callbacks.OnExceptionCheckpoint(mc_dir) if cfg.model_checkpoint == "on_exception"
                         else pl.callbacks.ModelCheckpoint(mc_dir, **every))
    if directory is not None:
        ours = callback_module.CheckpointCallback(
            os.path.join(directory, "ckpt"), save_decision_policy=sdp.SpecificStepsPolicy([] if cfg.sigterm_in else [cfg.kill_at]))
        callbacks.insert(len(callbacks) - (cfg.model_checkpoint == "after"), ours)
    trainer = pl.Trainer(max_epochs=cfg.max_epochs, max_steps=cfg.max_steps, callbacks=callbacks,
                         enable_checkpointing=directory is not None or bool(cfg.model_checkpoint), accelerator="cpu",
                         devices=1, logger=False,
                         **{"num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                            **dict(cfg.trainer)})
    model = classes["Model"](cfg)
    model.kill_at = cfg.kill_at if kill else None
    model.trace_file = TraceFile(trace_path)
    data = classes["Data"](cfg) if cfg.data == "datamodule" else None
    loaders: dict = {"datamodule": data} if data is not None else {"train_dataloaders": _loader(cfg)}
    if cfg.val:
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(16, 4, generator=generator)
        loaders["val_dataloaders"] = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.arange(16), x, x.sum(1, keepdim=True)), batch_size=8)
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "model_checkpoint":
        files = glob.glob(os.path.join(mc_dir, f"*-step={cfg.kill_at}.ckpt")) if directory is not None else []
        files += glob.glob(os.path.join(mc_dir, "on_exception.ckpt")) if directory is not None else []
        ckpt_path = files[0] if files else None
    if ckpt_path == "last_model_path":
        ckpt_path = (ours.last_model_path or None) if directory is not None else None
    trainer.fit(model, ckpt_path=ckpt_path, **loaders)
    return {"trace": model.trace, "started_at": model.started_at, "final": final_state(trainer, data)}


def final_state(trainer: Any, datamodule: Any = None) -> dict:
    """Everything a resume must give back, as tensors and plain values."""
    module = trainer.lightning_module
    state = {
        "step": trainer.global_step, "epoch": trainer.current_epoch, "model": module.state_dict(),
        "loops": trainer.fit_loop.state_dict(),  # the progress counters, which a later checkpoint would hold
        "optimizers": [o.state_dict() for o in trainer.optimizers],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "callback_metrics": _metrics(trainer.callback_metrics),
        "logged_metrics": _metrics(trainer.logged_metrics),
        "train_mse": {k: getattr(module.train_mse, k) for k in module.train_mse._defaults},
        "callbacks": {type(c).__name__: c.state_dict() for c in trainer.callbacks
                      if type(c).__name__ in ("EarlyStopping",)},
    }
    if datamodule is not None:
        state["datamodule"] = datamodule.state_dict()
    model_checkpoint = next((c for c in trainer.callbacks if type(c).__name__ == "ModelCheckpoint"), None)
    if model_checkpoint is not None:  # its paths by their names: each run has a directory of its own
        state["model_checkpoint"] = {
            "files": sorted(os.listdir(model_checkpoint.dirpath)),
            "state": {k: _names(v) for k, v in model_checkpoint.state_dict().items() if k != "dirpath"}}
    return state


def _names(value: Any) -> Any:
    """``value`` with the paths in it (a ModelCheckpoint's state) replaced by their file names."""
    if isinstance(value, str):
        return os.path.basename(value)
    if isinstance(value, dict):
        return {_names(k): _names(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- the comparison
def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ (tensors by dtype and bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: {a.flatten()[:4].tolist()} != {b.flatten()[:4].tolist()}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(reference: dict, killed: dict, resumed: dict, kill_at: int) -> list[str]:
    """The killed run's trace up to its checkpoint plus the resumed run's must be the reference's."""
    trace = killed["trace"]
    cut = next((i for i, e in enumerate(trace) if e[0] == "batch" and e[1] == kill_at), None)
    if cut is None:
        return [f"the killed run has no batch that ended at step {kill_at}"]
    problems = []
    if resumed["started_at"] != kill_at:
        problems.append(f"the restarted run started at step {resumed['started_at']}, not {kill_at}")
    combined = trace[:cut + 1] + resumed["trace"]
    expected = reference["trace"]
    for i, (got, want) in enumerate(zip(combined, expected)):
        if got != want:
            problems.append(f"trace entry {i} (reference {want[:3]}...): {got} != {want}")
            break
    if len(combined) != len(expected):
        problems.append(f"trace has {len(combined)} entries, the reference {len(expected)}")
    return problems + differences(resumed["final"], reference["final"], "final")


# ------------------------------------------------------------------------------ the worker
def _fork(target: Any) -> int:
    """Runs ``target()`` in a forked child in its own process group; returns the pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setpgid(0, 0)
            target()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _run_to(cfg: Config, directory: str | None, kill: bool, out: str) -> None:
    torch.save(run(cfg, directory, kill, out + ".trace"), out)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _kill_group(pid: int) -> None:
    """Kills what is left of a child's process group (orphaned DataLoader workers)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Worker:
    def __init__(self, root: str) -> None:
        self.root = root
        self.references: dict[Config, str] = {}

    def check(self, name: str) -> dict:
        began = time.monotonic()
        cfg = CONFIGS[name]
        base = os.path.join(self.root, name)
        os.makedirs(base)
        reference_pid = None
        key = cfg.reference_key()
        if key not in self.references:
            self.references[key] = os.path.join(self.root, f"reference_{len(self.references)}.pt")
            reference_pid = _fork(lambda: _run_to(cfg, None, False, self.references[key]))
        killed_out, resumed_out = os.path.join(base, "killed.pt"), os.path.join(base, "resumed.pt")
        killed_pid = _fork(lambda: _run_to(cfg, base, True, killed_out))
        killed_code = _wait(killed_pid)
        problems = []
        if killed_code != (1 if cfg.sigterm_in else -signal.SIGKILL):
            problems.append(f"the run to kill exited with {killed_code}, not by {cfg.sigterm_in and 'SIGTERM' or 'SIGKILL'}")
        # started again at once, while the killed run's DataLoader workers may still live
        resumed_pid = _fork(lambda: _run_to(cfg, base, False, resumed_out))
        resumed_code = _wait(resumed_pid)
        for pid in (killed_pid, resumed_pid):
            _kill_group(pid)
        if reference_pid is not None and _wait(reference_pid) != 0:
            problems.append("the reference run failed")
        if resumed_code != 0:
            problems.append(f"the restarted run exited with {resumed_code}")
        if not problems:
            reference = torch.load(self.references[key], weights_only=True)
            resumed = torch.load(resumed_out, weights_only=True)
            with open(killed_out + ".trace") as f:
                killed = {"trace": [json.loads(line) for line in f]}
            problems = compare(reference, killed, resumed, cfg.kill_at)
        return {"name": name, "ok": not problems, "problems": problems[:12],
                "seconds": round(time.monotonic() - began, 2)}


def main() -> None:
    torch.set_num_threads(1)
    for namespace in {c.namespace for c in CONFIGS.values()}:
        _classes(namespace)
    importlib.import_module("ckpt.integrations.lightning.mixin")
    with tempfile.TemporaryDirectory(prefix="lightning_matrix_") as root:
        worker = Worker(root)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:  # until stdin is closed
            name = line.strip()
            if not name:
                continue
            try:
                answer = worker.check(name)
            except Exception:
                answer = {"name": name, "ok": False, "problems": [traceback.format_exc()[-3000:]]}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
