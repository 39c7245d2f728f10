"""Timing one method of a live object while a benchmark runs, without changing what the method does."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def call_timer(obj: Any, name: str, after: Callable[[], None] | None = None) -> Iterator[list[float]]:
    """While open, the seconds of each `obj.<name>(...)` call go to the list it yields; `after` (e.g. a
    device synchronize) runs inside the timed span. The method comes back on exit."""
    method, times = getattr(obj, name), []

    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        result = method(*args, **kwargs)
        if after is not None:
            after()
        times.append(time.perf_counter() - began)
        return result

    setattr(obj, name, timed)
    try:
        yield times
    finally:
        delattr(obj, name)  # the instance attribute goes; the class's method shows through again


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where every operation is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
