"""What the benchmarks share: their common flags, servers started on loopback and waited for, the
embedded toy models, /metrics scraped and parsed, and the result written.

Every benchmark is a module of the `bench` package, run from the repository root:

    .venv/bin/python -m bench.throughput --help
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from espo_server.config import default_toy_size
from espo_server.process import ServerProcess, espo_server_argv, free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------------------------- flags


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help is the benchmark's docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(
    parser: argparse.ArgumentParser, name: str, *, url_help: str = "a running server (default: start one)"
) -> None:
    """--url (measure a running server instead of starting one) and --out (the JSON written)."""
    parser.add_argument("--url", default=None, help=url_help)
    parser.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="where the JSON result goes")


def add_toy_args(parser: argparse.ArgumentParser) -> None:
    """--toy-size: the embedded toy models the started server runs on (the server's toy_size)."""
    parser.add_argument(
        "--toy-size", choices=["full", "quick"], default=None,
        help="embedded toy models: full (the tuned toy) or quick (the reduced one the tests use); "
        "default: $ESPO_TOY_SIZE, else full",
    )  # fmt: skip


def toy_size(args: argparse.Namespace) -> str:
    return getattr(args, "toy_size", None) or default_toy_size()


# ------------------------------------------------------------------------------------------- servers


def logs_dir(prefix: str) -> Path:
    """A fresh directory for the logs of the servers a benchmark starts."""
    return Path(tempfile.mkdtemp(prefix=f"espo-{prefix}-"))


def start_espo(
    name: str,
    command: str,
    *flags: str,
    logs: Path,
    ready_path: str = "/readyz",
    port: int | None = None,
    src: str | None = None,
) -> ServerProcess:
    """`espo-server COMMAND FLAGS --port P` on loopback (`port`, or a free one), started
    (`wait_ready()` waits). src: run the espo-server of that source tree instead (its modules first
    on PYTHONPATH)."""
    port = port or free_port()
    argv = espo_server_argv(command, *flags, "--port", str(port))
    if src is not None:  # -P: not the working directory's modules first, the other tree's
        argv = [argv[0], "-P", *argv[1:]]
    server = ServerProcess(name, argv, port, logs, ready_path=ready_path)
    saved = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = f"{src}/client:{src}"
    try:
        return server.start()
    finally:
        if src is not None:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)


def start_critic(name: str, model: str, *flags: str, logs: Path, port: int | None = None) -> ServerProcess:
    """`espo-server critic --model MODEL` (float32), started; ready once /health answers."""
    argv = ("--model", model, "--dtype", "float32", *flags)
    return start_espo(name, "critic", *argv, logs=logs, ready_path="/health", port=port)


@contextlib.contextmanager
def embedded_server(args: argparse.Namespace, *flags: str, name: str = "espo-server") -> Iterator[str]:
    """The URL to measure: `args.url` if given, else an `espo-server serve` on the embedded toy models
    (`--toy-size`) with `flags`, waited for, and stopped on exit."""
    if args.url is not None:
        yield args.url
        return
    server = start_espo(name, "serve", "--toy-size", toy_size(args), *flags, logs=logs_dir(name))
    print(
        f"starting {name} {' '.join(flags)} (engines take about a minute; log {server.log_path}) ...",
        flush=True,
    )
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


def toy_models(args: argparse.Namespace):
    """The embedded toy models of `--toy-size` (trained on first use, then cached). The size is also
    exported as ESPO_TOY_SIZE: what the benchmark runs in its own process (examples/ppo_toy.py) and
    every server it starts use the same toy."""
    from espo_server.toy.train import ensure_toy_models

    size = toy_size(args)
    os.environ["ESPO_TOY_SIZE"] = size
    print(f"toy models ({size}; trained on first use, cached afterwards) ...", flush=True)
    return ensure_toy_models(quick=size == "quick")


# ------------------------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """One scrape of a server's /metrics, parsed by prometheus_client's own exposition parser."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def sum(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 where there is none yet)."""
        return sum(
            value
            for (sample, have), value in self.samples.items()
            if sample == name and all(dict(have).get(k) == v for k, v in labels.items())
        )

    def histogram(self, name: str) -> tuple[float, float, dict[str, float]]:
        """(count, sum, cumulative buckets by `le`) of a histogram (zeros if the server has none)."""
        buckets = {
            dict(labels)["le"]: value
            for (sample, labels), value in self.samples.items()
            if sample == f"{name}_bucket"
        }
        return self.sum(f"{name}_count"), self.sum(f"{name}_sum"), buckets


def scrape(url: str) -> Metrics:
    text = httpx.get(url + "/metrics", timeout=30).text
    return Metrics(
        {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
    )


# -------------------------------------------------------------------------------------------- result


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
