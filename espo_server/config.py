"""Server configuration: one pydantic-settings object.

Precedence: command-line flags > environment variables (`ESPO_<FIELD>`, e.g. `ESPO_PORT=9000`) >
defaults. Every field below is also a `espo-server serve --<field-with-dashes>` flag (see cli.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from espo_client.protocol import MAX_TOP_K_LOGPROBS, EspoState, RuleParams
from espo_client.stop_rule import EspoParams, StopRule

ToySize = Literal["full", "quick"]
CPU_CORES = r"^(auto|nobind|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$"
"""A core list as vLLM's VLLM_CPU_OMP_THREADS_BIND takes it for one worker (or auto, nobind)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ESPO_CACHE_DIR") or Path.home() / ".cache" / "espo-server")


def default_toy_size() -> ToySize:
    """`ESPO_TOY_SIZE` (also read where no ServerConfig is made: the demo, benchmarks, examples)."""
    size = os.environ.get("ESPO_TOY_SIZE") or "full"
    if size not in ("full", "quick"):
        raise ValueError(f"ESPO_TOY_SIZE={size!r}: expected full or quick")
    return size  # type: ignore[return-value]


MEMORY_FRACTIONS = {"policy": {"gpu": 0.5, "cpu": 0.2}, "critic": {"gpu": 0.35, "cpu": 0.15}}
"""Default vLLM memory fraction of each engine, by device. On GPU, of the card: a 7B policy and a 7B
critic on one 80 GB card (docs/operations.md has the arithmetic). On CPU, of RAM, where vLLM reserves
it at start-up unless VLLM_CPU_KVCACHE_SPACE fixes the KV cache: the small fractions let several
servers share one machine."""


def memory_fraction(engine: Literal["policy", "critic"], requested: float | None, *, on_cpu: bool) -> float:
    """The memory fraction an engine starts with: `requested`, else its default on this device."""
    if requested is not None:
        return requested
    return MEMORY_FRACTIONS[engine]["cpu" if on_cpu else "gpu"]


