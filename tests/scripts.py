"""Scripts outside any package (examples/, bench/) imported as modules by the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


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
