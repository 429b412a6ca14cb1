"""``AsyncFlusher``: run checkpoint writes on one background thread, off the training loop.

The training thread hands over a job (typically ``functools.partial(store.write, step, parts)``) and
carries on; one daemon thread runs jobs in submission order. Design choices:

- **One thread.** Writes of consecutive checkpoints never interleave, so "newest complete" is also
  "newest submitted". Storage bandwidth, not CPU, bounds a flush, so more threads would not help much.
- **Bounded queue** (``max_pending`` jobs waiting, besides the one running). A job holds a whole
  checkpoint's bytes; an unbounded queue in front of a slow store grows until the process runs out of
  memory. When full, ``submit`` blocks the caller: that backpressure is the signal that storage is
  slower than the checkpoint rate (raise ``durable_every``).
- **Errors are never lost.** A failed job is logged at once and its exception kept; the next
  ``submit``, ``flush`` or ``close`` raises ``FlushError`` with every failure since the last report.
  The thread keeps going, so one bad write does not stop later ones.
- **Every wait has a deadline.** ``submit``, ``flush`` and ``close`` take a timeout in seconds and
  raise ``FlushTimeout`` rather than hang on a stalled filesystem. Pick it above the time one
  checkpoint takes to write (size / storage bandwidth), with margin.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from zetta_ray.errors import CheckpointError, ConfigError, FlushError, FlushTimeout

__all__ = ["AsyncFlusher"]

logger = logging.getLogger(__name__)


class AsyncFlusher:
    """A single background thread with a bounded queue of jobs. Use as a context manager, or ``close()``.

    Example::

        flusher = AsyncFlusher(max_pending=1)
        flusher.submit(functools.partial(store.write, step, parts), label=f"step {step}")
        ...
        flusher.close(timeout=300)  # waits for pending writes, raises any background error
    """

    def __init__(self, *, max_pending: int = 2, name: str = "zetta-ray-checkpoint-flusher"):
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ConfigError(f"AsyncFlusher.max_pending={max_pending!r} is invalid: must be an integer >= 1")
        self.name = name
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()
        self._running: str | None = None
        self._failures: list[tuple[str, BaseException]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------------------

    def submit(self, job: Callable[[], Any], *, label: str = "", timeout: float = 60.0) -> None:
        """Queue ``job`` (a no-argument callable). Blocks at most ``timeout`` s while the queue is full.

        Raises ``FlushError`` for earlier background failures (the job is then *not* queued; resubmit
        it after handling the error), ``FlushTimeout`` when no slot frees in time, and
        ``CheckpointError`` after ``close``.
        """
        _check_timeout(timeout)
        label = label or getattr(job, "__name__", repr(job))
        with self._cond:
            self._raise_failures()
            if self._closing:
                raise CheckpointError(
                    f"{self.name!r} is closed; create a new AsyncFlusher to submit {label!r}"
                )
            if not self._cond.wait_for(lambda: len(self._queue) < self.max_pending, timeout):
                raise FlushTimeout(
                    f"{self.name!r}: no queue slot for {label!r} within {timeout:g} s ({len(self._queue)} "
                    f"waiting, {self._running!r} running): storage is slower than the checkpoint rate; "
                    "write durable checkpoints less often or raise the timeout"
                )
            self._queue.append((label, job))
            self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait at most ``timeout`` s until every submitted job has run; then raise any failure."""
        _check_timeout(timeout)
        with self._cond:
            if not self._cond.wait_for(self._idle, timeout):
                raise FlushTimeout(
                    f"{self.name!r}: jobs still pending after {timeout:g} s ({self._running!r} running, "
                    f"{len(self._queue)} waiting); raise the timeout above one checkpoint's write time"
                )
            self._raise_failures()

    def close(self, timeout: float) -> None:
        """Run what is queued, stop the thread and raise any failure. Idempotent.

        If the jobs do not finish within ``timeout`` s this raises ``FlushTimeout``; the daemon thread is
        left to finish (or die with the process) rather than blocking the caller.
        """
        _check_timeout(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            if self._thread.is_alive():
                raise FlushTimeout(
                    f"{self.name!r}: close() timed out after {timeout:g} s with {self._running!r} running "
                    f"and {len(self._queue)} waiting; the store may be stalled"
                )
            self._raise_failures()

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def __enter__(self) -> AsyncFlusher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close(timeout=300.0)
            return
        try:  # an exception is already on its way out: report flush failures, do not mask it
            self.close(timeout=300.0)
        except CheckpointError as e:
            logger.error("%s: closing while %s propagates: %s", self.name, exc_type.__name__, e)

    # -- worker side --------------------------------------------------------------------------------

    def _idle(self) -> bool:
        return not self._queue and self._running is None

    def _raise_failures(self) -> None:
        if self._failures:
            failures, self._failures = self._failures, []
            raise FlushError(name=self.name, failures=failures) from failures[0][1]

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return  # closing, and nothing left to run
                label, job = self._queue.popleft()
                self._running = label
                self._cond.notify_all()
            try:
                job()
            # A background thread must never die quietly: record everything, including SystemExit.
            except BaseException as e:  # noqa: BLE001
                logger.error("%s: job %r failed: %s: %s", self.name, label, type(e).__name__, e, exc_info=e)
                with self._cond:
                    self._failures.append((label, e))
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()


def _check_timeout(timeout: float) -> None:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
        raise ConfigError(f"timeout={timeout!r} is invalid: must be a number of seconds >= 0")
    if math.isinf(timeout):
        raise ConfigError("timeout=inf is invalid: every wait needs a deadline; pass a finite number")
