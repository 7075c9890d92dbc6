"""Overlapping the stages of a large source: reading the next batch and writing the last one
while the current one is validated. Each stage spends its time in numpy, pyarrow or DuckDB code
that releases the GIL, so on two cores a thread per stage runs them side by side. The standard
library's queue and executor do the work; what is here only carries errors and stops cleanly.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()
PR_SET_THP_DISABLE = 41  # linux/prctl.h


@functools.cache
def without_huge_pages() -> bool:
    """Turn transparent huge pages off for this process (Linux), unless BRONZE_HUGE_PAGES=1.

    numpy and pyarrow's allocator ask for huge pages for large buffers, so each first touch of
    fresh memory makes the kernel clear 2 MiB; a run allocates and frees buffers batch after batch,
    and clearing pages was a tenth of its CPU samples (perf, 5M sensors rows). With 4 KiB pages,
    paired runs took 0.88 of the time for 5M sensors rows, 0.96 for 5M orders and 0.98 for 2M
    events. Whether it took effect is returned (False elsewhere, or if the call fails)."""
    if sys.platform != "linux" or os.environ.get("BRONZE_HUGE_PAGES") == "1":
        return False
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def prefetched(items: Iterator[T], *, depth: int = 2) -> Iterator[T]:
    """``items``, produced by a thread of their own up to ``depth`` ahead of the consumer. An
    exception raised while producing is raised to the consumer at the same place."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(exc)

    thread = threading.Thread(target=produce, name="bronze-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def in_order(fn: Callable[[T, int], R], items: Iterator[T], *, lanes: int) -> Generator[R, None, None]:
    """``fn(item, lane)`` over ``items``, up to ``lanes`` calls at once on threads of their own,
    the results in the items' order. Item i runs in lane i % lanes once the lane's previous item
    is done, so what a lane keeps (a database connection) is never used by two calls at once.
    With one lane the calls run on the caller's thread."""
    if lanes <= 1:
        for item in items:
            yield fn(item, 0)
        return
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="bronze-lane")
    pending: deque[Future[R]] = deque()
    try:
        for i, item in enumerate(items):
            pending.append(pool.submit(fn, item, i % lanes))
            if len(pending) == lanes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


class Background:
    """Calls run one after another on a thread of their own, at most ``depth`` waiting; the
    first error is raised by the next ``submit`` or by ``drain``."""

    def __init__(self, *, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bronze-writer")
        self._pending: list[Future[Any]] = []
        self._depth = depth

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._depth:
            self._pending.pop(0).result()

    def drain(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            self._pool.shutdown(wait=True)

    def __del__(self) -> None:
        self._pool.shutdown(wait=False)
