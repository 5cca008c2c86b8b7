"""`espo-server`: serve, critic, make-tiny-model, train-toy, demo.

`serve` flags are generated from `ServerConfig`, so `--help` always matches the config object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from . import heap_trim
from .config import CPU_CORES, ServerConfig
from .config_docs import flag_name as _flag
from .config_docs import help_text
from .process import cpu_worker_from_env, eager_from_env


def _base_type(annotation: object) -> object:
    """`int | None` -> int; Literal/enum/str stay as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field; unset flags fall through to env vars and defaults."""
    for name, field in ServerConfig.model_fields.items():
        base = _base_type(field.annotation)
        help_line = help_text(name, field)
        if base is bool:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_line
            )
            continue
        kwargs: dict = {"dest": name, "default": None, "help": help_line}
        if typing.get_origin(base) is list:  # repeatable: --weights-dir A --weights-dir B
            kwargs["action"] = "append"
            kwargs["type"] = typing.get_args(base)[0]
        elif typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(base))
        elif isinstance(base, type) and (issubclass(base, BaseModel) or dataclasses.is_dataclass(base)):
            kwargs["type"] = json.loads
            kwargs["metavar"] = "JSON"
        elif base in (int, float):
            kwargs["type"] = base
        elif isinstance(base, type) and issubclass(base, Path):
            kwargs["type"] = Path
        elif hasattr(base, "__members__"):  # enums
            kwargs["choices"] = [m.value for m in base]  # type: ignore[attr-defined]
        parser.add_argument(_flag(name), **kwargs)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    given = {k: v for k, v in vars(args).items() if k in ServerConfig.model_fields and v is not None}
    return ServerConfig(**given)


def _serve(args: argparse.Namespace) -> int:
    from .serve import run_server

    config = config_from_args(args)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return run_server(config)


def _env_dirs(name: str) -> list[str]:
    """A JSON list of directories (as pydantic-settings reads ESPO_WEIGHTS_DIR for `serve`), or one."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return []
    if raw.startswith("["):
        return [str(d) for d in json.loads(raw)]
    return [raw]


def _critic(args: argparse.Namespace) -> int:
    from .serve import run_critic_server

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ[heap_trim.ENV] = str(args.malloc_trim_s)  # read in the engine process it spawns
    run_critic_server(
        args.model,
        host=args.host,
        port=args.port,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        prefix_caching=args.prefix_caching,
        block_size=args.block_size,
        api_key=args.api_key,
        weights_dir=[Path(d) for d in args.weights_dir],
        admin_port=args.admin_port,
        upload_dir=args.upload_dir,
        upload_max_bytes=args.upload_max_bytes,
        upload_idle_timeout_s=args.upload_idle_timeout_s,
        enforce_eager=args.enforce_eager,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        cpu_cores=args.cpu_cores,
        cpu_worker=args.cpu_worker,
    )
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_model import make_tiny_models

    policy, critic = make_tiny_models(Path(args.dir), seed=args.seed)
    print(f"policy: {policy}\ncritic: {critic}")
    return 0


def _train_toy(args: argparse.Namespace) -> int:
    from .toy.train import train_toy_cli

    return train_toy_cli(args)


def _demo(args: argparse.Namespace) -> int:
    from .toy.demo import demo_cli

    return demo_cli(args)


