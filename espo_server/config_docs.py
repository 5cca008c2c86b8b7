"""The settings reference, generated from the one config object (`ServerConfig`).

    python -m espo_server.config_docs > docs/configuration.md      (what `make docs` runs)

Each field of `ServerConfig` becomes a row: its `espo-server serve` flag, its environment variable,
its default, the values it takes (from the type and bounds) and its meaning (the field's
description). `espo-server serve --help` is built from the same fields and the same helpers, so the
page and `--help` cannot drift apart; `tests/test_docs.py` fails when the committed page is stale.
Sections follow the `# --- title` comments of the class body.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import ServerConfig

__all__ = [
    "configuration_markdown",
    "documented_defaults",
    "env_name",
    "flag_name",
    "help_text",
    "main",
    "shown_default",
]


def flag_name(name: str) -> str:
    """`max_num_seqs` -> `--max-num-seqs`."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """`max_num_seqs` -> `ESPO_MAX_NUM_SEQS`."""
    prefix = ServerConfig.model_config.get("env_prefix", "")
    return f"{prefix}{name}".upper()


def _value(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_none=True)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]" if value else "empty"
    return str(value)


def shown_default(field: FieldInfo) -> str:
    """The default as a reader should see it (a path under the home directory as `~/...`)."""
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    text = _value(value)
    home = str(Path.home())
    return "~" + text[len(home) :] if isinstance(value, Path) and text.startswith(home + "/") else text


def documented_defaults() -> dict[str, str]:
    """Every setting's default as the docs show it: computed with no `ESPO_*` variable set, since a
    `default_factory` may read one (the page must not depend on the shell that generated it)."""
    prefix = ServerConfig.model_config.get("env_prefix", "")
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith(prefix)}
    try:
        return {name: shown_default(field) for name, field in ServerConfig.model_fields.items()}
    finally:
        os.environ.update(saved)


def _without_none(annotation: object) -> object:
    """`int | None` -> int."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _bounds(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(item, attr, None)
            if bound is not None:
                parts.append(f"{sign} {bound}")
    return ", ".join(parts)


def shown_values(name: str, field: FieldInfo) -> str:
    """What the setting takes, from its type and bounds: `int >= 1`, `a | b`, `JSON`, ..."""
    base = _without_none(field.annotation)
    if typing.get_origin(base) is typing.Literal:
        text = " \\| ".join(str(v) for v in typing.get_args(base))
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        text = " \\| ".join(str(m.value) for m in base)
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        text = f"{getattr(item, '__name__', item).lower()}, repeatable"
    elif isinstance(base, type) and (issubclass(base, BaseModel) or dataclasses.is_dataclass(base)):
        text = f"JSON ({base.__name__})"
    elif base is bool:
        text = f"`{flag_name(name)}` / `--no-{flag_name(name)[2:]}`"
    elif isinstance(base, type) and issubclass(base, Path):
        text = "path"
    else:
        text = getattr(base, "__name__", str(base))
        bounds = _bounds(field)
        if bounds:
            text += " " + bounds
    return text


def help_text(name: str, field: FieldInfo) -> str:
    """The `--help` line of a setting: its meaning, environment variable and default."""
    return f"{field.description} [env {env_name(name)}; default: {shown_default(field)}]".replace("%", "%%")


def _sections() -> list[tuple[str, list[str]]]:
    """(title, field names) in the order of the class body, split at its `# --- title` comments."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in inspect.getsource(ServerConfig).splitlines():
        title = re.match(r"\s+# --- (.+)", line)
        if title:
            sections.append((title.group(1).strip(), []))
            continue
        name = re.match(r"\s{4}(\w+)\s*:", line)
        if name and name.group(1) in ServerConfig.model_fields:
            sections[-1][1].append(name.group(1))
    return [(title, names) for title, names in sections if names]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(names: list[str], defaults: dict[str, str]) -> list[str]:
    fields = ServerConfig.model_fields
    rows = ["| flag | env | default | values | meaning |", "|---|---|---|---|---|"]
    for name in names:
        field = fields[name]
        default = defaults[name]
        default = default if default in ("unset", "empty") else f"`{_cell(default)}`"
        rows.append(
            f"| `{flag_name(name)}` | `{env_name(name)}` | {default} | "
            f"{shown_values(name, field)} | {_cell(field.description or '')} |"
        )
    return [*rows, ""]


def configuration_markdown() -> str:
    """The text of docs/configuration.md."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated from ServerConfig by `make docs`: edit espo_server/config.py, then regenerate. -->",
        "",
        "Every setting of `espo-server serve`, from the one config object (`espo_server/config.py`,",
        "`ServerConfig`). Each is a flag and an environment variable. **Precedence: flag > environment",
        "variable > default.** JSON-valued settings take JSON (`--rule-params '{\"min_tokens\": 4}'`,",
        "`ESPO_RULE_PARAMS='{\"min_tokens\": 4}'`); a repeatable flag is a JSON list in the environment",
        '(`ESPO_WEIGHTS_DIR=\'["/ckpt", "/tmp/ppo"]\'`); booleans are `--x` / `--no-x` flags and',
        "`true` / `false` in the environment. `espo-server serve --help` prints the same list.",
        "",
    ]
    defaults = documented_defaults()
    listed: list[str] = []
    for title, names in _sections():
        out += ([f"## {title[0].upper()}{title[1:]}", ""] if title else []) + _table(names, defaults)
        listed += names
    unlisted = [name for name in ServerConfig.model_fields if name not in listed]
    if unlisted:  # declared where the scan of the class body cannot see them: still documented
        out += ["## Other settings", "", *_table(unlisted, defaults)]
    out += [
        "## Other subcommands",
        "",
        "Only `espo-server serve` reads these settings. `espo-server critic` (a critic over",
        "`POST /v1/values`), `make-tiny-model`, `train-toy` and `demo` take their own flags:",
        "`espo-server <command> --help`.",
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(configuration_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
