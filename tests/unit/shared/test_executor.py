"""CallExecutor: the gRPC server's thread pool (what grpcio needs of an executor)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from modelguard.executor import CallExecutor, CallFuture


def test_calls_run_on_at_most_max_workers_threads_and_callbacks_run_once() -> None:
    executor = CallExecutor(3, thread_name_prefix="t")
    running, peak, lock = 0, 0, threading.Lock()
    gate = threading.Event()
    names: set[str] = set()
    done: list[int] = []

    def call(number: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        gate.wait(5)
        with lock:
            running -= 1

    def finished(number: int) -> Callable[[CallFuture], None]:
        return lambda future: done.append(number)

    futures = [executor.submit(call, n) for n in range(20)]
    for number, future in enumerate(futures):
        future.add_done_callback(finished(number))
    deadline = time.monotonic() + 10
    while running < 3 and time.monotonic() < deadline:  # every thread busy, 17 queued
        time.sleep(0.001)
    time.sleep(0.05)  # a fourth thread, were there one, would have started by now
    gate.set()
    executor.shutdown(wait=True)
    assert peak == 3 and len(names) == 3 and all(name.startswith("t_") for name in names)
    assert sorted(done) == list(range(20)) and all(f.done() for f in futures)


def test_a_callback_added_after_completion_runs_at_once_in_the_caller() -> None:
    executor = CallExecutor(1)
    future = executor.submit(lambda: None)
    executor.shutdown(wait=True)
    seen: list[tuple[CallFuture, str]] = []
    future.add_done_callback(lambda f: seen.append((f, threading.current_thread().name)))
    assert seen == [(future, threading.current_thread().name)]


def test_a_raising_call_or_callback_is_logged_and_the_thread_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    executor = CallExecutor(1)
    after: list[str] = []

    def boom() -> None:
        raise RuntimeError("call failed")

    failing = executor.submit(boom)
    failing.add_done_callback(lambda f: (_ for _ in ()).throw(ValueError("callback failed")))
    executor.submit(after.append, "still served").add_done_callback(lambda f: after.append("cb"))
    executor.shutdown(wait=True)
    assert after == ["still served", "cb"] and failing.done()
    assert "call failed" in caplog.text and "callback failed" in caplog.text


def test_shutdown_finishes_queued_calls_and_refuses_new_ones() -> None:
    executor = CallExecutor(2)
    finished: list[int] = []

    def call(number: int) -> None:
        time.sleep(0.001)
        finished.append(number)

    for number in range(10):
        executor.submit(call, number)
    executor.shutdown(wait=True)
    assert sorted(finished) == list(range(10))
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(print)
    executor.shutdown(wait=True)  # twice is fine
    with pytest.raises(ValueError):
        CallExecutor(0)


def test_no_thread_starts_before_the_first_call() -> None:
    before = threading.active_count()
    executor = CallExecutor(4)
    assert threading.active_count() == before
    executor.submit(lambda: None)
    assert threading.active_count() == before + 4
    executor.shutdown(wait=True)
    assert threading.active_count() == before
