"""One sample: engine stream -> tracker -> critic race -> Trajectory.

Tokens stream in from vLLM; each goes through the stop rule's tracker. When the rule wants V(s_t),
the critic is asked *while generation goes on*; when the answer says stop, the engine request is
aborted and the trajectory is cut back to t+1 tokens (tokens generated while waiting are discarded
and counted). If the stream ends while a query is pending, the decision for step t still applies.
What the sample measured becomes its Trajectory in trajectory.py (end reason, reward, traces).

A `Sample` can outlive the call that started it (a carried-over sample of a run) and be suspended
for a weight push: its engine request is aborted, its tokens, logprobs and tracker are kept, and
`resume()` continues it with a new engine request whose prompt is the prompt plus the tokens so
far. Each such segment records the policy version that sampled it (`policy_version_spans`).
Knows nothing of HTTP, of calls, or of the batch state it is judged with beyond its tracker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from espo_client.protocol import Sampling, Trajectory
from espo_client.stop_rule import EspoState, StopRule, TrajectoryTracker

from . import metrics
from .critic import CriticError
from .critic_batcher import CriticBatcher
from .engine import Engine, GenerationParams, TokenChunk, sample_seed
from .stream_readers import cancel_was_only_ours
from .trajectory import end_reason, reward, trajectory_traces, version_spans

log = logging.getLogger(__name__)

Scorer = Callable[[list[int]], "float | None"]
"""Reward of an `eos` response from its token ids (the verifier), or None: the learner scores it."""


@dataclass(frozen=True)
class SampleSpec:
    """Everything one sample needs, fixed when its call starts."""

    engine_id: str
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    sampling: Sampling
    """The call's sampling settings, with this sample's seed (what a carried-over trajectory records)."""
    generation: GenerationParams
    """The same as the engine takes them."""
    shadow: bool
    include: frozenset[str]
    r_fail: float
    stop_rule: StopRule
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
    """Regret of the kept tokens not yet counted in an earlier batch (this batch's statistics)."""
    rule_stopped: bool
    """Stopped, or would have been in shadow mode."""
    steers_beta: bool
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


class Sample:
    """One sample from its first token to its end, across engine requests (segments)."""

    def __init__(
        self,
        spec: SampleSpec,
        tracker: TrajectoryTracker,
        engine: Engine,
        critic: CriticAccess | None,
    ) -> None:
        self.spec = spec
        self.tracker = tracker
        self.engine = engine
        self.critic = critic
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.topk: list[list[float]] = []
        self.topk_ids: list[list[int]] = []
        self.finish_reason: str | None = None
        self.stop_step: int | None = None
        self.shadow_stop_step: int | None = None
        self.critic_calls = 0
        self.critic_errors = 0
        self.critic_time_s = 0.0
        self.spans: list[tuple[int, int]] = []
        """(first token index, policy version) of each segment."""
        self.counted = 0
        """Tokens whose regret an earlier batch already took (`take_batch_regret`)."""
        self.accounted = False
        """The finished trajectory has been folded into a batch (`batch_share`)."""
        self.task: asyncio.Task[SampleResult] | None = None
        self.critic_tokens = 0
        self.critic_prefix_tokens = 0
        self.critic_version: int | None = None
        self._query: asyncio.Task[float | None] | None = None
        self._query_t: int | None = None
        self._reading = False
        """Waiting for the engine's next chunk (a critic answer that stops may interrupt it)."""
        self._streaming = False
        """Reading a stream: its chunks time the critic batch this sample opens (`window_steps`)."""
        self._cut_by_answer = False
        self._engine_id: str | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._parked = asyncio.Event()
        self._segments = 0
        self._aborting = False
        self._started = time.perf_counter()
        self.progress: Callable[[], None] | None = None
        """Called when `safe_length` may have grown (set by a call that streams tokens)."""

    # ------------------------------------------------------------------ life cycle

    def start(self) -> asyncio.Task[SampleResult]:
        self.task = asyncio.create_task(self._run(), name=self.spec.engine_id)
        return self.task

    async def suspend(self) -> None:
        """Stop generating (abort the engine request, keep everything) until `resume()`; returns once
        every token received so far is accounted for."""
        if self.task is None or self.task.done():
            return
        self._running.clear()
        if self._engine_id is not None:
            await self.engine.abort(self._engine_id)
        parked = asyncio.ensure_future(self._parked.wait())
        await asyncio.wait({self.task, parked}, return_when=asyncio.FIRST_COMPLETED)
        parked.cancel()

    def resume(self) -> None:
        """Continue a suspended sample with a new engine request (under the weights now served)."""
        self._parked.clear()
        self._running.set()

    async def abort(self) -> None:
        """End the sample now: it returns an `abort` trajectory with the tokens it has."""
        if self.task is None or self.task.done():
            return
        self._aborting = True
        self._running.set()
        if self._engine_id is not None:
            await self.engine.abort(self._engine_id)

    def rebase(self, state: EspoState) -> None:
        """A new batch began: judge this sample's next tokens with its frozen state."""
        self.tracker.rebase(state)

    def batch_share(self) -> tuple[list[float], bool | None]:
        """What this sample adds to the batch that ends now: the regret of its tokens no batch has
        counted yet, and, once it has ended, whether the rule stopped it (the stop rate; None: not
        counted there, as an aborted sample or a rule that does not steer beta)."""
        if self.task is None or not self.task.done():
            return self.take_batch_regret(), None
        if self.accounted:
            return [], None
        self.accounted = True
        result = self.task.result()
        ended = result.trajectory.end_reason != "abort" and result.steers_beta
        return result.g, (result.rule_stopped if ended else None)

    def take_batch_regret(self) -> list[float]:
        """The regret of the tokens generated since the last call, for a batch that ends while this
        sample runs on. Tokens after a step whose critic decision is pending may still be discarded,
        so they are left for the next batch."""
        safe = len(self.tracker.g) if self.tracker.pending is None else self.tracker.pending + 1
        if self.stop_step is not None:
            safe = min(safe, self.stop_step + 1)
        g = self.tracker.g[self.counted : max(self.counted, safe)]
        self.counted = max(self.counted, safe)
        return g

    @property
    def safe_length(self) -> int:
        """How many tokens so far are final: they stay in the trajectory, at their positions, whatever
        happens next. A critic query pending for step t may still cut back to t+1 tokens (a decided
        stop keeps t+1); in shadow mode, or with no query pending, nothing can be cut."""
        if self.stop_step is not None:
            return self.stop_step + 1
        if self._query is not None and self._query_t is not None and not self.spec.shadow:
            return self._query_t + 1
        return len(self.token_ids)

    def _progressed(self) -> None:
        if self.progress is not None:
            self.progress()

    # ------------------------------------------------------------------ generation

    async def _run(self) -> SampleResult:
        metrics.INFLIGHT.inc()
        reward = None
        try:
            while True:
                if not self._running.is_set():  # suspended: wait for resume()
                    self._parked.set()
                    await self._running.wait()
                if self._aborting:
                    break
                await self._segment()
                done = self.stop_step is not None or self.finish_reason not in (None, "abort")
                if done or self._aborting or self._running.is_set():
                    break  # finished, aborted by us, or aborted by the engine (not a suspension)
                self.finish_reason = None
            ended_by_model = self.stop_step is None and self.finish_reason == "stop" and not self._aborting
            if ended_by_model and self.spec.score is not None:  # the verifier, off the event loop
                reward = await asyncio.to_thread(self.spec.score, self.token_ids)
        finally:
            metrics.INFLIGHT.dec()
        result = self._result(reward)
        result.lifetime_s = time.perf_counter() - self._started
        return result

    async def _segment(self) -> None:
        """One engine request: from the tokens so far to the end, a stop, or an abort."""
        spec, k = self.spec, self._segments
        self._segments += 1
        done = len(self.token_ids)
        params = spec.generation
        if k:  # a continuation: the rest of the budget, under a seed of its own
            seed = None if params.seed is None else sample_seed(params.seed, 7919 * k)
            params = dataclasses.replace(
                params,
                max_tokens=params.max_tokens - done,
                min_tokens=max(0, params.min_tokens - done),
                seed=seed,
            )
            if params.max_tokens <= 0:
                self.finish_reason = "length"
                return
        self._engine_id = spec.engine_id if not k else f"{spec.engine_id}-r{k}"
        self.spans.append((done, self.engine.policy_version))
        stream = self.engine.generate(self._engine_id, spec.prompt_ids + self.token_ids, params)
        try:
            await self._generate(stream)
        finally:
            self._engine_id = None

    async def _generate(self, stream: AsyncIterator[TokenChunk]) -> None:
        """Read the engine's stream to its end, a stop, an abort or a suspension. The stream is read
        inline, with no task or wait per chunk: a critic answer is folded in by its query's
        done-callback (`_answered`) as it comes, and one that stops interrupts the read."""
        batcher = self.critic.client if self.critic is not None else None
        self._streaming = True
        try:
            while self.stop_step is None:
                self._reading = True
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if self._cut_by_answer and cancel_was_only_ours(asyncio.current_task()):
                        break  # the critic's answer stopped the sample: not a cancellation
                    raise
                finally:
                    self._reading = False
                if self._query is not None and self._query.done():
                    self._resolve_query()  # answered before this chunk (its callback has not run)
                    if self.stop_step is not None:
                        break
                if self._query is not None and batcher is not None:
                    batcher.stepped(self, len(chunk.token_ids))
                self._feed(chunk)
                if chunk.finish_reason is not None:
                    self.finish_reason = chunk.finish_reason
                    break
                if self._aborting or not self._running.is_set():
                    break  # abort() or suspend(): stop reading; closing the stream aborts the request
            self._stop_streaming(batcher)
            if self._query is not None and self.stop_step is None and not self._aborting:
                # The stream ended while the critic was thinking: the decision for step t still holds.
                await asyncio.wait({self._query})
                if self._query is not None:  # its callback may have folded it in already
                    self._resolve_query()
        finally:
            self._stop_streaming(batcher)
            if self._query is not None:
                self._query.cancel()
                await asyncio.gather(self._query, return_exceptions=True)
                self._query = None
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]  # aborts the engine request if unfinished

    def _stop_streaming(self, batcher: CriticBatcher | None) -> None:
        """No more steps of ours (before waiting on a pending query, or on the way out): a critic
        batch this sample opened goes now."""
        self._streaming = False
        if batcher is not None:
            batcher.left(self)

    def _answered(self, query: asyncio.Task[float | None]) -> None:
        """The query's done-callback: fold its answer in now; if it stops the sample while the
        stream is being read, interrupt the read (the stream is closed, which aborts the request)."""
        if query is not self._query or query.cancelled() or query.exception() is not None:
            return  # already folded in by the reader, or cancelled; an error is the reader's to raise
        self._resolve_query()
        if self.stop_step is not None and self._reading and self.task is not None:
            self._cut_by_answer = True
            self.task.cancel()

    def _feed(self, chunk: TokenChunk) -> None:
        for i, token_id in enumerate(chunk.token_ids):
            self.token_ids.append(token_id)
            self.logprobs.append(chunk.logprobs[i])
            if chunk.topk_logprobs:
                self.topk.append(chunk.topk_logprobs[i])
            if chunk.topk_token_ids:
                self.topk_ids.append(chunk.topk_token_ids[i])
            if self.stop_step is not None:
                continue  # past a stop inside a chunk (stream_interval > 1): generated, discarded, counted
            decision = self.tracker.step(chunk.logprobs[i], chunk.top_logprobs[i])
            t = self.tracker.t
            if decision.stop:
                self._decided(t)
            elif decision.query_value:
                self._query_t = t
                # the prefix's one copy: the batcher and the in-process critic pass this list on as is
                self._query = asyncio.create_task(self._value(self.spec.prompt_ids + self.token_ids[:t]))
                self._query.add_done_callback(self._answered)
        self._progressed()

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
        self._progressed()

    async def _value(self, prefix: list[int]) -> float | None:
        critic = self.critic
        assert critic is not None, "a rule that asks for V(s_t) runs only with a critic"
        self.critic_calls += 1
        started = time.perf_counter()
        try:
            answer = await critic.client.value(prefix, self if self._streaming else None)
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

    # ------------------------------------------------------------------ the trajectory

    def _result(self, score: float | None) -> SampleResult:
        spec = self.spec
        full_length = len(self.token_ids)
        kept = full_length if self.stop_step is None else self.stop_step + 1
        end = end_reason(self.stop_step, self.finish_reason, self._aborting)
        token_ids = self.token_ids[:kept]
        traces = None
        if spec.include:
            vocab = self.engine.vocab_size
            traces = trajectory_traces(
                spec.include, self.tracker, kept, topk=self.topk, topk_ids=self.topk_ids, vocab_size=vocab
            )
        spans = version_spans(self.spans, kept)
        trajectory = Trajectory(
            prompt_index=spec.prompt_index,
            sample_index=spec.sample_index,
            token_ids=token_ids,
            logprobs=self.logprobs[:kept],
            end_reason=end,
            stop_step=self.stop_step,
            reward=reward(end, spec.r_fail, score),
            shadow_stop_step=self.shadow_stop_step,
            policy_version=min((s.version for s in spans), default=self.engine.policy_version),
            policy_version_spans=spans,
            discarded_tokens=full_length - kept,
            critic_error=self.critic_errors > 0,
            critic_version=self.critic_version,
            traces=traces,
        )
        g = self.tracker.g[min(self.counted, kept) : kept]
        self.counted = max(self.counted, kept)
        return SampleResult(
            trajectory=trajectory,
            g=g,
            rule_stopped=self.stop_step is not None or self.shadow_stop_step is not None,
            steers_beta=spec.stop_rule.steers_beta,
            full_length=full_length,
            critic_calls=self.critic_calls,
            critic_errors=self.critic_errors,
            critic_time_s=self.critic_time_s,
            critic_tokens=self.critic_tokens,
            critic_prefix_tokens=self.critic_prefix_tokens,
        )
