"""``CheckpointCallback`` for the ``lightning.pytorch`` namespace (the ``lightning`` package).

Example::

    import lightning.pytorch as pl
    from ckpt.integrations.lightning.lightning_pytorch import CheckpointCallback

    pl.Trainer(callbacks=[CheckpointCallback("runs/exp1")]).fit(model, data)
"""
from lightning.pytorch.callbacks import Checkpoint

from ckpt.integrations.lightning.mixin import CheckpointCallbackMixin


class CheckpointCallback(CheckpointCallbackMixin, Checkpoint):
    __doc__ = CheckpointCallbackMixin.__doc__
    lightning_package = "lightning.pytorch"
