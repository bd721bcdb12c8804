"""A Lightning run for the tests: the example's model, with switches to kill it or stop it at a step.

    python tests/lightning_run.py --dir D --out final.pt --max-steps 30 [--max-epochs 2] [--kill-at 13]
        [--sigterm-at 13] [--policy every:4] [--preserve latest:2] [--monitor train_loss] [--accumulate 2]
        [--samples 336] [--no-callback] [--second-dir D2] [--ddp] [--model-parallel N] [--accelerator gpu] [--sync-save]
        [--kill-in-flight] [--full-state-dict] [--unsharded] [--stop-rank0-at 6]

``--out`` receives the final parameters, optimizer and scheduler state (torch.save, rank 0; ``OUT.start``
the state the run started training from). ``--ddp`` runs two processes (``ddp_fork``, gloo).
``--model-parallel N`` runs N processes (forked) under ``ModelParallelStrategy(data_parallel_size=N)``
with the model sharded by FSDP2 (its 1 MiB hidden layers written shard by shard; ``--full-state-dict``: with
``save_distributed_checkpoint=False``; ``--unsharded``: its ``configure_model`` shards nothing). ``--kill-at K`` SIGKILLs the whole process group once step K's
save is committed (``--kill-in-flight``: without waiting for it); ``--sigterm-at K`` sends SIGTERM to
itself during step K; ``--stop-rank0-at K`` sets ``trainer.should_stop`` on rank 0 alone during step K. ``--sweep`` instead, in this one process, saves every step of a run, resumes from
each and prints ``sweep <step> ok|DIFF|NOT RESUMED``. ``train`` and ``final_state`` serve in-process tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lightning_train", REPO / "examples" / "lightning_train.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

import ckpt  # noqa: E402
from ckpt.integrations.lightning.pytorch_lightning import CheckpointCallback  # noqa: E402
from ckpt.training import preservation_policies as pp  # noqa: E402
from ckpt.training import save_decision_policies as sdp  # noqa: E402


class StoppingRegressor(example.Regressor):
    """The example's model, which kills or signals its own process at a chosen step."""

    def __init__(self, kill_at: int | None, sigterm_at: int | None, wait_for_save: bool, out: str | None,
                 stop_rank0_at: int = 0) -> None:
        super().__init__(lr_step_size=7)
        self.started_at: int | None = None
        self.kill_at, self.sigterm_at, self.wait_for_save, self.out = kill_at, sigterm_at, wait_for_save, out
        self.stop_rank0_at = stop_rank0_at

    def on_train_start(self):
        self.started_at = self.trainer.global_step
        ranks = ckpt.distributed.current().count  # the ranks whose Checkpointers agree on each save
        print(f"rank {self.global_rank} started at step {self.started_at} of {ranks} ranks", flush=True)
        state = final_state(self.trainer)
        if self.out and self.global_rank == 0:
            torch.save(state, self.out + ".start")

    def training_step(self, batch, batch_idx):
        if self.sigterm_at is not None and self.trainer.global_step == self.sigterm_at - 1 and self.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.trainer.global_step == self.stop_rank0_at - 1 and self.global_rank == 0:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_rank == 0:
            print(f"step {self.trainer.global_step} train_loss {float(self.trainer.callback_metrics['train_loss'])!r}",
                  flush=True)

    def on_train_batch_start(self, batch, batch_idx):  # the next batch's: a step is saved after on_train_batch_end
        if self.kill_at is not None and self.trainer.global_step == self.kill_at and self.global_rank == 0:
            checkpointer = self.trainer.checkpoint_callback.checkpointer
            if self.wait_for_save and checkpointer is not None:
                checkpointer.wait()
            print(f"killing at step {self.kill_at}", flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_train_end(self):  # in the training process (DDP workers are forked), after the callbacks' hooks
        state = final_state(self.trainer)
        if self.out and self.global_rank == 0:
            torch.save(state, self.out)
            print(f"finished at step {self.trainer.global_step}", flush=True)


class ShardedStoppingRegressor(StoppingRegressor):
    """The same, with a 16384-wide hidden layer, sharded with FSDP2 over the data-parallel ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hparams.lr = 0.002  # the wide layer diverges at the example's rate
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 16384), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(16384, 1))

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class UnshardedStoppingRegressor(StoppingRegressor):
    """The example's model under ``ModelParallelStrategy`` whose ``configure_model`` shards nothing (a small
    model): its parameters stay plain tensors."""

    def configure_model(self):
        pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--dir")
    p.add_argument("--out")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--samples", type=int, default=320, help="20 batches of 16 per epoch by default")
    p.add_argument("--policy", default="default", help="default | every:N")
    p.add_argument("--preserve", default="all", help="all | latest:N | best")
    p.add_argument("--monitor")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--kill-in-flight", action="store_true")
    p.add_argument("--sigterm-at", type=int)
    p.add_argument("--stop-rank0-at", type=int, default=0)
    p.add_argument("--max-time-us", type=int, help="the Trainer's max_time, in microseconds (1: stops after step 1)")
    p.add_argument("--no-callback", action="store_true")
    p.add_argument("--second-dir", help="a second CheckpointCallback (every 3 steps, best train_loss kept) beside --dir's")
    p.add_argument("--sync-save", action="store_true")
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--model-parallel", type=int, default=0, help="devices of a ModelParallelStrategy (FSDP2)")
    p.add_argument("--full-state-dict", action="store_true", help="ModelParallelStrategy(save_distributed_checkpoint=False)")
    p.add_argument("--unsharded", action="store_true", help="a --model-parallel module that shards nothing")
    p.add_argument("--accelerator", default="cpu", help="cpu | gpu (deterministic algorithms on gpu)")
    p.add_argument("--sweep", action="store_true")
    return p.parse_args(argv)


def make_callback(args: argparse.Namespace, directory: str) -> CheckpointCallback:
    policy = None
    if args.policy.startswith("every:"):
        policy = sdp.FixedIntervalPolicy(int(args.policy.split(":")[1]))
    preserve = None
    if args.preserve.startswith("latest:"):
        preserve = pp.LatestN(int(args.preserve.split(":")[1]))
    return CheckpointCallback(directory, save_decision_policy=policy, preservation_policy=preserve,
                              monitor=args.monitor, async_save=not args.sync_save)


def train(args: argparse.Namespace, directory: str | None, kill: bool = True) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    callbacks = [] if directory is None else [make_callback(args, directory)]
    if args.second_dir is not None:
        callbacks.append(CheckpointCallback(args.second_dir, save_decision_policy=sdp.FixedIntervalPolicy(3),
                                            monitor="train_loss", async_save=not args.sync_save))
    strategy, devices = ("ddp_fork", 2) if args.ddp else ("auto", 1)
    if args.model_parallel:
        strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=args.model_parallel, tensor_parallel_size=1,
                                                       save_distributed_checkpoint=not args.full_state_dict)
        strategy._configure_launcher = lambda: fork_launcher(strategy)  # forked ranks: no second import of torch
        devices = args.model_parallel
    trainer = pl.Trainer(
        max_steps=args.max_steps, max_epochs=args.max_epochs, accumulate_grad_batches=args.accumulate, callbacks=callbacks,
        enable_checkpointing=directory is not None, accelerator=args.accelerator, devices=devices,
        deterministic=args.accelerator != "cpu", strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, max_time=None if args.max_time_us is None else {"microseconds": args.max_time_us})
    model = (UnshardedStoppingRegressor if args.unsharded else ShardedStoppingRegressor if args.model_parallel
             else StoppingRegressor)(
        args.kill_at if kill else None, args.sigterm_at if kill else None,
        wait_for_save=not args.kill_in_flight, out=args.out if kill else None, stop_rank0_at=args.stop_rank0_at)
    trainer.fit(model, DataLoader(example.synthetic_data(args.samples), batch_size=16, shuffle=True))
    return trainer


def fork_launcher(strategy) -> None:
    """Makes the strategy fork its ranks (as ``strategy="ddp_fork"`` does) instead of starting this script
    again. The parent does not take the weights back: a file of DTensors does not load in a plain process."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    class Launcher(_MultiProcessingLauncher):
        def _collect_rank_zero_results(self, trainer, results):
            output = super()._collect_rank_zero_results(trainer, results)
            return None if output is None else output._replace(weights_path=None)

    strategy._launcher = Launcher(strategy, start_method="fork")


