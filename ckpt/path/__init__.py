"""Step directory naming (``ckpt.path.step``).

Example::

    names = ckpt.path.step.standard_name_format(step_prefix="step")
    ckptr = ckpt.Checkpointer("runs/exp1", step_name_format=names)   # steps in step_0, step_100, ...
"""
from ckpt.path import step

__all__ = ["step"]
