"""ckpt for PyTorch Lightning: a callback that saves on step end and resumes on fit start.

Example::

    import pytorch_lightning as pl
    from ckpt.integrations.lightning import CheckpointCallback, load_weights

    trainer = pl.Trainer(max_steps=1000, callbacks=[CheckpointCallback("runs/exp1")])
    trainer.fit(model, dataloader)          # killed? run it again: it continues mid-epoch, bit for bit
    load_weights(fresh_model, "runs/exp1")  # the latest weights, for inference

Lightning ships as two packages whose classes are distinct types: ``pytorch-lightning``
(``import pytorch_lightning``) and ``lightning`` (``import lightning.pytorch``). A Trainer only
recognises a ``Checkpoint`` of its own namespace, so there is one class per namespace:

- ``ckpt.integrations.lightning.pytorch_lightning.CheckpointCallback``
- ``ckpt.integrations.lightning.lightning_pytorch.CheckpointCallback``

``ckpt.integrations.lightning.CheckpointCallback`` is the one of the namespace your program has
imported; when it has imported both or neither, ``lightning.pytorch`` if installed, else
``pytorch_lightning``. A mismatch is reported at ``Trainer.fit`` with the class to use instead.
Lightning 2.5 or later is needed (the callback restores through its loops' restart stages).
``best_model_path`` and ``last_model_path`` are step directories (in a process that did not fit,
those of the directory, found by the metrics its steps hold): read them with :func:`load_weights`
or :func:`load_from_checkpoint` (Lightning's ``Model.load_from_checkpoint`` reads files only), or pass
them as ``ckpt_path=``: with the callback in the Trainer, ``fit``, ``validate``, ``test`` and
``predict`` read a step directory (and ``ckpt_path="best"``) as they read a ``.ckpt`` file.

What a resume restores exactly (on CPU with a deterministic data order, the final parameters equal
those of a run never stopped, and so do the batches it trains on and the metrics it logs): the
model, optimizers, LR schedulers (``ReduceLROnPlateau`` included), loop progress, callbacks,
datamodule and precision state; what ``self.log`` accumulated for the epoch and the metrics Lightning
reports (``trainer.callback_metrics``, which schedulers, ``EarlyStopping`` and ``monitor`` read); the
state of torchmetrics ``Metric`` objects the module holds; ``trainer.should_stop`` (in a fit of the same
``max_epochs`` and ``max_steps``: one of other bounds trains on, as after Lightning's own resume); the
``accumulate_grad_batches`` in force (``GradientAccumulationScheduler`` sets it at epoch start),
which parameters require gradients (``BaseFinetuning`` unfreezes at epoch start) and the masks of
pruned parameters (``ModelPruning``, whose checkpoints hold none); the
position in the epoch with a plain ``DataLoader`` (the epoch's shuffling is drawn again from the RNG states recorded
at its start, and the trained batches passed over); the RNG states of torch (CPU and CUDA), numpy,
``random`` and DataLoader generators, per rank. A step whose validation is due is saved after that
validation, and the last step of an epoch after the epoch's end, so that a resumed run owes neither;
what Lightning's restart still skips after the hook a checkpoint was taken in (a plateau scheduler's
step, the step's or epoch's metrics, which the loggers got from the run that saved it) is run by the resumed
run. A step is saved after the LightningModule's own ``on_train_batch_end`` (``on_validation_end`` when its
validation is due), which Lightning runs after the callbacks' hooks: what the module's hook changes is saved.
Loaders with ``state_dict``/``load_state_dict`` are positioned by Lightning itself.

Not restored, because no checkpoint can hold it:

- a time-based ``val_check_interval``: the resumed run validates by its own clock;
- after SIGTERM during gradient accumulation, nothing is saved (Lightning's batch position is past the
  step's first batches): the run resumes from the last step the save policy saved, not the last complete one;
- ``StochasticWeightAveraging`` resumed mid-epoch: Lightning's restart skips the epoch-start hook that
  swaps in its learning-rate scheduler (warned of); from an epoch's end it resumes exactly, and so does
  ``EMAWeightAveraging`` from any step;
- with ``persistent_workers=True``, randomness inside the DataLoader workers after the first epoch: the
  resumed run's workers draw new seeds, where the uninterrupted run keeps its workers across epochs;
- with an ``IterableDataset`` without ``__len__`` read in the main process (``num_workers=0``) that draws
  random numbers while it iterates, the batch Lightning had fetched ahead at the save: it was drawn between
  the previous steps' draws (dropout), which a resumed run cannot replay;
- a SIGTERM during validation, or during the training step of a batch whose validation is due: the step
  is saved partway through that validation, and the restarted run skips the rest of it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from ckpt.integrations.lightning.weights import load_from_checkpoint, load_weights

__all__ = ["CheckpointCallback", "load_from_checkpoint", "load_weights"]


def __getattr__(name: str) -> Any:
    if name == "CheckpointCallback":
        return importlib.import_module(f"{__name__}.{_namespace_module()}").CheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _namespace_module() -> str:
    imported = [name for name in ("lightning.pytorch", "pytorch_lightning") if name in sys.modules]
    if len(imported) == 1:
        return imported[0].replace(".", "_")
    if importlib.util.find_spec("lightning") is not None:
        return "lightning_pytorch"
    return "pytorch_lightning"
