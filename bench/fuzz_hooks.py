"""Loaded into the `schemathesis run` process of bench/fuzz.py (`SCHEMATHESIS_HOOKS=<this file>`).

It serialises `ast.parse` with a lock. CPython 3.11 before 3.11.8 (and 3.12 before 3.12.2) keeps
the AST constructor's recursion counter in interpreter-wide state; a garbage collection inside
one thread's parse can hand the GIL to another thread that parses too, and the first then fails
with `SystemError: AST constructor recursion depth mismatch`. schemathesis' workers are threads,
and hypothesis parses the source file of every lambda it describes (`.filter(lambda ...)`,
`.map(lambda ...)` of a strategy whose repr it keeps), which the coverage phase does from each
worker: with `--workers 2` on Python 3.11.7 that phase crashed on its first operations. Parsing
one file at a time removes the race; hypothesis caches what it parsed, so the lock is rarely
taken twice for the same file.
"""

from __future__ import annotations

import ast
import functools
import threading

_parse_lock = threading.Lock()
_unlocked_parse = ast.parse


@functools.wraps(_unlocked_parse)
def _parse_one_at_a_time(*args, **kwargs):  # type: ignore[no-untyped-def]
    with _parse_lock:
        return _unlocked_parse(*args, **kwargs)


ast.parse = _parse_one_at_a_time
