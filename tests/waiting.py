"""Waiting in tests: on a condition, with a generous bound, never on a sleep.

The test machines are shared and noisy: a test that sleeps "long enough" for something to happen, or
asserts that something happened within a time, fails on a loaded machine. These wait for the state
itself and fail (with what was awaited) only when it never comes within the bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

BOUND_S = 60.0
"""How long a condition may take before the test fails: far above what any of them needs."""


async def until(condition: Callable[[], object], what: str, timeout_s: float = BOUND_S) -> None:
    """In an event loop: yield to the other tasks until `condition()` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout_s:.0f}s for: {what}")
        await asyncio.sleep(0.001)


def wait_until(
    condition: Callable[[], object], what: str, timeout_s: float = BOUND_S, poll_s: float = 0.1
) -> None:
    """Outside an event loop (a server in another process): poll `condition()` until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout_s:.0f}s for: {what}")
        time.sleep(poll_s)
