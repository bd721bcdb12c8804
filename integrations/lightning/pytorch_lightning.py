"""``CheckpointCallback`` for the ``pytorch_lightning`` namespace (the ``pytorch-lightning`` package).

Example::

    import pytorch_lightning as pl
    from ckpt.integrations.lightning.pytorch_lightning import CheckpointCallback

    pl.Trainer(callbacks=[CheckpointCallback("runs/exp1")]).fit(model, data)
"""
from pytorch_lightning.callbacks import Checkpoint

from ckpt.integrations.lightning.mixin import CheckpointCallbackMixin


class CheckpointCallback(CheckpointCallbackMixin, Checkpoint):
    __doc__ = CheckpointCallbackMixin.__doc__
    lightning_package = "pytorch_lightning"
