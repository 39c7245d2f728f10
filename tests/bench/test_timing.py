"""bench.timing: a method timed while a benchmark runs, then given back unchanged."""

from __future__ import annotations

import time

from bench.timing import call_timer


class Worker:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def work(self, n: int, *, pause_s: float = 0.0) -> int:
        time.sleep(pause_s)
        self.calls.append(n)
        return 2 * n


def test_call_timer_times_each_call_and_gives_the_method_back() -> None:
    worker, synced = Worker(), []
    with call_timer(worker, "work", after=lambda: synced.append(len(worker.calls))) as times:
        assert worker.work(1) == 2
        assert worker.work(2, pause_s=0.02) == 4
    assert worker.calls == [1, 2] and synced == [1, 2]  # `after` ran once per call, after it
    assert len(times) == 2 and times[0] >= 0 and times[1] >= 0.02
    assert "work" not in vars(worker)  # the class's method again
    worker.work(3)
    assert len(times) == 2
