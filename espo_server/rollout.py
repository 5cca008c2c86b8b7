"""The rollout loop: request -> one engine stream per sample -> stop rule -> critic -> trajectory.

`RolloutService` is the serving layer between the HTTP routes and the engines. For each sample it
runs `_sample`: tokens stream in from vLLM, each goes through the stop rule's tracker; when the
rule wants V(s_t) the critic is queried *while generation goes on*; when the answer says stop, the
engine request is aborted and the trajectory is cut back to t+1 tokens (tokens generated while
waiting are discarded and counted). Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from espo_client.entropy_espo import topk_entropy
from espo_client.protocol import RolloutRequest, RolloutResponse, Traces, Trajectory, Usage
from espo_client.stop_rule import (
    BatchStats,
    EspoParams,
    StopRule,
    TrajectoryTracker,
    draw_random_stop,
    make_tracker,
    tokens_saved,
    update_state,
)
from espo_client.stop_rule import EspoState as WireState

from . import metrics
from .config import ServerConfig
from .critic import CriticClient, CriticError, timed_values
from .engine import GenerationParams, PolicyEngine, TokenChunk
from .stopping import StateLedger

log = logging.getLogger(__name__)

Verifier = Callable[[str, str, str], float]
"""(prompt text, response text, expected answer) -> reward."""

_END_REASONS = {"stop": "eos", "length": "length", "abort": "abort"}
_NEEDS_CRITIC = {StopRule.ESPO, StopRule.VALUE_ONLY}


class InvalidRequest(ValueError):
    """The caller's mistake: answered 400 with the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


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
    state: WireState | None = None
    """Set when the call starts: the learner's, or the server's (frozen for the call's batch)."""
    policy_version: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def learner_owned(self) -> bool:
        return self.request.state is not None