class ServerConfig(BaseSettings):
    """Everything `espo-server serve` can be told."""

    model_config = SettingsConfigDict(env_prefix="ESPO_", extra="forbid", protected_namespaces=())

    # --- where it listens
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    api_key: str | None = Field(None, description="If set, every /v1 call needs 'Authorization: Bearer KEY'.")
    weights_dir: list[Path] = Field(
        default_factory=list,
        description="Directories that POST /v1/weights may load from (repeat the flag; env: a JSON list). "
        "Empty: weight pushes are refused.",
    )
    upload_dir: Path | None = Field(
        None,
        description="Where weight uploads (POST /v1/weights/uploads) are staged: the server makes a "
        "directory of its own inside, removed at exit (default: the system's temporary directory). "
        "Room for two checkpoints per model: the one serving and the one arriving.",
    )
    upload_max_bytes: int | None = Field(
        None, ge=1, description="Most bytes one upload may hold (default: twice the served model's "
        "safetensors plus 64 MiB).",
    )  # fmt: skip
    upload_idle_timeout_s: float = Field(
        120.0,
        gt=0,
        description="An upload with no request (or a shard with no bytes) for this long is abandoned and "
        "deleted; until then another upload of the same model is refused (409).",
    )
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve the gRPC API (espo.v1.Rollouts) on this port, same host (unset: no gRPC).",
    )
    admin_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also listen on this port, same host, and answer the admin routes (POST /v1/weights, "
        "POST /v1/critic/weights, their uploads, PUT /v1/espo/state, POST /v1/espo/commit, GET "
        "/v1/weights/files) only there: on --port they are 403. For a NetworkPolicy that lets only the "
        "learner reach them (unset: one port, all routes).",
    )

    join: str | None = Field(
        None,
        description="Join warm: once the engines are up and before /readyz says ready, copy from the "
        "server at this URL (a replica's admin port, e.g. the Service's) its policy weights and version, "
        "its in-process critic's weights and version, and its ESPO state, over HTTP. Until then /readyz "
        "is 503 with a `join` detail; if the copy fails it stays 503 and says why (unset: start cold).",
    )
    join_timeout_s: float = Field(
        120.0,
        gt=0,
        description="How long --join retries a peer that cannot be reached or answers 503 (a peer that "
        "is itself starting or joining).",
    )
    join_required: bool = Field(
        True,
        description="With --join: if no peer answered within --join-timeout-s, stay unready (true) or "
        "serve as started, version 0 and a cold state (false: when the peer URL is a Service that routes "
        "to ready replicas only, no answer means no replica is warmer, as for the first of a fleet).",
    )

    # --- the policy
    model: str | None = Field(
        None,
        description="Policy model directory (HF format). Unset: the embedded toy model (built on first use).",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM memory fraction for the policy engine: of the GPU's memory (its weights, "
        "activations and KV cache); on CPU, of RAM (vLLM's worker budget, unless VLLM_CPU_KVCACHE_SPACE "
        "fixes the KV cache). Unset: 0.5 on GPU, 0.2 on CPU: with the critic's 0.35, a 7B policy and "
        "a 7B critic on one 80 GB card (docs/operations.md).",
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="Bytes of the policy engine's KV cache, as vLLM's --kv-cache-memory-bytes: fixes it "
        "instead of sizing it from --gpu-memory-utilization (on CPU, VLLM_CPU_KVCACHE_SPACE wins if set). "
        "Unset: sized from the fraction.",
    )
    max_model_len: int | None = Field(None, ge=16, description="Context limit (default: the model's).")
    dtype: str = Field("auto", description="vLLM dtype (auto, float32, bfloat16, ...).")
    seed: int = Field(0, description="Engine seed.")
    enforce_eager: bool = Field(
        False,
        description="Run the policy and the in-process critic eagerly: no torch.compile and no CUDA "
        "graphs. Each engine starts about 20 s sooner (measured on CPU with the tiny models, where "
        "eager also decoded no slower); on GPU, decoding is slower.",
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="Sequences the engine runs at once, its slots (default: vLLM's choice)."
    )
    cpu_cores: str | None = Field(
        None,
        pattern=CPU_CORES,
        description="CPU backend only: the cores the policy engine's worker runs its threads on, in "
        "vLLM's VLLM_CPU_OMP_THREADS_BIND form (`0`, `0-3`, `1,3`, `nobind`, `auto`); unset: its "
        "share (--cpu-worker inline), or with --cpu-worker spawn the environment's "
        "VLLM_CPU_OMP_THREADS_BIND, else vLLM's `auto`, which puts every engine on the same cores.",
    )
    cpu_worker: Literal["inline", "spawn"] = Field(
        "inline",
        description="CPU backend only, engines with one worker (the policy and the in-process "
        "critic): `inline` runs the worker in the engine process (vLLM's `uni` executor), its threads "
        "bound by OpenMP to --cpu-cores / --critic-cpu-cores, or when unset to its share of the "
        "cores (the policy all but the last, the in-process critic the last), as vLLM's `auto` would; "
        "`spawn` is vLLM's layout (the engine process spawns a worker process, whose threads vLLM "
        "binds: by `auto`, every engine's on the same cores). Inline starts each engine about 10 s "
        "sooner and, on 2 cores, spent half the policy's CPU time of spawn (docs/benchmarks.md).",
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Tokens the engine schedules per step (default: vLLM's choice)."
    )
    served_model_name: str | None = Field(
        None,
        description="The model name of the OpenAI-compatible API (/v1/models; requests must name it). "
        "Unset: the model directory, or `espo-toy` for the embedded toy model.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template for /v1/chat/completions, inline or a file path (unset: the "
        "tokenizer's own; a tokenizer without one answers chat requests 400).",
    )

    # --- scale-out: vLLM's own parallelism, passed through to the policy engine
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism: GPUs per model replica.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallelism: stages per replica.")
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM data parallelism: engine replicas in this server, requests balanced by vLLM "
        "(GPUs used: tensor x pipeline x data).",
    )
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(
        None, description="vLLM's distributed executor (unset: vLLM picks; mp on one node, ray across nodes)."
    )
    enable_expert_parallel: bool = Field(
        False, description="vLLM expert parallelism for MoE layers (instead of tensor-parallel experts)."
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=64,
        description="Engine outputs every this many tokens per sample (vLLM stream_interval); the stop "
        "rule still judges every token, a stop lands up to this many - 1 tokens late (discarded, counted).",
    )

    # --- the critic
    critic: Literal["inprocess", "remote", "vllm-pooling", "none"] = Field(
        "inprocess",
        description="inprocess: a vLLM pooling engine in this process; remote: an espo critic server "
        "(POST /v1/values); vllm-pooling: a `vllm serve --runner pooling` server (POST /pooling); none.",
    )
    critic_model: str | None = Field(
        None, description="Critic model directory for `inprocess` (unset: the embedded toy critic)."
    )
    critic_url: str | None = Field(None, description="Base URL of the critic for `remote` / `vllm-pooling`.")
    critic_api_key: str | None = Field(
        None,
        description="Bearer token sent to the remote critic (`espo-server critic --api-key`, "
        "`vllm serve --api-key`); unset: --api-key.",
    )
    critic_gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM memory fraction for the in-process critic engine (as --gpu-memory-utilization; "
        "both engines share the card, so the two must sum to less than about 0.9). Its KV cache is the "
        "prefix cache of the trajectories it is asked about. Unset: 0.35 on GPU, 0.15 on CPU.",
    )
    critic_kv_cache_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="Bytes of the in-process critic engine's KV cache (as --kv-cache-memory-bytes). "
        "Unset: sized from --critic-gpu-memory-utilization.",
    )
    critic_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one critic call (a batch of queries counts against one timeout)."
    )
    critic_fallback: Literal["no_stop", "regret_only"] = Field(
        "no_stop",
        description="What a failed critic query means: no_stop (never stop on it) or regret_only "
        "(decide with v_const). Either way it is flagged in the response and counted in metrics.",
    )
    critic_batch_window_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Critic queries arriving within this many ms go to the critic as one call "
        "(0: only those raised by the same engine step). With critic_batch_window_steps > 0, only "
        "for a batch opened by a sample that no longer reads its stream.",
    )
    critic_batch_window_steps: int = Field(
        4,
        ge=0,
        le=256,
        description="If > 0, the batching window in policy steps instead of ms: a batch is sent once "
        "the sample that asked its first query has generated this many more tokens (or ended); a "
        "query from a sample no longer reading its stream uses the ms window. Larger critic calls; a "
        "stop decided by their answers discards the tokens generated meanwhile. 0: the ms window.",
    )
    critic_max_batch: int = Field(64, ge=1, le=4096, description="Most queries in one critic call.")
    critic_batches_in_flight: int = Field(
        0,
        ge=0,
        le=256,
        description="If > 0, at most this many critic calls run at once: queries due while they all "
        "run wait and go together the moment one ends (an idle critic is asked at once, a busy one in "
        "larger batches). 0: no limit.",
    )
    critic_prefix_caching: bool = Field(
        True,
        description="In-process critic: reuse the KV of cached prefixes (LAST pooling), so a query "
        "computes only the tokens no earlier query filled in, in whole KV blocks.",
    )
    critic_cpu_cores: str | None = Field(
        None,
        pattern=CPU_CORES,
        description="CPU backend only: the cores of the in-process critic engine's worker (as "
        "--cpu-cores); e.g. the policy on 0 and the critic on 1 keeps their forward passes apart.",
    )
    critic_max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="In-process critic: sequences its engine scores at once, its slots (default: "
        "vLLM's choice). Above critic_max_batch it only costs memory.",
    )
    critic_max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        description="In-process critic: prefix tokens its engine computes per step (default: vLLM's "
        "choice); a batch of long prefixes takes several steps above it.",
    )
    critic_block_size: int | None = Field(
        None,
        ge=1,
        description="In-process critic: KV block size, the grain of prefix reuse (default: 32 on CPU, "
        "whose attention needs multiples of 32; vLLM's default on GPU).",
    )

    # --- the stop rule
    default_stop_rule: StopRule = Field(StopRule.NONE, description="Rule of requests that name none.")
    rule_params: RuleParams = Field(
        default_factory=RuleParams,
        description='Server-wide overrides of the rule parameters, as JSON (e.g. {"min_tokens": 4}).',
    )
    initial_state: EspoState | None = Field(
        None, description="Server-owned state at start-up, as JSON (default: fresh, cold)."
    )
    entropy_top_k: int = Field(8, ge=1, le=MAX_TOP_K_LOGPROBS, description="k of the top-k entropy estimate.")

    # --- limits
    max_n: int = Field(64, ge=1, description="Largest `n` per request.")
    max_prompts: int = Field(1024, ge=1, description="Most prompts per request.")
    max_trajectories: int = Field(8192, ge=1, description="Most trajectories (prompts x n) per request.")
    idempotency_cache: int = Field(256, ge=0, description="Finished responses kept for request_id retries.")
    idempotency_cache_mb: float = Field(
        512.0, ge=0, description="Byte budget of those kept responses (MiB); the oldest go first."
    )
    idempotency_ttl_s: float = Field(900.0, gt=0, description="Kept responses older than this are dropped.")
    max_inflight_trajectories: int = Field(
        16384, ge=1, description="Trajectories generating at once (all calls and runs); beyond it: 429."
    )
    max_call_seconds: float | None = Field(
        None, gt=0, description="Deadline of every call (a request's deadline_s may be shorter)."
    )
    run_idle_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A run (POST /v1/runs) with no call for this long is closed, its samples aborted.",
    )
    engine_dead_linger_s: float = Field(
        2.0,
        ge=0,
        description="After the policy engine's process died: how long the server still answers (every /v1 "
        "call 503 engine_dead, /readyz 503) before it exits with status 3.",
    )
    malloc_trim_s: float = Field(
        60.0,
        ge=0,
        description="Every this many seconds, each engine process (and the server) gives the C heap's "
        "free pages back to the system (glibc malloc_trim): without it the engines' memory grew for "
        "the whole 30-minute soak, memory freed but kept by malloc (espo_server/heap_trim.py). 0: never.",
    )
    sse_keepalive_s: float = Field(
        15.0,
        ge=0,
        description="OpenAI streams: a `: keep-alive` comment after this many seconds without a chunk, so "
        "that proxies keep long rollouts open (0: none).",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: how long running calls get to finish while new ones are answered 503 "
        "(shutting_down, Retry-After); calls still running then are ended with that 503, nothing of "
        "them kept. Keep it below the orchestrator's kill timeout.",
    )

    # --- the embedded toy task
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where built toy models live.")
    toy_seed: int = Field(0, description="Seed of the embedded toy models.")
    toy_size: ToySize = Field(
        default_factory=default_toy_size,
        description="Size of the embedded toy models: full (the tuned toy task; training them takes about "
        "15 minutes on 2 CPU cores, once) or quick (a reduced task and model trained in about a minute, "
        "with a weaker critic: what the test suite runs on).",
    )
    verifier: Literal["auto", "toy", "none"] = Field(
        "auto", description="Reward for eos trajectories whose prompt has an answer (auto: toy if embedded)."
    )

    # --- logging
    log_level: str = Field("info", description="Log level of the server.")

    @model_validator(mode="after")
    def _ports_differ(self) -> ServerConfig:
        if self.admin_port is not None and self.admin_port in (self.port, self.grpc_port):
            raise ValueError(f"admin_port {self.admin_port} must differ from port and grpc_port")
        return self

    def model_name(self) -> str:
        """The name the OpenAI-compatible API serves the policy under."""
        if self.served_model_name:
            return self.served_model_name
        return "espo-toy" if self.model is None else self.model

    def rule_defaults(self) -> EspoParams:
        return self.rule_params.apply(EspoParams())

    @property
    def embedded(self) -> bool:
        return self.model is None

    def verifier_name(self) -> str | None:
        """The verifier in effect. `auto` means the toy verifier when the policy is the embedded toy
        model: start-up (`serve.resolve_models`) settles it before it fills in the toy model's path."""
        if self.verifier == "auto":
            return "toy" if self.embedded else None
        return None if self.verifier == "none" else self.verifier
