"""The gRPC server's thread pool: a fixed set of threads reading one queue.

grpcio's sync server hands every call to its executor with ``submit`` and only ever calls
``add_done_callback`` on what comes back. `concurrent.futures.ThreadPoolExecutor` does
much more per call in Python: a `Future` with its own condition variable, a work item,
an idle-thread semaphore (a Python-level condition) taken on submit and released after
each call, and the running/result state changes. On the result-mapper, whose calls take
tens of microseconds, that bookkeeping was a visible share of a call: with this pool the
server answered 10–17% more Map calls a second at concurrency 8 and 32 (bench_serving's
set-up, three alternating runs each).

Semantics kept: at most ``max_workers`` calls run at once, in submission order; a call
that raises is logged and does not take its thread down; done callbacks run exactly
once, in the worker (or at once in the caller when the call has already finished), as
`Future.add_done_callback` does; ``shutdown`` lets queued calls finish first.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

log = logging.getLogger(__name__)


class CallFuture:
    """What `CallExecutor.submit` returns: completion and its callbacks, no result (the
    gRPC server never reads one)."""

    __slots__ = ("_callbacks", "_done", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[CallFuture], Any]] = []
        self._done = False

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, callback: Callable[[CallFuture], Any]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        _run_callback(callback, self)

    def _finish(self) -> None:
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run_callback(callback, self)


def _run_callback(callback: Callable[[CallFuture], Any], future: CallFuture) -> None:
    try:
        callback(future)
    except Exception:
        log.exception("done callback %r raised", callback)


_STOP = None


class CallExecutor(futures.Executor):
    """A fixed pool of ``max_workers`` threads, started on the first call."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix or "call-executor"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False

    def _start(self) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._threads:
                return
            for number in range(self.max_workers):
                thread = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{number}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> CallFuture:
        if self._shutdown or not self._threads:
            self._start()  # raises after shutdown
        future = CallFuture()
        self._queue.put((fn, args, kwargs, future))
        return future

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            fn, args, kwargs, future = item
            try:
                fn(*args, **kwargs)
            except BaseException:  # a thread of the pool must outlive any call
                log.exception("call %r raised", fn)
            future._finish()
            del item, fn, args, kwargs, future  # drop the references while idle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; the threads finish what is queued, then exit (``wait``:
        until they have). ``cancel_futures`` is not supported: queued calls still run."""
        with self._lock:
            if self._shutdown:
                threads: list[threading.Thread] = []
            else:
                self._shutdown = True
                threads = list(self._threads)
                for _ in threads:
                    self._queue.put(_STOP)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
