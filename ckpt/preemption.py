"""Preemption, detected without any framework: SIGTERM, ``notify()``, and JAX's preemption sync point.

``install()`` (called by every Checkpointer created on the main thread) puts a SIGTERM handler in front
of whatever handler is already installed and calls that one too, so a host framework (Lightning, a
scheduler's wrapper) still sees the signal. When the previous handler is the default (terminate):

- while a training loop listens (an open Checkpointer that has made a save decision with a policy
  that saves on a preemption, see :func:`listen`), the first SIGTERM only records the preemption, so
  that the loop saves the step and stops (also when ``notify()`` recorded one first: a cloud's notice, the
  scheduler's SIGTERM right behind it); a second SIGTERM terminates. A loop that goes on to a later
  step instead of stopping (it never asks ``reached_preemption``) is ended there, once the step is
  saved, as the SIGTERM would have ended it (:func:`end_deferred_sigterm`);
  A SIGTERM deferred after the loop's last save decision, for which no step is saved, is acted on when
  the loop's Checkpointer closes (:func:`end_unserved_sigterm`), or when the interpreter exits;
- else (a script that only reads checkpoints, a Checkpointer closed, a policy that never saves on a
  preemption) SIGTERM terminates at once, as it would without ckpt.

In a job of several ``jax.distributed`` processes, JAX's preemption service takes SIGTERM instead: a
SIGTERM to any process makes every process reach JAX's preemption sync point at the same step, which
the save decisions ask, and terminates none of them.

Example::

    for step in range(start, num_steps):
        state = train_step(state)
        ckptr.save(step, state)              # PreemptionCheckpointingPolicy saves this step
        if ckptr.reached_preemption(step):
            break
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import weakref
from typing import Any, Callable

_event = threading.Event()
_installed = False
_previous: Any = None
_listening: set[int] = set()  # ids of the objects that save on a preemption (see listen())
_deferred = False  # a SIGTERM whose default action (terminate) was put off for the loop to save
_served = False  # a step was saved since the preemption recorded now (see serve())


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
    global _deferred, _served
    _event.clear()
    _deferred = _served = False


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


def listen(owner: object) -> None:
    """Records that ``owner`` (a Checkpointer in a training loop) saves the step at which a preemption
    arrives: until :func:`unlisten`, or until ``owner`` is garbage collected (a Checkpointer dropped
    without ``close``), a first SIGTERM is deferred for it (see the module's docstring).

    Example::

        loop = object()                                  # what saves on a preemption, e.g. a hook of yours
        ckpt.preemption.listen(loop)                     # a first SIGTERM now waits for it to save
        ckpt.preemption.unlisten(loop)
    """
    if id(owner) in _listening:
        return
    _listening.add(id(owner))
    with contextlib.suppress(TypeError):  # (an object without weak references listens until unlisten)
        weakref.finalize(owner, _listening.discard, id(owner))


def unlisten(owner: object) -> None:
    """Ends what :func:`listen` began (a Checkpointer closed).

    Example::

        loop = object()
        ckpt.preemption.listen(loop)
        ckpt.preemption.unlisten(loop)                   # SIGTERM terminates at once again
    """
    _listening.discard(id(owner))


def end_deferred_sigterm(finish: Callable[[], None] = lambda: None) -> None:
    """Terminates the process as a deferred SIGTERM would have (a loop that went on past the step it
    saved for the preemption), after ``finish()`` (the wait for that step); nothing when no SIGTERM was
    deferred (a ``notify()``, or a loop going on after ``reset()``).

    Example::

        ckpt.preemption.end_deferred_sigterm()           # no SIGTERM was held back: nothing happens
    """
    if _deferred:
        finish()
        _terminate()


def serve() -> None:
    """Records that a step is being saved after the preemption recorded now (nothing when none is): the
    SIGTERM deferred for it is served, and closing a Checkpointer no longer ends the process for it.

    Example::

        ckpt.preemption.serve()                          # what a Checkpointer's save does
    """
    global _served
    _served = _served or _event.is_set()


def end_unserved_sigterm() -> None:
    """Terminates the process as a deferred SIGTERM would have, once nothing listens for one any more and
    no step was saved since it (:func:`serve`: it arrived after the training loop's last save decision), so
    that a SIGTERM held back for a save that never came is not swallowed; nothing when no SIGTERM was
    deferred, one was served, or something still listens.

    Example::

        ckpt.preemption.end_unserved_sigterm()           # no SIGTERM was held back: nothing happens
    """
    if _deferred and not _served and not _listening:
        _terminate()


def _end_at_exit() -> None:
    """At the interpreter's exit (after the saves still writing are finished), :func:`end_unserved_sigterm`
    of a script that ended without closing its Checkpointer: its exit status is SIGTERM's, not 0, which
    a scheduler would take for a job that finished. An exception that ended the script keeps its status
    (as when it leaves a Checkpointer's ``with`` block)."""
    if getattr(sys, "last_value", None) is None:  # (set by the interpreter for the exception it reports)
        _listening.clear()
        end_unserved_sigterm()


def _terminate() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)


def _handler(signum: int, frame: Any) -> None:
    global _deferred, _served
    _event.set()
    previous = _previous
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        if _deferred or not _listening:  # (a preemption notify() recorded first does not make this SIGTERM a second)
            _terminate()
        _deferred, _served = True, False  # (a step saved before served that notify() only)


def _forget_listeners_in_child() -> None:
    """After a fork, in the child (a DataLoader worker, a ``multiprocessing`` process): it runs none of the
    parent's training loops, so its SIGTERM (``Process.terminate()``) terminates it at once, not deferred
    for a save the child will never make."""
    global _deferred
    _listening.clear()
    _deferred = False


os.register_at_fork(after_in_child=_forget_listeners_in_child)


def _jax_listens() -> bool:
    """Whether JAX's preemption service takes SIGTERM in this process (a job of several ``jax.distributed``
    processes): it tells every process of the job, which :func:`reached` then asks. Its handler is set in
    C, where ``signal.getsignal`` does not see it, and replacing it would keep a SIGTERM to one process
    from the others."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    from jax._src import distributed

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None and jax.process_count() > 1


def install() -> None:
    """Installs the SIGTERM handler once per process (only possible from the main thread), except where
    JAX's preemption service takes SIGTERM (see :func:`_jax_listens`).

    Example::

        ckpt.preemption.install()        # every Checkpointer does this
    """
    global _installed, _previous
    if _installed or threading.current_thread() is not threading.main_thread() or _jax_listens():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is _handler:
        _installed = True
        return
    _previous = current
    signal.signal(signal.SIGTERM, _handler)
    atexit.register(_end_at_exit)
    _installed = True
