"""The docs and --help stay true to the code, and the pages hold together."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from espo_server.config import ServerConfig
from espo_server.config_docs import configuration_markdown, documented_defaults, env_name, flag_name, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "deploy" / "README.md"]


def test_configuration_page_is_up_to_date():
    assert CONFIGURATION.exists(), "docs/configuration.md is missing: run `make docs`"
    assert CONFIGURATION.read_text() == configuration_markdown(), (
        "docs/configuration.md is stale: run `make docs` (python -m espo_server.config_docs) and commit it"
    )


def test_config_docs_main_prints_the_page(capsys):
    assert main() == 0
    assert capsys.readouterr().out == configuration_markdown()


def test_configuration_page_documents_every_setting():
    page = CONFIGURATION.read_text()
    for name, field in ServerConfig.model_fields.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{flag_name(name)}` |")), None)
        assert row is not None, f"{name} has no row in docs/configuration.md"
        assert f"`{env_name(name)}`" in row, name
        assert field.description and field.description.split("(")[0].strip() in row, name


def test_the_page_does_not_depend_on_the_machine_or_the_shell(monkeypatch, tmp_path):
    """Defaults computed by a factory (the cache under the home directory) are shown the same for
    everyone, and no ESPO_* variable of the shell that runs `make docs` leaks into the page."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ServerConfig.model_fields:
        monkeypatch.setenv(env_name(name), "x")
    assert configuration_markdown() == CONFIGURATION.read_text()
    assert documented_defaults()["cache_dir"] == "~/.cache/espo-server"
    assert os.environ[env_name("cache_dir")] == "x"  # the environment is left as it was


def test_serve_help_lists_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "espo_server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(out.split())  # argparse wraps the help lines
    for name in ServerConfig.model_fields:
        assert flag_name(name) in out, name
        assert f"[env {env_name(name)}; default:" in flat, name


def test_other_subcommands_are_named_on_the_configuration_page():
    from espo_server.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a.choices, dict)]
    page = CONFIGURATION.read_text()
    for command in sub.choices:
        assert f"`{command}`" in page or f"`espo-server {command}`" in page, command


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


# --- the README as a front door


def _readme_settings_rows() -> list[list[str]]:
    text = README.read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `--")
    ]


def test_readme_stays_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < 260, f"README.md has {len(lines)} lines: move detail to docs/"
    for heading in ("## The two commands", "## Quickstart on your own model", "## The API at a glance"):
        assert heading in lines, heading
    assert "make run" in README.read_text() and "make test" in README.read_text()


def test_readme_settings_table_matches_the_config():
    rows = _readme_settings_rows()
    assert len(rows) >= 8, "the README's settings table is gone"
    fields = ServerConfig.model_fields
    for flags, envs, defaults, _meaning in rows:
        flags_, envs_, defaults_ = (cell.split(", ") for cell in (flags, envs, defaults))
        assert len(flags_) == len(envs_) == len(defaults_), flags
        for flag, env, default in zip(flags_, envs_, defaults_, strict=True):
            name = flag.strip("`")[2:].replace("-", "_")
            assert name in fields, f"README names {flag}, which is no setting"
            assert env == f"`{env_name(name)}`", flag
            shown = documented_defaults()[name]
            assert default.strip("`") == shown, f"README: {flag} defaults to {default}; the config: {shown}"


def test_readme_names_every_docs_page():
    readme = README.read_text()
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_every_docs_page_says_what_it_covers():
    for page in DOCS.glob("*.md"):
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), page.name
        first = next(line for line in lines[1:] if line.strip() and not line.startswith("<!--"))
        assert not first.startswith(("#", "|", "```")), f"{page.name} opens without saying what it covers"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _headings(page):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _prose(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    out, fenced = [], False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _headings(page: Path) -> list[str]:
    return [re.sub(r"^#+\s*", "", line) for line in _prose(page) if re.match(r"#{1,6} ", line)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_pages_resolve(page):
    text = "\n".join(_prose(page))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert resolved.suffix == ".md", f"{page.name}: anchor into a non-page {target}"
            assert anchor in _anchors(resolved), f"{page.name}: link to {target}: no such heading"


def test_the_product_cites_no_planning_files_or_words():
    """The repository stands alone: no file outside it, no planning vocabulary."""
    words = re.compile(r"DESIGN\.md|\bcompass\b|\bissue [0-9]+\b", re.IGNORECASE)
    roots = ["espo_server", "client/espo_client", "bench", "examples", "tests", "docs", "deploy"]
    files = [README, *(p for root in roots for p in (ROOT / root).rglob("*") if p.is_file())]
    hits = []
    this = Path(__file__).resolve()
    for path in files:
        if path.suffix not in {".py", ".md", ".json", ".yaml", ".yml", ".proto"} or path.resolve() == this:
            continue
        if "results" in path.parts:  # what benchmarks wrote on this machine, not the product
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if words.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
