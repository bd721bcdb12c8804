"""The single background writer and ``AsyncResponse``.

At most one job runs at a time. A job's failure is kept and raised once, by the next ``wait`` (which
every new save, ``Checkpointer.wait`` and ``close`` call) or by its own response's ``result()``.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class AsyncResponse(Generic[T]):
    """The handle of a background operation.

    Example::

        with ckpt.Checkpointer("runs/exp1") as ckptr:
            response = ckptr.save_async(0, {"w": np.ones(3)})   # None when the policy skips the step
            response.on_complete(lambda saved: print("committed", saved))
            assert response.result(timeout=60)                 # re-raises a background failure
            assert response.done()
    """

    def __init__(self, future: concurrent.futures.Future, on_result: Callable[[], None] = lambda: None):
        self._future = future
        self._on_result = on_result

    def result(self, timeout: float | None = None) -> T:
        """Waits for the operation and returns its value, or raises its error (TimeoutError on timeout)."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the background operation did not finish within {timeout} s") from None
        except BaseException:
            self._on_result()
            raise

    def done(self) -> bool:
        """True once the operation finished, successfully or not."""
        return self._future.done()

    def on_complete(self, callback: Callable[[T], None]) -> None:
        """Calls ``callback(value)`` once the operation succeeds (at once if it already has)."""

        def call(future: concurrent.futures.Future) -> None:
            if future.exception() is None:
                callback(future.result())

        self._future.add_done_callback(call)


def finished(value: T) -> AsyncResponse[T]:
    """An AsyncResponse that is already complete."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return AsyncResponse(future)


class BackgroundWriter:
    """Runs one job at a time on a daemon thread and keeps the first failure for the next ``wait``."""

    def __init__(self, name: str = "ckpt-writer"):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        # The thread starts now: started by the first save, it would take the GIL from the caller
        # (for 2-3 ms) before save_async returns.
        self._executor.submit(lambda: None)
        self._future: concurrent.futures.Future | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], Any]) -> AsyncResponse:
        """Starts ``job`` in the background; the caller must have waited for the previous one."""
        future = self._executor.submit(self._run, job)
        self._future = future
        return AsyncResponse(future, on_result=self._clear_error)

    def _run(self, job: Callable[[], Any]) -> Any:
        try:
            return job()
        except BaseException as e:
            with self._lock:
                if self._error is None:
                    self._error = e
            raise

    def _clear_error(self) -> None:
        with self._lock:
            self._error = None

    def in_progress(self) -> bool:
        return self._future is not None and not self._future.done()

    def wait(self, timeout: float | None) -> None:
        """Waits for the job in flight; raises a failure not yet reported (once)."""
        future = self._future
        if future is not None:
            done, _ = concurrent.futures.wait([future], timeout=timeout)
            if not done:
                raise TimeoutError(f"a checkpoint save is still running after {timeout} s "
                                   "(AsyncOptions.timeout_secs)")
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
