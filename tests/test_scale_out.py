"""vLLM's parallelism settings reach the policy engine's arguments unchanged (no engine is started:
a multi-GPU run needs GPUs this test machine does not have)."""

from __future__ import annotations

import os

import pytest

from espo_server.cli import build_parser, config_from_args
from espo_server.critic_engine import InProcessCritic
from espo_server.engine import Parallelism, PolicyEngine
from espo_server.process import (
    CPU_KV_CACHE_BYTES,
    ENGINE_ENV,
    ENGINE_ONEDNN_CACHE,
    ONEDNN_CACHE,
    engine_spawn_env,
    vllm_serve_argv,
)
from espo_server.serve import parallelism


def test_flags_reach_the_engine_arguments():
    args = build_parser().parse_args(
        [
            "serve",
            "--tensor-parallel-size", "4",
            "--pipeline-parallel-size", "2",
            "--data-parallel-size", "3",
            "--distributed-executor-backend", "ray",
            "--enable-expert-parallel",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    parallel = parallelism(config)
    assert parallel == Parallelism(4, 2, 3, "ray", True)
    engine_args = PolicyEngine.engine_args("/models/policy", parallel=parallel)
    assert engine_args.tensor_parallel_size == 4
    assert engine_args.pipeline_parallel_size == 2
    assert engine_args.data_parallel_size == 3
    assert engine_args.distributed_executor_backend == "ray"
    assert engine_args.enable_expert_parallel is True
    # the rest of the policy's engine arguments are untouched by it
    assert engine_args.logprobs_mode == "raw_logprobs" and engine_args.enable_prefix_caching is True


def test_defaults_leave_vllm_to_choose(monkeypatch):
    for key in ("ESPO_TENSOR_PARALLEL_SIZE", "ESPO_DISTRIBUTED_EXECUTOR_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    config = config_from_args(build_parser().parse_args(["serve"]))
    engine_args = PolicyEngine.engine_args("/models/policy", parallel=parallelism(config))
    defaults = PolicyEngine.engine_args("/models/policy")
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                 "distributed_executor_backend", "enable_expert_parallel"):  # fmt: skip
        assert getattr(engine_args, name) == getattr(defaults, name), name
    assert engine_args.tensor_parallel_size == 1 and engine_args.distributed_executor_backend is None


@pytest.mark.parametrize("flag", ["--tensor-parallel-size=0", "--distributed-executor-backend=slurm"])
def test_bad_parallelism_is_refused_at_start(flag):
    with pytest.raises((SystemExit, ValueError)):
        config_from_args(build_parser().parse_args(["serve", flag]))


def test_replicas_merge_prompt_token_ids_in_call_order():
    """Shards of a call with a text prompt: the merged answer lists every prompt's ids, like one server."""
    from espo_client.protocol import EspoState, Prompt, RolloutRequest, RolloutResponse, Usage
    from espo_client.replicas import _merge_prompt_ids, _Shard

    def shard(prompts: list[Prompt], first: int) -> _Shard:
        return _Shard(
            client=None, request=RolloutRequest(prompts=prompts), prompts=range(first, first + len(prompts))
        )  # type: ignore[arg-type]

    def response(prompt_token_ids) -> RolloutResponse:
        return RolloutResponse(
            request_id="r", trajectories=[], usage=Usage(prompt_tokens=0, generated_tokens=0, trajectories=0),
            stop_rule="none", shadow=False, rule_params={}, state_used=EspoState(), policy_version=0,
            prompt_token_ids=prompt_token_ids,
        )  # fmt: skip

    shards = [shard([Prompt(token_ids=[1, 2])], 0), shard([Prompt(text="ab"), Prompt(token_ids=[3])], 1)]
    assert _merge_prompt_ids(shards, [response(None), response([[30, 31], [3]])]) == [[1, 2], [30, 31], [3]]
    assert _merge_prompt_ids(shards, [response(None), response(None)]) is None


def test_embedded_model_is_espo_toy_with_a_chat_template(monkeypatch, tmp_path):
    """resolve_models fills the toy paths; the OpenAI name and chat template of the embedded model stay."""
    from espo_server import serve
    from espo_server.config import ServerConfig
    from espo_server.tiny_model import CHAT_TEMPLATE
    from espo_server.toy import train

    class Toy:
        policy_dir = tmp_path / "policy"
        critic_dir = tmp_path / "critic"

    monkeypatch.setattr(train, "ensure_toy_models", lambda *a, **k: Toy())
    config = serve.resolve_models(ServerConfig())
    assert config.model == str(Toy.policy_dir) and config.model_name() == "espo-toy"
    assert config.chat_template == CHAT_TEMPLATE
    named = serve.resolve_models(ServerConfig(model="/m", critic="none"))
    assert named.model_name() == "/m" and named.chat_template is None


def test_the_engines_limits_and_cores_reach_their_engine_arguments(monkeypatch):
    """--critic-max-num-seqs / --critic-max-num-batched-tokens / --critic-cpu-cores, --cpu-cores and
    --cpu-worker (serve) and --max-num-seqs / --max-num-batched-tokens / --cpu-cores / --cpu-worker
    (espo-server critic) reach each engine: its vLLM arguments, and the environment its processes are
    spawned with (a spawned worker: vLLM's binding; an inline one: OpenMP's, and vLLM's `uni`)."""
    import asyncio
    import os

    from vllm.v1.engine.async_llm import AsyncLLM

    from espo_server import cli
    from espo_server.engine import PolicyEngine
    from espo_server.serve import launch_critic

    names = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_PLACES", "OMP_NUM_THREADS")
    seen = []

    def spawn(args, *rest, **kwargs):
        seen.append((args, {name: os.environ[name] for name in names if name in os.environ}))
        raise RuntimeError("no engine in this test")

    monkeypatch.setattr(AsyncLLM, "from_engine_args", spawn)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    serve = ["serve", "--critic", "inprocess", "--critic-model", "/models/critic", "--cpu-cores", "0"]
    limits = ["--critic-max-num-seqs", "16", "--critic-max-num-batched-tokens", "4096"]
    flags = [*serve, *limits, "--critic-cpu-cores", "1", "--cpu-worker", "inline"]
    config = config_from_args(build_parser().parse_args(flags))

    async def launch_both() -> None:
        with pytest.raises(RuntimeError, match="no engine"):
            async with PolicyEngine.launch("/models/policy", cpu_cores=config.cpu_cores, cpu_worker="spawn"):
                pass
        with pytest.raises(RuntimeError, match="no engine"):
            async with launch_critic(config):
                pass

    asyncio.run(launch_both())
    critic = ["critic", "--model", "/models/critic", "--max-num-seqs", "8", "--max-num-batched-tokens", "512"]
    with pytest.raises(RuntimeError, match="no engine"):
        cli._critic(build_parser().parse_args([*critic, "--cpu-cores", "0-1", "--cpu-worker", "spawn"]))
    (policy, policy_env), (inprocess, critic_env), (server, server_env) = seen
    assert policy_env == {"VLLM_CPU_OMP_THREADS_BIND": "0"} and policy.distributed_executor_backend is None
    assert critic_env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_PLACES": "{1}", "OMP_NUM_THREADS": "1"}
    assert inprocess.distributed_executor_backend == "uni"
    assert server_env == {"VLLM_CPU_OMP_THREADS_BIND": "0-1"} and server.distributed_executor_backend is None
    assert not any(name in os.environ for name in names)  # restored
    # inline workers named no cores: the policy all but the last core, the in-process critic the last
    plain = config_from_args(build_parser().parse_args(serve[:5]))

    async def launch_defaults() -> None:
        with pytest.raises(RuntimeError, match="no engine"):
            async with PolicyEngine.launch("/models/policy"):
                pass
        with pytest.raises(RuntimeError, match="no engine"):
            async with launch_critic(plain):
                pass

    asyncio.run(launch_defaults())
    cores = sorted(os.sched_getaffinity(0))
    policy_places = "{" + ",".join(map(str, cores[:-1] or cores)) + "}"
    assert seen[-2][1]["OMP_PLACES"] == policy_places and seen[-1][1]["OMP_PLACES"] == f"{{{cores[-1]}}}"
    assert (inprocess.max_num_seqs, inprocess.max_num_batched_tokens) == (16, 4096)
    assert (server.max_num_seqs, server.max_num_batched_tokens) == (8, 512)
    assert inprocess.runner == server.runner == "pooling"
    default = InProcessCritic.engine_args("/models/critic")
    assert default.max_num_seqs is None and default.max_num_batched_tokens is None  # vLLM's choice


@pytest.mark.parametrize("cores", ["core0", "0;1", "-1", ""])
def test_bad_cores_are_refused_naming_the_setting(cores):
    with pytest.raises(ValueError, match="cpu_cores"):
        config_from_args(build_parser().parse_args(["serve", f"--cpu-cores={cores}"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["critic", "--model", "/m", f"--cpu-cores={cores}"])


def test_on_cpu_model_classes_are_inspected_in_this_process(monkeypatch, tmp_path):
    """vLLM inspects a model class in a subprocess on a cold cache (to keep CUDA out of the API
    process); on CPU the engine start does it here, saving an interpreter (async_llm)."""
    from vllm.model_executor.models import registry

    from espo_server import async_llm

    monkeypatch.setattr(registry, "_run_in_subprocess", registry._run_in_subprocess)  # restored after
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))  # a cold cache
    async_llm.inspect_models_in_process()
    assert registry._run_in_subprocess(os.getpid) == os.getpid()
    info = registry.ModelRegistry._try_inspect_model_cls("Qwen2ForCausalLM")
    assert info is not None and info.is_text_generation_model
    assert [p.name for p in (tmp_path / "modelinfos").iterdir()] == [
        "vllm-model_executor-models-qwen2-Qwen2ForCausalLM.json"
    ]  # and cached for the next start, as vLLM's own way does


def test_memory_fractions_default_per_device(monkeypatch):
    """Unset, the engines' memory fractions are the device's defaults: on GPU a split that holds a 7B
    policy and a 7B critic on one card, on CPU (this machine) the small fractions of RAM it always had;
    a fraction given is passed through on either."""
    from vllm.platforms import current_platform

    from espo_server.config import MEMORY_FRACTIONS, memory_fraction

    for key in ("ESPO_GPU_MEMORY_UTILIZATION", "ESPO_CRITIC_GPU_MEMORY_UTILIZATION"):
        monkeypatch.delenv(key, raising=False)
    gpu = {engine: memory_fraction(engine, None, on_cpu=False) for engine in ("policy", "critic")}
    assert gpu == {"policy": 0.5, "critic": 0.35} and sum(gpu.values()) < 0.9
    assert memory_fraction("policy", None, on_cpu=True) == 0.2
    assert memory_fraction("critic", None, on_cpu=True) == 0.15
    assert memory_fraction("critic", 0.6, on_cpu=False) == memory_fraction("critic", 0.6, on_cpu=True) == 0.6
    assert current_platform.is_cpu()
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert config.gpu_memory_utilization is None and config.critic_gpu_memory_utilization is None
    assert PolicyEngine.engine_args("/m").gpu_memory_utilization == MEMORY_FRACTIONS["policy"]["cpu"]
    assert InProcessCritic.engine_args("/m").gpu_memory_utilization == MEMORY_FRACTIONS["critic"]["cpu"]
    config = config_from_args(build_parser().parse_args(["serve", "--critic-gpu-memory-utilization", "0.3"]))
    given = InProcessCritic.engine_args("/m", gpu_memory_utilization=config.critic_gpu_memory_utilization)
    assert given.gpu_memory_utilization == 0.3
    critic_args = build_parser().parse_args(["critic", "--model", "/m"])
    assert critic_args.gpu_memory_utilization is None  # the critic server: the same defaults


def test_kv_cache_bytes_reach_both_engines_and_the_stock_server(monkeypatch):
    monkeypatch.delenv("ESPO_KV_CACHE_MEMORY_BYTES", raising=False)
    monkeypatch.delenv("ESPO_CRITIC_KV_CACHE_MEMORY_BYTES", raising=False)
    argv = ["serve", "--kv-cache-memory-bytes", "1000000", "--critic-kv-cache-memory-bytes", "2000000"]
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.kv_cache_memory_bytes, config.critic_kv_cache_memory_bytes) == (1_000_000, 2_000_000)
    policy = PolicyEngine.engine_args("/m", kv_cache_memory_bytes=config.kv_cache_memory_bytes)
    critic = InProcessCritic.engine_args("/m", kv_cache_memory_bytes=config.critic_kv_cache_memory_bytes)
    assert (policy.kv_cache_memory_bytes, critic.kv_cache_memory_bytes) == (1_000_000, 2_000_000)
    assert PolicyEngine.engine_args("/m").kv_cache_memory_bytes is None  # unset: vLLM sizes it
    assert build_parser().parse_args(["critic", "--model", "/m"]).kv_cache_memory_bytes is None
    monkeypatch.setenv("ESPO_KV_CACHE_MEMORY_BYTES", "3000000")
    assert build_parser().parse_args(["critic", "--model", "/m"]).kv_cache_memory_bytes == 3_000_000
    # a stock `vllm serve` started here gets what our servers started here get (ENGINE_ENV's, on CPU)
    argv = vllm_serve_argv("/m")
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(CPU_KV_CACHE_BYTES)


@pytest.mark.vllm
def test_the_test_servers_engines_have_the_small_kv_cache(rollout_server, critic_server):
    """ENGINE_ENV on CPU: every engine a ServerProcess starts takes 256 MiB of KV cache, not 1 GiB."""
    assert ENGINE_ENV["ESPO_KV_CACHE_MEMORY_BYTES"] == str(CPU_KV_CACHE_BYTES) == str(2**28)
    for server in (rollout_server.wait_ready(), critic_server.wait_ready()):
        assert "Explicitly set (0.25/" in server.log_path.read_text(), server.name


def test_the_onednn_cache_setting_is_set_for_the_engine_and_restored(monkeypatch):
    monkeypatch.delenv(ONEDNN_CACHE, raising=False)
    for inline in (False, True):
        with engine_spawn_env("0", inline=inline):
            assert os.environ[ONEDNN_CACHE] == ENGINE_ONEDNN_CACHE == "0"
        assert ONEDNN_CACHE not in os.environ
    monkeypatch.setenv(ONEDNN_CACHE, "1024")  # an operator's own setting wins
    with engine_spawn_env(None):
        assert os.environ[ONEDNN_CACHE] == "1024"
    assert os.environ[ONEDNN_CACHE] == "1024"
