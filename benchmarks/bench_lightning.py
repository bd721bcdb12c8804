"""CheckpointCallback against Lightning's ModelCheckpoint (torch.save), in one run.

    python benchmarks/bench_lightning.py [--width 4096 --depth 6] [--out bench-results/lightning.json]

Measures, around the callbacks' ``on_train_batch_end`` hook (the only hook that saves):

* overhead of a step that does not save, on a small model (median over many steps, microseconds);
* blocking time of a save of the full training state of a ~100M-parameter MLP with Adam (median of
  5 saves after a warm-up save), for ckpt async, ckpt sync (durable: fsync'd and committed), and
  ModelCheckpoint (``torch.save`` on the training thread, not fsync'd); plus the floor of copying the same tensors
  into preallocated buffers, and the callback's own part of a save (building Lightning's checkpoint
  dict and translating it; the rest is ckpt's snapshot). Before each timed save the previous one has
  finished, so every save is measured alone.

Prints a table and writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt.integrations.lightning import resume, translate
from ckpt.integrations.lightning.pytorch_lightning import CheckpointCallback
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp

REPS = 5


class MLP(pl.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class HookTimer:
    """Replaces ``callback.on_train_batch_end`` by a timed call; records (seconds, global step)."""

    def __init__(self, callback: Any) -> None:
        self.calls: list[tuple[float, int]] = []
        hook = callback.on_train_batch_end

        def timed(trainer: Any, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            hook(trainer, *args, **kwargs)
            self.calls.append((time.perf_counter() - start, trainer.global_step))

        callback.on_train_batch_end = timed

    def times(self, every: int, saving: bool) -> list[float]:
        """The calls at steps that are (or are not) multiples of ``every``: the saving steps."""
        return [t for t, step in self.calls if (step % every == 0) == saving]


class BetweenSaves(pl.Callback):
    """Before each batch (untimed): waits until ckpt's previous save is on disk, so saves do not queue
    behind each other, and deletes ModelCheckpoint's files, so the disk does not fill up."""

    def __init__(self, callback: Any, directory: Path) -> None:
        self.callback, self.directory = callback, directory

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if isinstance(self.callback, CheckpointCallback):
            self.callback.checkpointer.wait()
        else:
            for path in self.directory.glob("*.ckpt"):
                path.unlink()


def fit(model: pl.LightningModule, callbacks: list, steps: int, data: TensorDataset) -> pl.Trainer:
    checkpointing = any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks)  # else Lightning adds one
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpointing)
    trainer.fit(model, DataLoader(data, batch_size=len(data) // steps or 1))
    return trainer


def non_saving_overhead(root: Path, steps: int) -> dict[str, float]:
    """Median microseconds of on_train_batch_end on steps that do not save, per callback (and for an
    empty callback, the floor of the measurement)."""
    data = TensorDataset(torch.randn(steps, 8))
    out = {}
    for name in ("ckpt", "ModelCheckpoint", "empty callback"):
        directory = root / f"overhead-{name}"
        if name == "ckpt":
            callback = CheckpointCallback(directory, save_decision_policy=sdp.FixedIntervalPolicy(10 ** 9))
        elif name == "ModelCheckpoint":
            callback = ModelCheckpoint(directory, every_n_train_steps=10 ** 9, save_top_k=-1)
        else:  # the cost of the timing itself and of Lightning calling a hook
            callback = pl.Callback()
        timer = HookTimer(callback)
        fit(MLP(8, 2), [callback], steps, data)
        times = timer.times(10 ** 9, saving=False)[steps // 10:]  # after a warm-up
        out[name] = statistics.median(times) * 1e6
    return out


def save_blocking(root: Path, width: int, depth: int, every: int) -> tuple[dict[str, list[float]], int, int]:
    """Blocking seconds of REPS saves (after one warm-up save) per method, the parameter count and bytes."""
    steps = every * (REPS + 1)
    data = TensorDataset(torch.randn(steps, width))
    results: dict[str, list[float]] = {}
    for name in ("ckpt async", "ckpt sync", "ModelCheckpoint"):
        directory = root / name.replace(" ", "-")
        torch.manual_seed(0)
        model = MLP(width, depth)
        if name.startswith("ckpt"):
            callback = CheckpointCallback(directory, save_decision_policy=sdp.FixedIntervalPolicy(every),
                                          preservation_policy=pp.LatestN(1), async_save=name == "ckpt async")
        else:
            callback = ModelCheckpoint(directory, every_n_train_steps=every, save_top_k=-1)
        timer = HookTimer(callback)
        trainer = fit(model, [BetweenSaves(callback, directory), callback], steps, data)
        results[name] = timer.times(every, saving=True)[1:]
        shutil.rmtree(directory)
    results["ckpt: dump + translate"] = repeat(lambda: translate.to_checkpointables(resume.dump_checkpoint(trainer)))
    params = sum(p.numel() for p in model.parameters())
    state_bytes = params * 4 * 3  # weights and Adam's two moments, float32
    results["numpy copy floor"] = copy_floor(model)
    return results, params, state_bytes


def copy_floor(model: pl.LightningModule) -> list[float]:
    """Seconds to copy the weights and Adam's moments into preallocated, pre-faulted buffers."""
    tensors = [p.detach() for p in model.parameters()]
    tensors += [v for state in model.trainer.optimizers[0].state.values() for v in state.values() if v.ndim]
    arrays = [t.numpy() for t in tensors]
    buffers = [a.copy() for a in arrays]

    def copy() -> None:
        for buffer, array in zip(buffers, arrays):
            buffer[...] = array

    return repeat(copy)


def repeat(fn: Callable[[], Any]) -> list[float]:
    """Seconds of REPS calls of ``fn`` after a warm-up call."""
    fn()
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=6, help="6 x 4096^2 weights: 100.7M parameters")
    parser.add_argument("--every", type=int, default=2, help="save every N steps")
    parser.add_argument("--overhead-steps", type=int, default=2000)
    parser.add_argument("--dir", help="where to write checkpoints (default: a temporary directory)")
    parser.add_argument("--out", default="bench-results/lightning.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-lightning-", dir=args.dir))
    try:
        overhead = non_saving_overhead(root, args.overhead_steps)
        blocking, params, state_bytes = save_blocking(root, args.width, args.depth, args.every)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    medians = {name: statistics.median(times) for name, times in blocking.items()}
    print(f"\nnon-saving step, on_train_batch_end (median of {args.overhead_steps * 9 // 10} steps)")
    for name, us in overhead.items():
        print(f"  {name:<24} {us:10.1f} us")
    print(f"\nsave blocking time, {params / 1e6:.1f}M parameters + Adam ({state_bytes / 2 ** 30:.2f} GiB), "
          f"median of {REPS} after a warm-up")
    for name, seconds in medians.items():
        print(f"  {name:<24} {seconds * 1e3:10.1f} ms  {seconds / medians['ModelCheckpoint']:6.3f}x ModelCheckpoint")

    result = {
        "non_saving_step_us": overhead, "save_blocking_s": medians, "save_blocking_all_s": blocking,
        "params": params, "state_bytes": state_bytes, "reps": REPS,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "pytorch_lightning": pl.__version__, "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
