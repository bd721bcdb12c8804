"""Progress of long saves, loads and verifications, reported on the ``ckpt.progress`` logger.

Off by default: the records are INFO records, which Python shows only once a handler is set up, and
an operation reports nothing until it has run for ``DELAY_SECS``. The ``ckpt`` command turns it on;
in a program, call :func:`enable` (or configure the ``ckpt.progress`` logger yourself).

Example::

    import ckpt
    ckpt.progress.enable()          # progress of long operations on stderr
    ckpt.save("/tmp/big", state)    # after 2 s: "saving /tmp/big: 1.2 GiB of 4.0 GiB (30%), 610 MiB/s"
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

logger = logging.getLogger("ckpt.progress")

DELAY_SECS = 2.0      # an operation shorter than this reports nothing
INTERVAL_SECS = 0.5   # then at most one report per interval


def format_bytes(nbytes: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``3.2 GiB``.

    Example::

        format_bytes(3 << 30)   # '3.0 GiB'
    """
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(nbytes) >= 1024 and i < len(units) - 1:
        nbytes /= 1024
        i += 1
    return f"{nbytes:.0f} B" if i == 0 else f"{nbytes:.1f} {units[i]}"


class Tracker:
    """Counts the bytes one operation has done and logs its progress once it runs long.

    Cheap enough to advance per leaf or per chunk: a call costs a lock and a clock read unless a report
    is due.

    Example::

        tracker = Tracker("verifying runs/exp1/100", total_bytes=total)
        for chunk in chunks:
            check(chunk)
            tracker.advance(chunk.nbytes)
        tracker.finish()
    """

    def __init__(self, what: str, total_bytes: int, *, delay_secs: float | None = None,
                 interval_secs: float | None = None):
        self.what = what
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self._start = time.monotonic()
        self._next = self._start + (DELAY_SECS if delay_secs is None else delay_secs)
        self._interval = INTERVAL_SECS if interval_secs is None else interval_secs
        self._reported = False
        self._lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        """Adds ``nbytes`` to the work done; logs a report when one is due (safe from several threads)."""
        with self._lock:
            self.done_bytes += nbytes
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self._interval
                self._report(now, finished=False)

    def finish(self) -> None:
        """Logs a last report (with the elapsed time) if any report was logged before."""
        if self._reported:
            self._report(time.monotonic(), finished=True)

    def _report(self, now: float, *, finished: bool) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        self._reported = True
        elapsed = max(now - self._start, 1e-9)
        done, total = self.done_bytes, self.total_bytes
        percent = f" ({100 * done / total:.0f}%)" if total else ""
        tail = f"done in {elapsed:.1f} s" if finished else f"{format_bytes(done / elapsed)}/s"
        logger.info("%s: %s of %s%s, %s", self.what, format_bytes(done), format_bytes(total), percent, tail,
                    extra={"ckpt_finished": finished})


class _Handler(logging.Handler):
    """Writes progress to a stream (stderr as it is at each write when none is given); on a terminal,
    rewrites one line until the operation finishes."""

    def __init__(self, stream: TextIO | None):
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if self._stream is None else self._stream
            rewrite = stream.isatty()
            end = "" if rewrite and not getattr(record, "ckpt_finished", True) else "\n"
            stream.write(("\r\033[K" if rewrite else "") + self.format(record) + end)
            stream.flush()
        except Exception:  # noqa: BLE001  (logging's contract: a handler reports its errors, never raises)
            self.handleError(record)


def enable(stream: TextIO | None = None) -> logging.Handler:
    """Shows the progress of long saves, loads and verifications on ``stream`` (default: stderr).

    Returns the handler; ``logging.getLogger("ckpt.progress").removeHandler(handler)`` turns it off.
    Calling it again replaces the previous handler.

    Example::

        handler = ckpt.progress.enable()
    """
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    handler = _Handler(stream)
    handler.setFormatter(logging.Formatter("ckpt: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
