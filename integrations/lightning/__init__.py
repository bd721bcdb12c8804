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
``best_model_path`` and ``last_model_path`` are step directories: read them with :func:`load_weights`
(Lightning's ``ckpt_path=`` expects a ``torch.save`` file).

What a resume restores exactly (on CPU with a deterministic data order, the final parameters equal
those of a run never stopped): the model, optimizers, LR schedulers, loop progress, callbacks,
datamodule and precision state; the position in the epoch with a plain ``DataLoader`` (the epoch's
shuffling is drawn again from the RNG states recorded at its start, and the trained batches passed
over); the RNG states of torch (CPU and CUDA), numpy, ``random`` and DataLoader generators, per rank.
Not restored: a validation run due at the checkpointed step (Lightning skips it on resume, with any
global RNG draws it would have made), and the seeds of DataLoader workers in the first epoch.
Loaders with ``state_dict``/``load_state_dict`` are positioned by Lightning itself. After SIGTERM
during gradient accumulation, the run resumes from the last step whose accumulation was complete.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from ckpt.integrations.lightning.weights import load_weights

__all__ = ["CheckpointCallback", "load_weights"]


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
