"""The docs and --help stay true to the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from espo_server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for name in ServerConfig.model_fields:
        assert f"`--{name.replace('_', '-')}`" in readme, name
        assert f"`ESPO_{name.upper()}`" in readme, name


def test_serve_help_lists_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "espo_server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ServerConfig.model_fields:
        assert f"--{name.replace('_', '-')}" in out, name


def test_cli_flags_and_env_override_defaults(monkeypatch):
    from espo_server.cli import build_parser, config_from_args

    monkeypatch.setenv("ESPO_PORT", "9001")
    monkeypatch.setenv("ESPO_CRITIC_FALLBACK", "regret_only")
    args = build_parser().parse_args(
        ["serve", "--max-n", "7", "--rule-params", '{"min_tokens": 3}', "--no-enforce-eager"]
    )
    config = config_from_args(args)
    assert config.port == 9001 and config.critic_fallback == "regret_only"  # from the environment
    assert config.max_n == 7 and config.rule_defaults().min_tokens == 3  # from flags
    monkeypatch.setenv("ESPO_MAX_N", "3")
    assert config_from_args(build_parser().parse_args(["serve", "--max-n", "5"])).max_n == 5  # flag beats env
