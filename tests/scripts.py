"""The repository's scripts in tests: benchmarks run as `python -m bench.NAME` in a subprocess, and
examples/ (not a package) imported as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from espo_server.process import ENGINE_ENV

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m bench.NAME ARGS` from the repository root, its output captured."""
    argv = [sys.executable, "-m", f"bench.{name}", *args]
    env = {**os.environ, **ENGINE_ENV}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@contextlib.contextmanager
def script_module(path: Path, name: str) -> Iterator[ModuleType]:
    """`path` imported as module `name` (registered in sys.modules while inside, for dataclasses
    and pickling), removed again on exit."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
