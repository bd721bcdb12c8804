"""Step directory naming (``ckpt.path.step``), and Orbax's path types for annotations (``Path``,
``PathLike``, ``PathAwaitingCreation``: what a handler's ``save`` gets).

Example::

    names = ckpt.path.step.standard_name_format(step_prefix="step")
    ckptr = ckpt.Checkpointer("runs/exp1", step_name_format=names)   # steps in step_0, step_100, ...
"""
import os
from pathlib import Path
from typing import Union

from ckpt.handlers import PathAwaitingCreation
from ckpt.path import step

PathLike = Union[str, os.PathLike]
"""A path as ckpt takes one (Orbax's ``ocp.path.PathLike``); ``Path`` is what a handler's ``load`` gets."""

__all__ = ["Path", "PathAwaitingCreation", "PathLike", "step"]
