"""Ending the streams of an engine whose process died.

vLLM's AsyncLLM leaves the requests its killed engine process had not read yet hanging: no output and
no error, ever. The tasks reading an engine's streams register here while they read; when the server
sees the death it fails them all (`StreamReaders.fail`): each reader's pending read is cancelled and
turned into the error given, so every sample, and every call waiting on one, ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator


def cancel_was_only_ours(task: asyncio.Task | None) -> bool:
    """Undo one `cancel()` of `task` (ours); True when no other cancellation is pending, so that
    the CancelledError may be turned into something else. Python < 3.11 cannot tell: True."""
    uncancel = getattr(task, "uncancel", None)
    return uncancel is None or uncancel() == 0


class StreamReaders:
    """The tasks reading an engine's streams now."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._error: Callable[[], BaseException] | None = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around the reading of one stream, in the task that reads it."""
        task = asyncio.current_task()
        if self._error is not None:
            raise self._error()
        if task is not None:
            self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if self._error is not None and cancel_was_only_ours(task):
                raise self._error() from None
            raise
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    def fail(self, error: Callable[[], BaseException]) -> None:
        """End every stream being read with `error()`, and any read begun later."""
        self._error = error
        for task in list(self._tasks):
            task.cancel()
