"""The policy engine: a thin wrapper over vLLM's AsyncLLM. Knows nothing of HTTP.

One engine request per sample (prefix caching shares the prompt), token-id prompts, DELTA streaming
with raw log-probabilities (`logprobs_mode=raw_logprobs`: before temperature and penalties, which
is what the ESPO regret needs), per-request abort, and weight reload from a directory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from espo_client.protocol import MAX_SEED, Sampling

from .async_llm import running_async_llm
from .config import memory_fraction
from .errors import EngineDead, ReloadFailed, WeightsBroken
from .gate import ReadWriteGate
from .stream_readers import StreamReaders

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

ENGINE_DEAD_MESSAGE = (
    "the policy engine process has died (vLLM EngineDeadError); this server cannot recover and is "
    "exiting for its supervisor to restart it: retry on another replica or after the restart"
)


def sample_seed(base: int, offset: int) -> int:
    """The engine seed `base + offset`, wrapped into [0, 2**63): a request may give any seed up to
    MAX_SEED, and the sample index (or a continuation's offset) added to it must not overflow."""
    return (base + offset) % (MAX_SEED + 1)


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one sample."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_k_logprobs: int = 1
    """Log-probabilities returned per step: 1 for the regret, k for the entropy estimate."""
    top_ids: bool = False
    """Also return the top-k token ids of each step (`TokenChunk.topk_token_ids`)."""
    stop: tuple[str, ...] = ()
    """Stop strings (vLLM then detokenizes this sample's output to look for them)."""
    stream_interval: int = 1
    """Tokens per streamed chunk (vLLM's stream_interval; the first and last come at once)."""
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    """vLLM's further sampling settings (protocol `Sampling`): they change what is sampled, not the
    raw logprobs returned."""

    @classmethod
    def of(cls, sampling: Sampling, **engine: Any) -> GenerationParams:
        """A request's sampling settings (`espo_client.protocol.Sampling`, the one definition) as the
        engine's, with the engine's own settings (`top_k_logprobs`, `top_ids`, `stream_interval`)."""
        fields = sampling.model_dump()
        for name in ("stop_token_ids", "stop", "bad_words"):
            fields[name] = tuple(fields[name] or ())
        fields["logit_bias"] = tuple(sorted((fields["logit_bias"] or {}).items()))
        if fields["allowed_token_ids"] is not None:
            fields["allowed_token_ids"] = tuple(fields["allowed_token_ids"])
        return cls(**fields, **engine)


@dataclass(frozen=True)
class Parallelism:
    """vLLM's parallelism, passed through to the engine as it is (see vLLM's docs on each)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    """mp, ray, uni or external_launcher; None: vLLM picks (mp on one node)."""
    enable_expert_parallel: bool = False

    def engine_kwargs(self) -> dict:
        kwargs: dict = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "enable_expert_parallel": self.enable_expert_parallel,
        }
        if self.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = self.distributed_executor_backend
        return kwargs


@dataclass
class TokenChunk:
    """New tokens of one sample since the last chunk (vLLM DELTA output)."""

    token_ids: list[int]
    logprobs: list[float]
    """Raw log-probability of each sampled token."""
    top_logprobs: list[float]
    """Raw log-probability of the most likely token at each step (max_a log pi(a|s_t))."""
    topk_logprobs: list[list[float]] = field(default_factory=list)
    """The top-k raw log-probabilities at each step, when more than one was asked for."""
    topk_token_ids: list[list[int]] = field(default_factory=list)
    """The token ids of `topk_logprobs`, when `GenerationParams.top_ids` asked for them."""
    finish_reason: str | None = None
    """None while running; else vLLM's reason: stop, length or abort."""


@runtime_checkable
class Engine(Protocol):
    """What the service needs from a policy engine: `PolicyEngine` (vLLM) is it, and so is the test
    suite's scripted fake (tests/fakes.py); tests/test_fakes.py checks both against this."""

    model: str
    tokenizer: Any
    """A Hugging Face tokenizer: encode, decode, apply_chat_template, eos_token_id."""
    policy_version: int
    weights_path: str  # where the weights serving were loaded from: the model, then each push's directory
    broken: str | None
    """Why the weights are unusable (a failed reload whose roll-back failed too); None: fine."""
    gate: ReadWriteGate
    """Calls hold it shared, a weight push exclusive."""
    vocab_size: int
    max_model_len: int
    eos_token_id: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None

    @property
    def dead(self) -> bool:
        """The engine's process is gone: nothing will be served again."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[TokenChunk]:
        """Stream one sample. Closing or cancelling the iterator aborts the engine request."""
        ...

    async def abort(self, request_id: str) -> None:
        """End a request: its stream ends with finish_reason "abort"."""
        ...

    async def reload_weights(self, path: str, version: int) -> float:
        """Load the weights in `path` as `version`; the seconds it took."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve now."""
        ...

    def fail_streams(self) -> None:
        """The engine died: end every stream being read, and every one begun later, with EngineDead."""
        ...


class PolicyEngine:
    """The policy model served by vLLM."""

    def __init__(self, llm: AsyncLLM, model: str, tokenizer, policy_version: int = 0) -> None:
        self.llm = llm
        self.model = model
        self.tokenizer = tokenizer
        self.policy_version = policy_version
        self.weights_path = model
        """Where the weights now served came from: a failed reload rolls back to it."""
        self.broken: str | None = None
        """Why the weights are unusable (a failed reload whose roll-back failed too); None: fine."""
        self.gate = ReadWriteGate()
        self.readers = StreamReaders()
        model_config = llm.model_config
        self.vocab_size: int = model_config.get_vocab_size()
        self.max_model_len: int = model_config.max_model_len
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        scheduler = getattr(getattr(llm, "vllm_config", None), "scheduler_config", None)
        self.max_num_seqs: int | None = getattr(scheduler, "max_num_seqs", None)
        self.max_num_batched_tokens: int | None = getattr(scheduler, "max_num_batched_tokens", None)

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, model: str, *, cpu_cores: str | None = None, cpu_worker: str = "inline", **settings: Any
    ) -> AsyncIterator[PolicyEngine]:
        """Start AsyncLLM for `model` with `engine_args`' settings (on CPU, its worker on
        `cpu_cores`, spawned or inline: running_async_llm); shut it down on exit, whatever happened."""
        from transformers import AutoTokenizer

        args = cls.engine_args(model, **settings)
        async with running_async_llm(args, "policy", cpu_cores, cpu_worker) as llm:
            yield cls(llm, model, AutoTokenizer.from_pretrained(model))

    @staticmethod
    def engine_args(
        model: str,
        *,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        max_logprobs: int = 64,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        parallel: Parallelism | None = None,
    ):  # -> vllm.engine.arg_utils.AsyncEngineArgs
        """The policy's vLLM engine arguments (no engine is started); `gpu_memory_utilization` None:
        this device's default (config.MEMORY_FRACTIONS)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        return AsyncEngineArgs(
            model=model,
            gpu_memory_utilization=memory_fraction(
                "policy", gpu_memory_utilization, on_cpu=current_platform.is_cpu()
            ),
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            logprobs_mode="raw_logprobs",
            max_logprobs=max_logprobs,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            disable_log_stats=False,
            worker_extension_cls="espo_server.policy_worker.PolicyWorker",
            **(parallel or Parallelism()).engine_kwargs(),
        )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[TokenChunk]:
        """Stream one sample. Closing or cancelling the iterator aborts the engine request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        settings = {name: getattr(params, name) for name in Sampling.model_fields}  # vLLM's own names
        for name in ("stop_token_ids", "stop", "bad_words"):
            settings[name] = list(settings[name]) or None
        settings["logit_bias"] = dict(params.logit_bias) or None
        if params.allowed_token_ids is not None:
            settings["allowed_token_ids"] = list(params.allowed_token_ids)
        sampling = SamplingParams(
            **settings,
            logprobs=params.top_k_logprobs,
            # vLLM's flat logprobs measured slower here (bench/logprobs_cost.py, docs/benchmarks.md)
            flat_logprobs=False,
            output_kind=RequestOutputKind.DELTA,
            detokenize=bool(params.stop),
            stream_interval=params.stream_interval if params.stream_interval > 1 else None,
        )
        want_topk = params.top_k_logprobs > 1 or params.top_ids
        finished = False
        stream = self.llm.generate({"prompt_token_ids": prompt_token_ids}, sampling, request_id)
        try:
            if self.dead:
                raise EngineDead(ENGINE_DEAD_MESSAGE)
            while True:
                with self.readers.reading():  # only the wait: the watchdog's `fail_streams` ends it
                    try:
                        out = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                finished = out.finished
                yield self._chunk(out, params, want_topk)
        except Exception as exc:
            if self.dead and not isinstance(exc, EngineDead):  # EngineDeadError, or what it caused
                raise EngineDead(ENGINE_DEAD_MESSAGE) from exc
            raise
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # vLLM aborts an unfinished request as its stream closes
            if not finished and not self.dead:
                await self.abort(request_id)

    @staticmethod
    def _chunk(out, params: GenerationParams, want_topk: bool) -> TokenChunk:
        """One of vLLM's DELTA outputs as a TokenChunk."""
        completion = out.outputs[0]
        chunk = TokenChunk([], [], [], finish_reason=completion.finish_reason if out.finished else None)
        for token_id, step in zip(completion.token_ids, completion.logprobs or (), strict=True):
            # `step` maps token id -> Logprob for the sampled token and the top-k.
            chunk.token_ids.append(token_id)
            chunk.logprobs.append(step[token_id].logprob)
            chunk.top_logprobs.append(max(lp.logprob for lp in step.values()))
            if want_topk:
                ranked = sorted(step.items(), key=lambda kv: kv[1].rank or 0)
                top = [(t, lp) for t, lp in ranked if lp.rank and lp.rank <= params.top_k_logprobs]
                chunk.topk_logprobs.append([lp.logprob for _, lp in top])
                if params.top_ids:
                    chunk.topk_token_ids.append([t for t, _ in top])
        return chunk

    @property
    def dead(self) -> bool:
        """The engine's process is gone (vLLM noticed: its monitor thread or a failed step)."""
        return bool(self.llm.errored)

    def fail_streams(self) -> None:
        """The engine's process died: end every stream being read with EngineDead (vLLM leaves the
        requests the dead process had not read hanging)."""
        self.readers.fail(lambda: EngineDead(ENGINE_DEAD_MESSAGE))

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.llm.abort(request_id)

    async def reload_weights(self, path: str, version: int) -> float:
        """Load new weights in place and reset the prefix cache. The caller holds `gate.exclusive()`,
        so that no sample is generating meanwhile.

        A reload that fails part-way may leave some layers new and some old, so the old weights are
        reloaded from `weights_path`: ReloadFailed (the old version serves on). If that fails too,
        `broken` says why, readiness turns false and every call is refused (WeightsBroken) until a
        push succeeds."""
        started = time.perf_counter()
        try:
            await self._reload(path)
        except Exception as exc:
            if self.dead:
                raise
            log.error("reload of %s failed (%r): rolling back to %s", path, exc, self.weights_path)
            try:
                await self._reload(self.weights_path)
            except Exception as again:
                self.broken = (
                    f"the weights are half-loaded: the reload of {path} failed ({exc!r}) and so did the "
                    f"roll-back to {self.weights_path} ({again!r}); push a checkpoint to recover"
                )
                log.error("%s", self.broken)
                raise WeightsBroken(self.broken) from exc
            raise ReloadFailed(
                f"the reload of {path} failed ({exc!r}); rolled back to version {self.policy_version} "
                f"({self.weights_path}), which serves on",
                "path",
            ) from exc
        self.policy_version, self.weights_path, self.broken = version, path, None
        return time.perf_counter() - started

    async def _reload(self, path: str) -> None:
        """vLLM's in-place reload in every worker (policy_worker: tied embeddings too), then drop the
        KV cached under the old weights."""
        await self.llm.collective_rpc("espo_reload_policy", args=(path,))
        await self.llm.reset_prefix_cache()

    async def check_health(self) -> None:
        await self.llm.check_health()
