"""The single background writer and ``AsyncResponse``.

At most one job runs at a time. A job's failure is kept and raised once, by the next ``wait`` (which
every new save, ``Checkpointer.wait`` and ``close`` call) or by its own response's ``result()``; once
even where two writers keep it (a two-tier save's local save, and its promotion that waited for it).

A process forked while a job runs (a worker started from the training loop) has no such job: its
copy of the writer has nothing in flight, so ``wait`` and ``close`` there return at once instead of
waiting for a thread that exists only in the parent.

A job still running when the interpreter exits (a script that ends after ``save_async`` without
``wait`` or ``close``) is finished at full speed first, so that its step is committed; a failure that
no caller was told of is logged then.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread  # (registers its exit hook before ckpt's: see _finish_at_exit)
import logging
import os
import threading
import weakref
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
logger = logging.getLogger("ckpt")
_RAISED = "_ckpt_raised"  # set on a failure once raised to a caller (see _first_raise)
_FAILED_JOB = "_ckpt_failed_job"  # set on a failure: the job it ended, in words (for the log at exit)


def _first_raise(error: BaseException) -> bool:
    """Records that ``error`` is being raised to a caller; whether it is the first time."""
    first = not getattr(error, _RAISED, False)
    setattr(error, _RAISED, True)
    return first


class AsyncResponse(Generic[T]):
    """The handle of a background operation.

    Example::

        with ckpt.Checkpointer("runs/exp1") as ckptr:
            response = ckptr.save_async(0, {"w": np.ones(3)})   # None when the policy skips the step
            response.on_complete(lambda saved: print("committed", saved))
            assert response.result(timeout=60)                 # re-raises a background failure
            assert response.done()
    """

    def __init__(self, future: concurrent.futures.Future, on_result: Callable[[], None] = lambda: None,
                 hurry: Callable[[], None] = lambda: None):
        self._future = future
        self._on_result = on_result
        self._hurry = hurry

    def result(self, timeout: float | None = None) -> T:
        """Waits for the operation and returns its value, or raises its error (TimeoutError on timeout).
        A save written in the background on about one core goes on at full speed meanwhile."""
        if not self._future.done():
            self._hurry()
        try:
            return self._future.result(timeout)
        except BaseException as e:
            if isinstance(e, concurrent.futures.TimeoutError) and not self._future.done():  # (else the operation's)
                raise TimeoutError(f"the background operation did not finish within {timeout} s") from None
            _first_raise(e)
            self._on_result()
            raise

    def exception(self, *, hurry: bool = True) -> BaseException | None:
        """Waits for the operation and returns its error, or None; unlike ``result()`` it leaves the error to
        be raised by the next ``save``, ``wait`` or ``close`` (for a job that waits for another's outcome).
        ``hurry=False``: a save written in the background goes on at its own pace."""
        if hurry and not self._future.done():
            self._hurry()
        return self._future.exception()

    def done(self) -> bool:
        """True once the operation finished, successfully or not."""
        return self._future.done()

    def on_complete(self, callback: Callable[[T], None]) -> None:
        """Calls ``callback(value)`` once the operation succeeds (at once if it already has)."""

        def call(future: concurrent.futures.Future) -> None:
            if future.exception() is None:
                callback(future.result())

        self._future.add_done_callback(call)


def _nothing() -> None:
    pass


def finished(value: T) -> AsyncResponse[T]:
    """An AsyncResponse that is already complete."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return AsyncResponse(future)


def failed(error: BaseException) -> AsyncResponse:
    """An AsyncResponse that already failed with ``error``."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(error)
    return AsyncResponse(future)


class BackgroundWriter:
    """Runs one job at a time on a daemon thread and keeps the first failure for the next ``wait``."""

    def __init__(self, name: str = "ckpt-writer"):
        self._name = name
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        # The thread starts now: started by the first save, it would take the GIL from the caller
        # (for 2-3 ms) before save_async returns.
        self._executor.submit(lambda: None)
        self._future: concurrent.futures.Future | None = None
        self._hurry: Callable[[], None] = _nothing
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        # The jobs submitted and not ended, in words, in order (each job's future is done a moment later);
        # several are queued.
        self._unended: list[str] = []
        self._when_idle: list[Callable[[], None]] = []
        _writers.add(self)

    def _forget_parent_job(self) -> None:
        """In a forked child: the job in flight, its failure and its thread are the parent's; the child's
        writer starts with none (a thread of its own on its first job)."""
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._future, self._hurry, self._error = None, _nothing, None
        self._lock = threading.Lock()
        self._unended, self._when_idle = [], []

    def submit(self, job: Callable[[], Any], hurry: Callable[[], None] = lambda: None, *,
               what: str = "a background job") -> AsyncResponse:
        """Starts ``job`` in the background, once the jobs submitted before it have ended (a save waits for the
        previous one first; a local tier queues a promotion behind the one running). ``hurry()`` asks the job
        to finish at full speed: :meth:`wait` calls it. ``what``: the job in words ("the deletion of step 3"),
        which the interpreter's exit names while it waits for the job."""
        self._hurry = hurry  # forgotten once the jobs end: it may hold the job's memory
        with self._lock:
            self._unended.append(what)
        _unfinished.add(self)
        future = self._executor.submit(self._run, job, what)
        self._future = future
        return AsyncResponse(future, on_result=self._clear_error, hurry=self.hurry)

    def _run(self, job: Callable[[], Any], what: str) -> Any:
        try:
            result = job()
        except BaseException as e:
            if not hasattr(e, _FAILED_JOB):  # (a failure two jobs raise: the first one's)
                setattr(e, _FAILED_JOB, what)
            with self._lock:
                if self._error is None:
                    self._error = e
            raise
        finally:
            with self._lock:
                self._unended.pop(0)
                idle = [] if self._unended else self._when_idle
                if not self._unended:
                    self._hurry, self._when_idle = _nothing, []
            for callback in idle:
                callback()
        self._settled()  # (a failed job's writer stays there until its failure is raised)
        return result

    def hurry(self) -> None:
        """Asks the job in flight to finish at full speed (see ``submit``)."""
        self._hurry()

    def _clear_error(self) -> None:
        with self._lock:
            self._error = None
        self._settled()

    def _settled(self) -> None:
        """Leaves the writers the interpreter's exit waits for, once no job is queued or running and no
        failure is left to raise (a job ended while the next is queued: not yet)."""
        with self._lock:
            if not self._unended and self._error is None:
                _unfinished.discard(self)

    def in_progress(self) -> bool:
        return self._future is not None and not self._future.done()

    def unended(self) -> list[str]:
        """The jobs running or queued, in words, in order (see ``submit``)."""
        with self._lock:
            return list(self._unended)

    def wait(self, timeout: float | None) -> None:
        """Hurries the job in flight and waits for it and those queued; raises a failure not yet reported (once).
        After ``timeout``, a TimeoutError names the job running (see ``submit``) and those queued behind it."""
        future = self._future
        if future is not None and not future.done():
            self.hurry()
            done, _ = concurrent.futures.wait([future], timeout=timeout)
            if not done:
                running, *queued = self.unended() or ["a background job"]
                raise TimeoutError(f"{running} is still running after {timeout} s (AsyncOptions.timeout_secs)"
                                   + (f"; queued behind it: {'; '.join(queued)}" if queued else ""))
        if future is None or future.done():
            _unfinished.discard(self)
        self.raise_failure()

    def raise_failure(self) -> None:
        """Raises a failure not yet reported (once), without waiting for the job in flight."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None and _first_raise(error):
            raise error

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` once the jobs in flight and queued have ended, before the last one's response gives
        its result (at once when none is)."""
        with self._lock:
            if self._unended:
                self._when_idle.append(callback)
                return
        callback()

    def shutdown(self, wait: bool = True) -> None:
        """Ends the thread once the job in flight is done; with ``wait``, returns only then."""
        self._executor.shutdown(wait=wait)


_unfinished: set[BackgroundWriter] = set()  # writers with a job running, or a failure not yet raised
_writers: "weakref.WeakSet[BackgroundWriter]" = weakref.WeakSet()  # every writer of this process


def _finish_at_exit() -> None:
    """Finishes the background jobs still running when the interpreter exits, at full speed, and logs
    the failures no caller was told of. It runs before concurrent.futures' own exit hook, which
    makes every thread pool refuse work (a save then running fails) and joins their threads:
    ``threading._register_atexit`` calls its hooks newest first, and ckpt's is registered after
    that module's (an ``atexit`` hook would run after the threads are joined). Python runs no signal
    handler while it exits: Ctrl-C does not stop the wait, SIGKILL does (the next save of the root
    removes the temporary directory left)."""
    for writer in list(_unfinished):
        unended = writer.unended()
        if unended:
            logger.warning("ckpt: the interpreter is exiting with background work unfinished (%s): finishing it first "
                           "(call Checkpointer.wait() or close() before the end of the script)", "; ".join(unended))
        try:
            writer.wait(None)
        except Exception as e:  # (a second Ctrl-C stops the wait)
            logger.error("ckpt: %s failed in the background before the interpreter exited: %s: %s",
                         getattr(e, _FAILED_JOB, "a background job"), type(e).__name__, e)


def _forget_parent_jobs() -> None:
    """After a fork, in the child, which runs none of its parent's jobs (see
    :meth:`BackgroundWriter._forget_parent_job`)."""
    _unfinished.clear()
    for writer in list(_writers):
        writer._forget_parent_job()


threading._register_atexit(_finish_at_exit)
os.register_at_fork(after_in_child=_forget_parent_jobs)
