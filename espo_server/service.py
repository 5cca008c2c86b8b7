"""The rollout service: a call is validated, its samples run, its batch is folded in.

    request --plan()--> CallPlan --stream()--> run_sample() per sample --> trajectories --> _finish()
                                                 (sample.py)                  usage, state_after

`RolloutService` is the serving layer between the transports (HTTP routes in app.py) and the
engines. It knows nothing of HTTP: it raises `errors.InvalidRequest` for the caller's mistakes and
returns protocol models. Besides calls it holds the server-owned ESPO state (`ledger`), the
idempotency cache of finished calls, and weight reloads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from espo_client.protocol import (
    CriticWeightsResponse,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    StateResponse,
    Trajectory,
    Usage,
    WeightsResponse,
)
from espo_client.stop_rule import (
    BatchStats,
    EspoParams,
    EspoState,
    ParameterError,
    StopRule,
    TrajectoryTracker,
    draw_random_stop,
    make_tracker,
    tokens_saved,
    update_state,
)

from . import metrics
from .config import ServerConfig
from .critic import CriticBatcher, CriticClient, CriticError, push_weights
from .engine import GenerationParams, PolicyEngine
from .errors import InvalidRequest
from .ledger import StateLedger
from .sample import CriticAccess, SampleResult, SampleSpec, Scorer, run_sample

log = logging.getLogger(__name__)

Verifier = Callable[[str, str, str], float]
"""(prompt text, response text, expected answer) -> reward."""


@dataclass
class CallPlan:
    """A validated request: what every sample of the call shares."""

    request: RolloutRequest
    request_id: str
    prompt_ids: list[list[int]]
    prompt_texts: list[str | None]
    rule: StopRule
    params: EspoParams
    top_k_logprobs: int
    state: EspoState | None = None
    """Set when the call starts: the learner's, or the server's (frozen for the call's batch)."""
    policy_version: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def learner_owned(self) -> bool:
        return self.request.state is not None

    def generation_params(self, flat_index: int) -> GenerationParams:
        """The engine's sampling settings of sample `flat_index` (= prompt_index * n + sample_index):
        the one place a request turns into sampling parameters."""
        request = self.request
        return GenerationParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=None if request.seed is None else request.seed + flat_index,
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=request.ignore_eos,
            top_k_logprobs=self.top_k_logprobs,
        )

    def tracker(self, flat_index: int, critic_fallback: str) -> TrajectoryTracker:
        """A fresh tracker of this call's rule, with the state frozen for the call."""
        assert self.state is not None, "the state is read when the call starts"
        random_stop_at = None
        if self.rule is StopRule.RANDOM:
            seed = self.request.seed
            rng = np.random.default_rng(None if seed is None else [seed, flat_index])
            random_stop_at = draw_random_stop(rng, self.params, self.request.max_tokens)
        return make_tracker(
            self.rule, self.state, self.params, critic_fallback=critic_fallback, random_stop_at=random_stop_at
        )