def cpu_cores(value: str) -> str:
    """A core list as ServerConfig.cpu_cores takes it (the critic server's --cpu-cores)."""
    if not re.fullmatch(CPU_CORES, value):
        raise argparse.ArgumentTypeError(f"{value!r}: expected cores such as 1, 0-3, 1,3, auto or nobind")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="espo-server", description="vLLM rollout server for PPO with ESPO early stopping."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the rollout server (no --model: the embedded toy model)")
    add_config_flags(serve)
    serve.set_defaults(func=_serve)

    critic = sub.add_parser(
        "critic", help="serve a critic model over POST /v1/values (pushes: POST /v1/critic/weights)"
    )
    critic.add_argument("--model", required=True, help="critic model directory (LlamaForTokenClassification)")
    critic.add_argument("--host", default="127.0.0.1")
    critic.add_argument("--port", type=int, default=8001)
    critic.add_argument(
        "--admin-port",
        type=int,
        default=int(os.environ["ESPO_ADMIN_PORT"]) if os.environ.get("ESPO_ADMIN_PORT") else None,
        help="also listen here, and answer POST /v1/critic/weights only here (403 on --port); the "
        "rollout server's --critic-url then names this port (env ESPO_ADMIN_PORT)",
    )
    critic.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM memory fraction of the critic engine (default: 0.35 of the GPU, 0.15 of RAM on CPU)",
    )
    critic.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=os.environ.get("ESPO_KV_CACHE_MEMORY_BYTES") or None,  # argparse applies type=int
        help="bytes of the engine's KV cache, as vLLM's --kv-cache-memory-bytes (default: sized from "
        "--gpu-memory-utilization; on CPU, VLLM_CPU_KVCACHE_SPACE wins if set; "
        "env ESPO_KV_CACHE_MEMORY_BYTES)",
    )
    critic.add_argument("--max-model-len", type=int, default=None)
    critic.add_argument("--dtype", default="auto", help="vLLM dtype (on CPU, auto means bfloat16)")
    critic.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of cached prefixes (default: on)",
    )
    critic.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=eager_from_env(),
        help="no torch.compile and no CUDA graphs: starts about 20 s sooner, decodes slower on GPU "
        "(env ESPO_ENFORCE_EAGER)",
    )
    critic.add_argument(
        "--block-size", type=int, default=None, help="KV block size (default: 32 on CPU, vLLM's on GPU)"
    )
    critic.add_argument(
        "--max-num-seqs", type=int, default=None, help="sequences scored at once (default: vLLM's choice)"
    )
    critic.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="prefix tokens computed per engine step (default: vLLM's choice)",
    )
    critic.add_argument(
        "--cpu-cores",
        type=cpu_cores,
        default=None,
        help="CPU backend only: the cores of the engine's worker threads, as vLLM's "
        "VLLM_CPU_OMP_THREADS_BIND (e.g. 1, 0-3; default: the environment's, else vLLM's auto)",
    )
    critic.add_argument(
        "--cpu-worker",
        choices=typing.get_args(ServerConfig.model_fields["cpu_worker"].annotation),
        default=cpu_worker_from_env(),
        help="CPU backend only: the engine's worker in a process of its own (spawn, vLLM's layout) or "
        "in the engine process (inline: starts sooner); as `serve --cpu-worker` (env ESPO_CPU_WORKER)",
    )
    critic.add_argument(
        "--api-key",
        default=os.environ.get("ESPO_API_KEY") or None,
        help="if set, every /v1 call needs 'Authorization: Bearer KEY' (env ESPO_API_KEY; the rollout "
        "server sends its --critic-api-key, or its --api-key)",
    )
    critic.add_argument(
        "--weights-dir",
        action="append",
        default=_env_dirs("ESPO_WEIGHTS_DIR"),
        help="a directory critic pushes may load from, repeatable (env ESPO_WEIGHTS_DIR, a JSON list); "
        "none: pushes by path are refused (403); uploads need none",
    )
    for name in ("upload_dir", "upload_max_bytes", "upload_idle_timeout_s", "malloc_trim_s"):  # as `serve`
        field = ServerConfig.model_fields[name]  # and, as there, ESPO_<NAME> in the environment
        default = os.environ.get(f"ESPO_{name.upper()}", field.default)
        kind = _base_type(field.annotation)
        critic.add_argument(_flag(name), type=kind, default=default, help=field.description)
    critic.set_defaults(func=_critic)

    tiny = sub.add_parser("make-tiny-model", help="write a random-weight tiny policy + critic (for tests)")
    tiny.add_argument("dir", help="output directory (gets policy/ and critic/)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny_model)

    from .toy.train import add_train_toy_args

    train = sub.add_parser("train-toy", help="train the toy-task policy and critic (cached)")
    add_train_toy_args(train)
    train.set_defaults(func=_train_toy)

    demo = sub.add_parser("demo", help="start the embedded server, run none / espo / shadow, print savings")
    demo.add_argument("--url", default=None, help="use this running server instead of starting one")
    demo.add_argument("--port", type=int, default=8000, help="port of the server the demo starts")
    demo.add_argument("--problems", type=int, default=64, help="toy test problems per batch")
    demo.add_argument("--n", type=int, default=4, help="samples per problem")
    demo.add_argument("--max-tokens", type=int, default=160)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--beta", type=float, default=None, help="beta of the warm state (default: tuned for the toy)"
    )
    demo.add_argument(
        "--json", type=Path, default=None, help="also write the table it prints (and its figures) here"
    )
    demo.add_argument(
        "--toy-size", choices=["full", "quick"], default=None,
        help="toy models the server it starts runs on (default: $ESPO_TOY_SIZE, else full)",
    )  # fmt: skip
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