@dataclass
class SampleResult:
    trajectory: Trajectory
    g: list[float]
    """Regret of every kept token (the batch statistics)."""
    rule_stopped: bool
    """Stopped, or would have been in shadow mode."""
    full_length: int
    """Tokens generated before the cut (kept + discarded)."""
    critic_calls: int = 0
    critic_errors: int = 0
    critic_time_s: float = 0.0
    lifetime_s: float = 0.0


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
        initial = config.initial_state if config.initial_state else None
        self.ledger = StateLedger(self.rule_defaults, initial)
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
        if rule in _NEEDS_CRITIC and self.critic is None:
            raise InvalidRequest(
                f"stop_rule {rule.value!r} needs a critic; this server runs without one (use regret_only)",
                "stop_rule",
            )
        try:
            params = (
                request.rule_params.apply(self.rule_defaults) if request.rule_params else self.rule_defaults
            )
        except (KeyError, ValueError) as exc:
            raise InvalidRequest(str(exc).strip("'\""), "rule_params") from exc
        top_k = 1
        if "entropy" in request.include:
            top_k = request.entropy_top_k or cfg.entropy_top_k
            if top_k > 64:
                raise InvalidRequest("entropy_top_k must be at most 64", "entropy_top_k")
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
        response = None  # stream() replays a finished request_id's response
        async for item in self.stream(request):
            if isinstance(item, RolloutResponse):
                response = item
        assert response is not None
        return response

    async def stream(self, request: RolloutRequest | CallPlan) -> AsyncIterator[Trajectory | RolloutResponse]:
        """Yield trajectories as they finish, then the whole RolloutResponse."""
        plan = request if isinstance(request, CallPlan) else None
        request = plan.request if plan else request
        rid = request.request_id
        if rid is not None and rid in self._finished:
            cached = self._finished[rid]
            for trajectory in cached.trajectories:
                yield trajectory
            yield cached
            return
        plan = plan or self.plan(request)
        async with self.engine.gate.shared():
            plan.policy_version = self.engine.policy_version
            if request.state is not None:
                plan.state = request.state
            else:
                plan.state = self.ledger.begin(request.batch_id, plan.params)
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

    # ------------------------------------------------------------------ one sample

    async def _sample(self, plan: CallPlan, prompt_index: int, sample_index: int) -> SampleResult:
        request = plan.request
        prompt = plan.prompt_ids[prompt_index]
        flat_index = prompt_index * request.n + sample_index
        seed = None if request.seed is None else request.seed + flat_index
        random_stop_at = None
        if plan.rule is StopRule.RANDOM:
            rng = np.random.default_rng(None if request.seed is None else [request.seed, flat_index])
            random_stop_at = draw_random_stop(rng, plan.params, request.max_tokens)
        tracker = make_tracker(
            plan.rule,
            plan.state,
            plan.params,
            critic_fallback=self.config.critic_fallback,
            random_stop_at=random_stop_at,
        )
        stop_token_ids = tuple(request.stop_token_ids or ())
        gen_params = GenerationParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            ignore_eos=request.ignore_eos,
            top_k_logprobs=plan.top_k_logprobs,
        )
        engine_id = f"{plan.request_id}-{prompt_index}-{sample_index}"
        run = _SampleRun(self, plan, tracker, prompt)
        metrics.INFLIGHT.inc()
        started = time.perf_counter()
        try:
            await run.generate(self.engine.generate(engine_id, prompt, gen_params))
        finally:
            metrics.INFLIGHT.dec()
        result = run.result(prompt_index, sample_index, plan.prompt_texts[prompt_index])
        result.lifetime_s = time.perf_counter() - started
        return result

    # ------------------------------------------------------------------ the end of a call

    def _finish(self, plan: CallPlan, results: list[SampleResult]) -> RolloutResponse:
        request = plan.request
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

        if plan.learner_owned:
            state_after = update_state(plan.state, stats, plan.params)
        elif request.update_state:
            after = self.ledger.finish(request.batch_id, stats, plan.params)
            state_after = after if after is not None else None
            self._publish_state()
        else:
            state_after = None

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
        s = self.ledger.state
        metrics.set_state_gauges(s.mu, s.var, s.beta, s.warm, s.batches)
        metrics.POLICY_VERSION.set(self.engine.policy_version)

    # ------------------------------------------------------------------ state and weights

    def state(self) -> WireState:
        return self.ledger.state

    def set_state(self, state: WireState) -> WireState:
        self.ledger.set(state)
        self._publish_state()
        return self.state()

    def commit(self, batch_id: str | None) -> WireState:
        try:
            self.ledger.commit(batch_id)
        except KeyError as exc:
            raise InvalidRequest(str(exc).strip("'\""), "batch_id") from exc
        self._publish_state()
        return self.state()

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
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
        return new_version, seconds


