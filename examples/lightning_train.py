"""A small Lightning run that checkpoints with ckpt and resumes where it stopped.

    python examples/lightning_train.py --dir runs/lit --max-steps 300
    # stop it at any point (Ctrl-C, SIGTERM, SIGKILL), run the same command again: it continues from
    # the last committed step, mid-epoch included, and ends with the weights of an uninterrupted run.

The model is an MLP with dropout, trained on a fixed synthetic regression problem with a shuffled
DataLoader, SGD with momentum and a step LR schedule: every source of state a resume must restore.
"""
from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt.integrations.lightning.pytorch_lightning import CheckpointCallback
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp


class Regressor(pl.LightningModule):
    """An MLP regressor; logs ``train_loss`` every step."""

    def __init__(self, features: int = 16, hidden: int = 64, dropout: float = 0.1, lr: float = 0.05,
                 lr_step_size: int = 20) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.hparams.lr_step_size, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def synthetic_data(samples: int = 320, features: int = 16) -> TensorDataset:
    """A fixed noisy linear problem (the same on every run)."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, features, generator=generator)
    w = torch.randn(features, 1, generator=generator)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(samples, 1, generator=generator))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (resumes from it if it has steps)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--save-every", type=int, default=10, help="save every N optimizer steps (and on SIGTERM)")
    parser.add_argument("--keep", type=int, default=3, help="keep the newest N steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    callback = CheckpointCallback(
        args.dir,
        save_decision_policy=sdp.AnySavePolicy([sdp.FixedIntervalPolicy(args.save_every),
                                                sdp.PreemptionCheckpointingPolicy()]),
        preservation_policy=pp.LatestN(args.keep),
    )
    trainer = pl.Trainer(max_steps=args.max_steps, accumulate_grad_batches=args.accumulate, callbacks=[callback],
                         accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loader = DataLoader(synthetic_data(), batch_size=args.batch_size, shuffle=True)
    trainer.fit(Regressor(), loader)
    steps = [c.step for c in callback.checkpointer.checkpoints]
    print(f"finished at step {trainer.global_step}; train_loss {float(trainer.callback_metrics['train_loss']):.4f}; "
          f"steps kept in {args.dir}: {steps}")


if __name__ == "__main__":
    main()