class RolloutService:
    def __init__(
        self,
        engine: PolicyEngine,
        critic: CriticClient | None,
        config: ServerConfig,
        verifier: Verifier | None = None,
    ) -> None:
        self.engine = engine
        self.critic = critic
        self.config = config
        self.verifier = verifier
        self.rule_defaults = config.rule_defaults()
        self.ledger = StateLedger(self.rule_defaults, config.initial_state)
        self.critic_batcher = (
            CriticBatcher(
                critic,
                timeout_s=config.critic_timeout_s,
                window_s=config.critic_batch_window_ms / 1000,
                max_batch=config.critic_max_batch,
            )
            if critic
            else None
        )
        self._critic_access = CriticAccess(self.critic_batcher, config.critic_fallback) if critic else None
        self._finished: OrderedDict[str, RolloutResponse] = OrderedDict()
        self._running: dict[str, asyncio.Future[RolloutResponse]] = {}
        self._publish_state()

    # ------------------------------------------------------------------ validation

    def plan(self, request: RolloutRequest) -> CallPlan:
        """Check a request against the model and limits; raise InvalidRequest naming the field.
        No side effects: the state is read when the call starts (`stream`)."""
        cfg, engine = self.config, self.engine
        if request.n > cfg.max_n:
            raise InvalidRequest(f"n={request.n} exceeds this server's max_n={cfg.max_n}", "n")
        if len(request.prompts) > cfg.max_prompts:
            raise InvalidRequest(
                f"{len(request.prompts)} prompts exceed max_prompts={cfg.max_prompts}", "prompts"
            )
        if request.n * len(request.prompts) > cfg.max_trajectories:
            raise InvalidRequest(
                f"{len(request.prompts)} prompts x n={request.n} exceed "
                f"max_trajectories={cfg.max_trajectories}",
                "n",
            )
        if request.max_tokens >= engine.max_model_len:
            raise InvalidRequest(
                f"max_tokens={request.max_tokens} must be below the model length {engine.max_model_len}",
                "max_tokens",
            )
        for token in request.stop_token_ids or ():
            if not 0 <= token < engine.vocab_size:
                raise InvalidRequest(
                    f"stop token id {token} outside the vocabulary [0, {engine.vocab_size})", "stop_token_ids"
                )
        vocab = engine.vocab_size
        prompt_ids, prompt_texts = [], []
        for i, prompt in enumerate(request.prompts):
            if prompt.token_ids is not None:
                ids = prompt.token_ids
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise InvalidRequest(
                        f"prompts[{i}] has token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                        f"prompts[{i}].token_ids",
                    )
                text = self._decode(ids) if (self.verifier and prompt.answer is not None) else None
            else:
                text = prompt.text
                ids = self.encode_text(prompt.text or "")
                if not ids:
                    raise InvalidRequest(f"prompts[{i}].text tokenises to nothing", f"prompts[{i}].text")
            if len(ids) + request.max_tokens > engine.max_model_len:
                raise InvalidRequest(
                    f"prompts[{i}] has {len(ids)} tokens; with max_tokens={request.max_tokens} it "
                    f"exceeds the model length {engine.max_model_len}",
                    f"prompts[{i}]",
                )
            prompt_ids.append(ids)
            prompt_texts.append(text)

        rule = request.stop_rule or cfg.default_stop_rule
        if rule.needs_critic and self.critic is None:
            raise InvalidRequest(
                f"stop_rule {rule.value!r} needs a critic; this server runs without one (use regret_only)",
                "stop_rule",
            )
        try:
            params = (
                request.rule_params.apply(self.rule_defaults) if request.rule_params else self.rule_defaults
            )
        except ParameterError as exc:
            raise InvalidRequest(str(exc), f"rule_params.{exc.field}") from exc
        except KeyError as exc:  # an unknown name: the protocol model forbids it first, config may not
            raise InvalidRequest(str(exc).strip("'\""), "rule_params") from exc
        top_k = (request.entropy_top_k or cfg.entropy_top_k) if "entropy" in request.include else 1
        return CallPlan(
            request=request,
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            prompt_texts=prompt_texts,
            rule=rule,
            params=params,
            top_k_logprobs=top_k,
        )

    def encode_text(self, text: str) -> list[int]:
        return list(self.engine.tokenizer.encode(text))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ calls

    async def rollouts(self, request: RolloutRequest) -> RolloutResponse:
        """Run a whole call and return every trajectory. A retry with a known request_id gets the
        first call's answer (or waits for it), never a second batch of samples."""
        rid = request.request_id
        if rid is not None and rid in self._running:
            return await asyncio.shield(self._running[rid])
        response = None
        async for item in self.stream(self.plan(request)):
            if isinstance(item, RolloutResponse):
                response = item
        assert response is not None
        return response

    async def stream(self, plan: CallPlan) -> AsyncIterator[Trajectory | RolloutResponse]:
        """Yield trajectories as they finish, then the whole RolloutResponse. A finished request_id
        replays the first call's answer."""
        request = plan.request
        rid = request.request_id
        if rid is not None and rid in self._finished:
            cached = self._finished[rid]
            for trajectory in cached.trajectories:
                yield trajectory
            yield cached
            return
        async with self.engine.gate.shared():
            plan.policy_version = self.engine.policy_version
            plan.state = (
                request.state
                if request.state is not None
                else self.ledger.begin(request.batch_id, plan.params)
            )
            future: asyncio.Future[RolloutResponse] = asyncio.get_running_loop().create_future()
            if rid is not None:
                self._running[rid] = future
            metrics.REQUESTS.labels(outcome="started").inc()
            tasks = [
                asyncio.create_task(self._sample(plan, p, s))
                for p in range(len(plan.prompt_ids))
                for s in range(request.n)
            ]
            results: list[SampleResult] = []
            try:
                for next_done in asyncio.as_completed(tasks):
                    result = await next_done
                    results.append(result)
                    yield result.trajectory
                response = self._finish(plan, results)
                future.set_result(response)
                self._remember(plan.request_id, response)
                metrics.REQUESTS.labels(outcome="ok").inc()
                yield response
            except BaseException as exc:
                outcome = "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "error"
                metrics.REQUESTS.labels(outcome=outcome).inc()
                # Nothing is folded into the state: a failed or cancelled call leaves it as it was.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if not future.done():
                    future.set_exception(RuntimeError(f"rollout call ended: {exc!r}"))
                    future.exception()  # mark retrieved
                raise
            finally:
                if rid is not None:
                    self._running.pop(rid, None)
                metrics.REQUEST_LATENCY.observe(time.perf_counter() - plan.started)

    def _remember(self, request_id: str, response: RolloutResponse) -> None:
        if self.config.idempotency_cache <= 0:
            return
        self._finished[request_id] = response
        while len(self._finished) > self.config.idempotency_cache:
            self._finished.popitem(last=False)

    async def _sample(self, plan: CallPlan, prompt_index: int, sample_index: int) -> SampleResult:
        request = plan.request
        flat_index = prompt_index * request.n + sample_index
        spec = SampleSpec(
            engine_id=f"{plan.request_id}-{prompt_index}-{sample_index}",
            prompt_index=prompt_index,
            sample_index=sample_index,
            prompt_ids=plan.prompt_ids[prompt_index],
            generation=replace(
                plan.generation_params(flat_index), stream_interval=self.config.stream_interval
            ),
            shadow=request.shadow,
            include=frozenset(request.include),
            r_fail=plan.params.r_fail,
            policy_version=plan.policy_version,
            score=self._scorer(plan, prompt_index),
        )
        tracker = plan.tracker(flat_index, self.config.critic_fallback)
        return await run_sample(spec, tracker, self.engine, self._critic_access)

    def _scorer(self, plan: CallPlan, prompt_index: int) -> Scorer | None:
        """The verifier's reward for eos responses of this prompt, if the server can score them."""
        answer = plan.request.prompts[prompt_index].answer
        text = plan.prompt_texts[prompt_index]
        verifier = self.verifier
        if verifier is None or answer is None or text is None:
            return None
        return lambda token_ids: float(verifier(text, self._decode(token_ids), answer))

    # ------------------------------------------------------------------ the end of a call

    def _finish(self, plan: CallPlan, results: list[SampleResult]) -> RolloutResponse:
        request = plan.request
        assert plan.state is not None
        results.sort(key=lambda r: (r.trajectory.prompt_index, r.trajectory.sample_index))
        trajectories = [r.trajectory for r in results]
        stats = BatchStats()
        for r in results:
            stats.add_trajectory(r.g, r.rule_stopped if plan.rule.steers_beta else None)

        stopped = [t for t in trajectories if t.end_reason == "espo_stop"]
        unstopped_lengths = [len(t.token_ids) for t in trajectories if t.end_reason in ("eos", "length")]
        estimate, upper = tokens_saved([t.stop_step for t in stopped], unstopped_lengths, request.max_tokens)
        shadow = [r for r in results if r.trajectory.shadow_stop_step is not None]
        shadow_saved = sum(r.full_length - (r.trajectory.shadow_stop_step + 1) for r in shadow)

        state_after: EspoState | None = None
        if plan.learner_owned:
            state_after = update_state(plan.state, stats, plan.params)
        elif request.update_state:
            state_after = self.ledger.finish(request.batch_id, stats, plan.params)
            self._publish_state()

        usage = Usage(
            prompt_tokens=sum(len(p) for p in plan.prompt_ids) * request.n,
            generated_tokens=sum(len(t.token_ids) for t in trajectories),
            discarded_tokens=sum(t.discarded_tokens for t in trajectories),
            trajectories=len(trajectories),
            stopped=len(stopped),
            shadow_stopped=len(shadow),
            tokens_saved_estimate=estimate,
            tokens_saved_upper_bound=upper,
            tokens_saved_shadow=shadow_saved,
            critic_calls=sum(r.critic_calls for r in results),
            critic_errors=sum(r.critic_errors for r in results),
            critic_time_s=round(sum(r.critic_time_s for r in results), 6),
            critic_tokens=sum(r.critic_tokens for r in results),
            critic_prefix_tokens=sum(r.critic_prefix_tokens for r in results),
            trajectory_time_s=round(sum(r.lifetime_s for r in results), 6),
            wall_time_s=round(time.perf_counter() - plan.started, 6),
            regret_tokens=stats.tokens,
            regret_sum=stats.g_sum,
            regret_sumsq=stats.g_sumsq,
        )
        self._count(plan, trajectories, usage)
        return RolloutResponse(
            request_id=plan.request_id,
            trajectories=trajectories,
            usage=usage,
            stop_rule=plan.rule,
            shadow=request.shadow,
            rule_params=asdict(plan.params),
            state_used=plan.state,
            state_after=state_after,
            policy_version=plan.policy_version,
        )

    def _count(self, plan: CallPlan, trajectories: list[Trajectory], usage: Usage) -> None:
        rule = plan.rule.value
        for t in trajectories:
            metrics.TRAJECTORIES.labels(end_reason=t.end_reason, rule=rule).inc()
        metrics.GENERATED_TOKENS.labels(rule=rule).inc(usage.generated_tokens)
        metrics.DISCARDED_TOKENS.inc(usage.discarded_tokens)
        metrics.STOPPED.labels(rule=rule).inc(usage.stopped)
        metrics.SHADOW_STOPPED.labels(rule=rule).inc(usage.shadow_stopped)
        metrics.TOKENS_SAVED.labels(kind="estimate").inc(usage.tokens_saved_estimate)
        metrics.TOKENS_SAVED.labels(kind="upper_bound").inc(usage.tokens_saved_upper_bound)
        metrics.TOKENS_SAVED.labels(kind="shadow").inc(usage.tokens_saved_shadow)

    def _publish_state(self) -> None:
        metrics.set_state_gauges(self.ledger.state)
        metrics.POLICY_VERSION.set(self.engine.policy_version)
        if self.critic is not None:
            version = getattr(self.critic, "version", None)
            metrics.CRITIC_VERSION.set(-1 if version is None else version)

    # ------------------------------------------------------------------ state, weights, info

    def state(self) -> StateResponse:
        batch = self.ledger.open
        return StateResponse(
            state=self.ledger.state,
            open_batch_id=batch.batch_id if batch else None,
            open_batch_calls=batch.calls if batch else 0,
        )

    def set_state(self, state: EspoState) -> StateResponse:
        self.ledger.set(state)
        self._publish_state()
        return self.state()

    def commit(self, batch_id: str | None) -> StateResponse:
        try:
            self.ledger.commit(batch_id)
        except KeyError as exc:
            raise InvalidRequest(str(exc).strip("'\""), "batch_id") from exc
        self._publish_state()
        return self.state()

    async def load_weights(self, path: str, version: int | None) -> WeightsResponse:
        # Checked here: a reload that fails inside the engine can leave it half-loaded.
        directory = Path(path)
        if not directory.is_dir() or not any(directory.glob("*.safetensors")):
            raise InvalidRequest(f"{path} is not a directory with *.safetensors files on the server", "path")
        new_version = self.engine.policy_version + 1 if version is None else version
        try:
            seconds = await self.engine.reload_weights(path, new_version)
        except Exception:
            metrics.WEIGHT_LOADS.labels(outcome="error").inc()
            raise
        metrics.WEIGHT_LOADS.labels(outcome="ok").inc()
        self._publish_state()
        return WeightsResponse(policy_version=new_version, load_time_s=round(seconds, 4))

    async def load_critic_weights(self, path: str, version: int | None) -> CriticWeightsResponse:
        """Serve new critic weights: like a policy push, it waits for the running rollouts and holds
        new ones back, so every query of a call is judged by one critic version. A remote critic
        (`espo-server critic`) gets the push forwarded and checks the directory itself."""
        if self.critic is None:
            raise InvalidRequest("this server runs without a critic (--critic none): nothing to push", "path")
        async with self.engine.gate.exclusive():
            new_version, seconds = await push_weights(self.critic, path, version)
        self._publish_state()
        return CriticWeightsResponse(critic_version=new_version, load_time_s=round(seconds, 4))

    async def aclose(self) -> None:
        """Stop the critic batches still in flight (start-up calls it on the way out)."""
        if self.critic_batcher is not None:
            await self.critic_batcher.aclose()

    def info(self) -> InfoResponse:
        engine, cfg = self.engine, self.config
        return InfoResponse(
            model=engine.model,
            policy_version=engine.policy_version,
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            eos_token_id=engine.eos_token_id,
            max_n=cfg.max_n,
            max_prompts=cfg.max_prompts,
            critic=self.critic.name if self.critic else "none",
            critic_fallback=cfg.critic_fallback,
            default_stop_rule=cfg.default_stop_rule,
            rule_defaults=asdict(self.rule_defaults),
            entropy_top_k=cfg.entropy_top_k,
            state=self.ledger.state,
            verifier=cfg.verifier_name(),
            critic_version=getattr(self.critic, "version", None),
        )

    async def readiness(self) -> dict[str, str]:
        """'ok' or 'down: why' for the engine and (if any) the critic."""
        detail: dict[str, str] = {}
        try:
            await self.engine.check_health()
            detail["engine"] = "ok"
        except Exception as exc:
            detail["engine"] = f"down: {exc!r}"
        if self.critic is not None:
            try:
                await self.critic.check()
                detail["critic"] = "ok"
            except CriticError as exc:
                detail["critic"] = f"down: {exc}"
        return detail