def final_state(trainer: pl.Trainer) -> dict:
    """The parameters, optimizer and scheduler state, sharded tensors gathered whole (call on every rank)."""
    return whole({"model": trainer.lightning_module.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                  "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(), "step": trainer.global_step})


def whole(tree):
    """``tree`` with every DTensor gathered into a plain tensor (a collective)."""
    if isinstance(tree, dict):
        return {k: whole(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(whole(v) for v in tree)
    return tree.full_tensor() if hasattr(tree, "full_tensor") else tree


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def sweep(args: argparse.Namespace) -> None:
    """Saves every step of a run, then resumes from each (a directory holding only that step)."""
    expected = final_state(train(args, None, kill=False))
    with tempfile.TemporaryDirectory() as full:
        train(argparse.Namespace(**{**vars(args), "policy": "every:1"}), full, kill=False)
        steps = sorted(int(p.name) for p in Path(full).iterdir() if p.name.isdigit())
        for step in steps:
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copytree(Path(full) / str(step), Path(tmp) / str(step))
                trainer = train(args, tmp, kill=False)
            started_at = trainer.lightning_module.started_at  # None: nothing left to train
            resumed = started_at == step or (started_at is None and step == trainer.global_step)
            ok = resumed and same(final_state(trainer), expected)
            print(f"sweep {step} {'ok' if ok else 'DIFF' if resumed else 'NOT RESUMED'}", flush=True)


def main() -> None:
    args = parse_args()
    if args.sweep:
        sweep(args)
        return
    train(args, None if args.no_callback else args.dir)


if __name__ == "__main__":
    sys.exit(main())
