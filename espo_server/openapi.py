"""Print the server's OpenAPI schema as JSON, without starting any engine.

    python -m espo_server.openapi > docs/openapi.json      (what `make openapi` runs)

The schema comes from `build_app(ServerConfig())`: `app.openapi()` reads the routes and the protocol
models (`espo_client.protocol`) and never runs the app's lifespan, so no model is loaded. Keys are
sorted and indented, so the checked-in file diffs well; `tests/test_openapi.py` fails when it is
stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["main", "openapi_json", "openapi_schema"]


def openapi_schema() -> dict[str, Any]:
    """The server's OpenAPI schema (a fresh app with the default config; no engines)."""
    from .app import build_app
    from .config import ServerConfig

    return build_app(ServerConfig()).openapi()


def openapi_json() -> str:
    """`openapi_schema()` as the text of docs/openapi.json: sorted keys, indent 2, final newline."""
    return json.dumps(openapi_schema(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(openapi_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
