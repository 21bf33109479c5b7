"""A background thread for store writes, so disk IO overlaps with generation.

The harvest loop hands each finished unit to `BackgroundWriter.submit` as a job (a callable that
encodes the unit's images, concatenates its rows and calls `StoreWriter.write_unit`) and goes on
generating the next unit. The queue is bounded (`max_pending` units wait at most; `submit`
blocks beyond that), so memory stays at a few units whatever the disk's speed.

Guarantees, on top of the writer's own (a unit is committed by its record file, written last):

- jobs run one at a time, in submission order;
- the first failure stops the thread: later jobs are dropped (their units are simply not
  committed, so `--resume` redoes them) and the exception is raised again, unchanged, from the
  next `submit` or from `close`;
- leaving the `with` block because of an error in the generating thread drops the jobs not yet
  started, waits for the one in progress to finish (commit or not, never half) and lets the
  original error propagate.

`max_pending=0` runs every job synchronously inside `submit` (the old behaviour, for comparison).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    def __init__(self, max_pending: int = 2, *, name: str = "difflens-store-writer"):
        if int(max_pending) < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        self.max_pending = int(max_pending)
        self.results: list[Any] = []  # each job's return value, in order
        self.busy_seconds = 0.0  # time spent running jobs (in the thread, or inline when synchronous)
        self.wait_seconds = 0.0  # time `submit` blocked because the queue was full
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        if self.max_pending:
            self._queue = queue.Queue(maxsize=self.max_pending)
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    # ---- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._error is not None or self._abort.is_set():
                    continue  # dropped: its unit is not committed
                t = time.perf_counter()
                try:
                    self.results.append(job())
                except BaseException as e:  # noqa: BLE001 - handed to the generating thread
                    self._error = e
                finally:
                    self.busy_seconds += time.perf_counter() - t
            finally:
                self._queue.task_done()

    # ---- the generating thread ----------------------------------------------------------------
    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue `job` (blocks while `max_pending` jobs wait); raises an earlier job's error."""
        self._raise_pending()
        if self._queue is None:
            t = time.perf_counter()
            try:
                self.results.append(job())
            finally:
                self.busy_seconds += time.perf_counter() - t
            return
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the background store writer is closed")
        t = time.perf_counter()
        while True:
            try:
                self._queue.put(job, timeout=0.5)
                break
            except queue.Full:
                self._raise_pending()  # the thread died on an error and will not drain the queue
        self.wait_seconds += time.perf_counter() - t

    def close(self, *, abort: bool = False) -> None:
        """Wait for queued jobs (or, with abort, only the one in progress) and stop the thread;
        raises the first job error unless aborting."""
        if self._thread is not None:
            if abort:
                self._abort.set()
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if not abort:
            self._raise_pending()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)