class _SampleRun:
    """One sample's generation: feeds tokens to the tracker and races the critic against the stream."""

    def __init__(
        self, service: RolloutService, plan: CallPlan, tracker: TrajectoryTracker, prompt: list[int]
    ):
        self.service = service
        self.plan = plan
        self.tracker = tracker
        self.prompt = prompt
        self.shadow = plan.request.shadow
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.topk: list[list[float]] = []
        self.finish_reason: str | None = None
        self.stop_step: int | None = None
        self.shadow_stop_step: int | None = None
        self.critic_calls = 0
        self.critic_errors = 0
        self.critic_time_s = 0.0
        self._query: asyncio.Task[float | None] | None = None
        self._query_t: int | None = None

    async def generate(self, stream: AsyncIterator[TokenChunk]) -> None:
        next_chunk: asyncio.Future[TokenChunk] | None = None
        try:
            while self.stop_step is None:
                if self._query is None and next_chunk is None:
                    try:
                        chunk = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                else:
                    if next_chunk is None:
                        next_chunk = asyncio.ensure_future(stream.__anext__())
                    waiting = {next_chunk} if self._query is None else {next_chunk, self._query}
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if self._query is not None and self._query in done:
                        self._resolve_query()
                        if self.stop_step is not None:
                            break
                    if next_chunk not in done:
                        continue
                    try:
                        chunk = next_chunk.result()
                    except StopAsyncIteration:
                        break
                    finally:
                        next_chunk = None
                self._feed(chunk)
                if chunk.finish_reason is not None:
                    self.finish_reason = chunk.finish_reason
                    break
            if self._query is not None and self.stop_step is None:
                # The stream ended while the critic was thinking: the decision for step t still holds.
                await asyncio.wait({self._query})
                self._resolve_query()
        finally:
            if next_chunk is not None:
                next_chunk.cancel()
                await asyncio.gather(next_chunk, return_exceptions=True)
            if self._query is not None:
                self._query.cancel()
                await asyncio.gather(self._query, return_exceptions=True)
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]  # aborts the engine request if unfinished

    def _feed(self, chunk: TokenChunk) -> None:
        for i, token_id in enumerate(chunk.token_ids):
            self.token_ids.append(token_id)
            self.logprobs.append(chunk.logprobs[i])
            if chunk.topk_logprobs:
                self.topk.append(chunk.topk_logprobs[i])
            decision = self.tracker.step(chunk.logprobs[i], chunk.top_logprobs[i])
            t = self.tracker.t
            if decision.stop:
                self._decided(t)
                if self.stop_step is not None:
                    return
            elif decision.query_value:
                self._query_t = t
                self._query = asyncio.create_task(self._value(self.prompt + self.token_ids[:t]))

    def _decided(self, t: int) -> None:
        if self.shadow:
            self.shadow_stop_step = t
        else:
            self.stop_step = t

    def _resolve_query(self) -> None:
        assert self._query is not None and self._query_t is not None
        value = self._query.result()
        self._query = None
        if self.tracker.resolve(self._query_t, value):
            self._decided(self._query_t)

    async def _value(self, prefix: list[int]) -> float | None:
        service = self.service
        assert service.critic is not None
        self.critic_calls += 1
        started = time.perf_counter()
        try:
            (value,) = await timed_values(service.critic, [prefix], service.config.critic_timeout_s)
            return value
        except CriticError as exc:
            self.critic_errors += 1
            log.warning("critic query failed (%s); policy %s", exc, service.config.critic_fallback)
            return None
        finally:
            self.critic_time_s += time.perf_counter() - started

    def result(self, prompt_index: int, sample_index: int, prompt_text: str | None) -> SampleResult:
        plan, request = self.plan, self.plan.request
        full_length = len(self.token_ids)
        if self.stop_step is not None:
            kept = self.stop_step + 1
            end_reason = "espo_stop"
        else:
            kept = full_length
            end_reason = _END_REASONS.get(self.finish_reason or "abort", "abort")
        token_ids = self.token_ids[:kept]
        reward: float | None = None
        if end_reason == "espo_stop":
            reward = plan.params.r_fail
        elif end_reason == "eos":
            answer = request.prompts[prompt_index].answer
            verifier = self.service.verifier
            if verifier is not None and answer is not None and prompt_text is not None:
                reward = float(verifier(prompt_text, self.service._decode(token_ids), answer))
        traces = None
        if request.include:
            want = set(request.include)
            tr = self.tracker
            traces = Traces(
                regret=tr.g[:kept] if "regret" in want else None,
                z=tr.z[:kept] if "z" in want else None,
                values=[tr.values.get(t) for t in range(kept)] if "values" in want else None,
                entropy=[topk_entropy(lp, self.service.engine.vocab_size) for lp in self.topk[:kept]]
                if "entropy" in want
                else None,
            )
        trajectory = Trajectory(
            prompt_index=prompt_index,
            sample_index=sample_index,
            token_ids=token_ids,
            logprobs=self.logprobs[:kept],
            end_reason=end_reason,
            stop_step=self.stop_step,
            reward=reward,
            shadow_stop_step=self.shadow_stop_step,
            policy_version=plan.policy_version,
            discarded_tokens=full_length - kept,
            critic_error=self.critic_errors > 0,
            traces=traces,
        )
        return SampleResult(
            trajectory=trajectory,
            g=self.tracker.g[:kept],
            rule_stopped=self.stop_step is not None or self.shadow_stop_step is not None,
            full_length=full_length,
            critic_calls=self.critic_calls,
            critic_errors=self.critic_errors,
            critic_time_s=self.critic_time_s,
        )
