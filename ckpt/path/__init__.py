"""Step directory naming (``ckpt.path.step``)."""
from ckpt.path import step

__all__ = ["step"]
