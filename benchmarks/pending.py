"""``Pending``: what every system's ``save_async`` returns, so the harness can wait or poll alike."""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass
class Pending:
    """A background save: ``wait()`` blocks until it is committed (raising its error), ``done()`` polls."""

    wait: Callable[[], object]
    done: Callable[[], bool]


def finished() -> Pending:
    """A save that has nothing left to do."""
    return Pending(wait=lambda: None, done=lambda: True)
