"""Preemption, detected without any framework: SIGTERM, ``notify()``, and JAX's preemption sync point.

``install()`` (called by every Checkpointer created on the main thread) puts a SIGTERM handler in front
of whatever handler is already installed and calls that one too, so a host framework (Lightning, a
scheduler's wrapper) still sees the signal. When the previous handler is the default (terminate), the
first SIGTERM only records the preemption, so the loop can save and stop; a second SIGTERM terminates.

Example::

    for step in range(start, num_steps):
        state = train_step(state)
        ckptr.save(step, state)              # PreemptionCheckpointingPolicy saves this step
        if ckptr.reached_preemption(step):
            break
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

_event = threading.Event()
_installed = False
_previous: Any = None


def notify() -> None:
    """Records a preemption announced another way (a scheduler's notice, a cloud metadata event).

    Example::

        ckpt.preemption.notify()                         # e.g. on a cloud's maintenance notice
        assert ckpt.preemption.preempted()               # the next save decision saves and latches
    """
    _event.set()


def reset() -> None:
    """Forgets a recorded preemption (for a process that carries on after saving).

    Example::

        ckpt.preemption.notify()
        ckpt.preemption.reset()                          # saved, and the job goes on after all
        assert not ckpt.preemption.preempted()
    """
    _event.clear()


def preempted() -> bool:
    """True once SIGTERM was received or ``notify()`` was called in this process.

    Example::

        if ckpt.preemption.preempted():
            print("SIGTERM received: save now and stop")
    """
    return _event.is_set()


def reached(step: int) -> bool:
    """True when this process was preempted, or JAX's preemption service says ``step`` is the sync point.

    Example::

        ckpt.preemption.notify()
        assert ckpt.preemption.reached(100)              # what a Checkpointer's save decision asks
    """
    if _event.is_set():
        return True
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    try:
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, ImportError, AttributeError):
        return False
    return False


def _handler(signum: int, frame: Any) -> None:
    first = not _event.is_set()
    _event.set()
    previous = _previous
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL and not first:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


def install() -> None:
    """Installs the SIGTERM handler once per process (only possible from the main thread).

    Example::

        ckpt.preemption.install()        # every Checkpointer does this; call it first to catch an early SIGTERM
    """
    global _installed, _previous
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is _handler:
        _installed = True
        return
    _previous = current
    signal.signal(signal.SIGTERM, _handler)
    _installed = True
