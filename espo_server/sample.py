"""One sample: engine stream -> tracker -> critic race -> Trajectory.

Tokens stream in from vLLM; each goes through the stop rule's tracker. When the rule wants V(s_t),
the critic is asked *while generation goes on*; when the answer says stop, the engine request is
aborted and the trajectory is cut back to t+1 tokens (tokens generated while waiting are discarded
and counted). If the stream ends while a query is pending, the decision for step t still applies.
Knows nothing of HTTP, of the call the sample belongs to, or of the ESPO batch state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from espo_client.entropy_espo import topk_entropy
from espo_client.protocol import Traces, Trajectory
from espo_client.stop_rule import TrajectoryTracker

from . import metrics
from .critic import CriticBatcher, CriticError
from .engine import GenerationParams, PolicyEngine, TokenChunk

log = logging.getLogger(__name__)

_END_REASONS = {"stop": "eos", "length": "length", "abort": "abort"}

Scorer = Callable[[list[int]], "float | None"]
"""Reward of an `eos` response from its token ids (the verifier), or None: the learner scores it."""


@dataclass(frozen=True)
class SampleSpec:
    """Everything one sample needs, fixed when its call starts."""

    engine_id: str
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    generation: GenerationParams
    shadow: bool
    include: frozenset[str]
    r_fail: float
    policy_version: int
    score: Scorer | None = None


@dataclass(frozen=True)
class CriticAccess:
    """The critic as the sample loop uses it: queries go through the batcher (which owns the timeout),
    and what a failure means."""

    client: CriticBatcher
    fallback: str


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
    critic_tokens: int = 0
    """Tokens the critic computed for this sample's answered queries."""
    critic_prefix_tokens: int = 0
    """Summed length of the prefixes those queries asked about."""


async def run_sample(
    spec: SampleSpec, tracker: TrajectoryTracker, engine: PolicyEngine, critic: CriticAccess | None
) -> SampleResult:
    """Generate one sample under its stop rule and return its trajectory."""
    run = _SampleRun(spec, tracker, critic)
    metrics.INFLIGHT.inc()
    started = time.perf_counter()
    try:
        await run.generate(engine.generate(spec.engine_id, spec.prompt_ids, spec.generation))
    finally:
        metrics.INFLIGHT.dec()
    result = run.result(engine.vocab_size)
    result.lifetime_s = time.perf_counter() - started
    return result


class _SampleRun:
    """One sample's generation: feeds tokens to the tracker and races the critic against the stream."""

    def __init__(self, spec: SampleSpec, tracker: TrajectoryTracker, critic: CriticAccess | None) -> None:
        self.spec = spec
        self.tracker = tracker
        self.critic = critic
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.topk: list[list[float]] = []
        self.finish_reason: str | None = None
        self.stop_step: int | None = None
        self.shadow_stop_step: int | None = None
        self.critic_calls = 0
        self.critic_errors = 0
        self.critic_time_s = 0.0
        self.critic_tokens = 0
        self.critic_prefix_tokens = 0
        self.critic_version: int | None = None
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
            if self.stop_step is not None:
                continue  # past a stop inside a chunk (stream_interval > 1): generated, discarded, counted
            decision = self.tracker.step(chunk.logprobs[i], chunk.top_logprobs[i])
            t = self.tracker.t
            if decision.stop:
                self._decided(t)
            elif decision.query_value:
                self._query_t = t
                self._query = asyncio.create_task(self._value(self.spec.prompt_ids + self.token_ids[:t]))

    def _decided(self, t: int) -> None:
        if self.spec.shadow:
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
        critic = self.critic
        assert critic is not None, "a rule that asks for V(s_t) runs only with a critic"
        self.critic_calls += 1
        started = time.perf_counter()
        try:
            answer = await critic.client.value(prefix)
        except CriticError as exc:
            self.critic_errors += 1
            log.warning("critic query failed (%s); policy %s", exc, critic.fallback)
            return None
        finally:
            self.critic_time_s += time.perf_counter() - started
        self.critic_tokens += answer.computed_tokens
        self.critic_prefix_tokens += len(prefix)
        self.critic_version = answer.version
        return answer.value

    def result(self, vocab_size: int) -> SampleResult:
        spec = self.spec
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
            reward = spec.r_fail
        elif end_reason == "eos" and spec.score is not None:
            reward = spec.score(token_ids)
        traces = None
        if spec.include:
            want, tr = spec.include, self.tracker
            traces = Traces(
                regret=tr.g[:kept] if "regret" in want else None,
                z=tr.z[:kept] if "z" in want else None,
                values=[tr.values.get(t) for t in range(kept)] if "values" in want else None,
                entropy=[topk_entropy(lp, vocab_size) for lp in self.topk[:kept]]
                if "entropy" in want
                else None,
            )
        trajectory = Trajectory(
            prompt_index=spec.prompt_index,
            sample_index=spec.sample_index,
            token_ids=token_ids,
            logprobs=self.logprobs[:kept],
            end_reason=end_reason,
            stop_step=self.stop_step,
            reward=reward,
            shadow_stop_step=self.shadow_stop_step,
            policy_version=spec.policy_version,
            discarded_tokens=full_length - kept,
            critic_error=self.critic_errors > 0,
            critic_version=self.critic_version,
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
            critic_tokens=self.critic_tokens,
            critic_prefix_tokens=self.critic_prefix_tokens,
        )
