"""The rollout service: a call is validated, its samples run, its batch is folded in.

    request --plan()--> CallPlan --stream()--> Sample.start() per sample --> trajectories --> _finish()
                                                 (sample.py)                  usage, state_after

`RolloutService` is the serving layer between the transports (HTTP routes in app.py) and the
engines. It knows nothing of HTTP: it raises `errors.InvalidRequest` for the caller's mistakes and
returns protocol models. Besides calls it holds the server-owned ESPO state (`ledger`), the
idempotency cache of finished calls, and weight reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from espo_client.protocol import (
    Carried,
    CriticWeightsResponse,
    GroupEvent,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    RunRequest,
    RunResponse,
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
from .critic import CriticBatcher, CriticClient, CriticError, InProcessCritic, counted_critic_load
from .engine import ENGINE_DEAD_MESSAGE, GenerationParams, PolicyEngine, sample_seed
from .errors import Conflict, EngineDead, InvalidRequest, Overloaded, ShuttingDown, WeightsBroken
from .idempotency import CallEnded, IdempotencyCache
from .ledger import StateLedger
from .runs import Group, RunRegistry
from .sample import CriticAccess, Sample, SampleResult, SampleSpec, Scorer
from .weights import allowed_weights_dir, check_checkpoint

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
    started_monotonic: float = field(default_factory=time.monotonic)
    deadline_hit: bool = False
    known: RolloutResponse | asyncio.Future[RolloutResponse] | None = None
    """A retry: the first call's answer, or the future of the first call still running."""
    cut: asyncio.Future[None] | None = None
    """Done when a shutdown ends the call before it is complete (`RolloutService.cut_calls`)."""

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
            seed=None if request.seed is None else sample_seed(request.seed, flat_index),
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=request.ignore_eos,
            top_k_logprobs=self.top_k_logprobs,
            top_ids="top_logprobs" in request.include,
            stop=tuple(request.stop or ()),
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
        self.runs = RunRegistry(config.run_idle_timeout_s)
        self.inflight = 0
        """Samples generating now (all calls, and the samples runs carry), for backpressure."""
        self.idempotency = IdempotencyCache(
            config.idempotency_cache, int(config.idempotency_cache_mb * 2**20), config.idempotency_ttl_s
        )
        self._critic_access = CriticAccess(self.critic_batcher, config.critic_fallback) if critic else None
        self.draining = False
        """Set by `drain` (SIGTERM): no new work is taken; running calls may finish."""
        self.calls = 0
        """Calls running now (replays and waiting retries aside)."""
        self._cuts: set[asyncio.Future[None]] = set()
        self._publish_state()

    async def aclose(self) -> None:
        """Shutdown: the runs' carried samples are aborted (calls are cancelled by their transports),
        then the critic batches still in flight stop."""
        await self.runs.aclose()
        if self.critic_batcher is not None:
            await self.critic_batcher.aclose()

    # ------------------------------------------------------------------ engine death, shutdown

    def check_alive(self) -> None:
        """EngineDead (503) once the policy engine's process is gone: every /v1 call says so until
        the server has exited (serve.py watches for it)."""
        if self.engine.dead:
            raise EngineDead(ENGINE_DEAD_MESSAGE)

    def _check_weights(self) -> None:
        """WeightsBroken (503) while a failed push and its failed roll-back left the weights half-loaded."""
        if self.engine.broken is not None:
            raise WeightsBroken(self.engine.broken)

    def _check_new_work(self) -> None:
        """New work (a call, a weight push, a run) is refused while draining, or with a dead engine."""
        self.check_alive()
        if self.draining:
            raise ShuttingDown(
                "this server is shutting down (SIGTERM) and takes no new work: retry on another "
                "replica or after the restart, with the same request_id"
            )

    async def drain(self, grace_s: float) -> int:
        """SIGTERM: take no new work (503 shutting_down, with Retry-After) and give the running calls
        `grace_s` seconds to finish and be answered. Calls still running then are cut: answered
        with that 503, nothing of them folded into the ESPO state, so that a retry with the same
        request_id runs them again. Returns once no call runs; the number of calls cut."""
        self.draining = True
        log.info("draining: %d call(s) running, %.0fs to finish", self.calls, grace_s)
        deadline = time.monotonic() + grace_s
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.calls
        if cut:
            log.warning("drain: %d call(s) still running after %.0fs: ended with 503", cut, grace_s)
            self.cut_calls()
            deadline = time.monotonic() + 10.0
            while self.calls and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return cut

    def cut_calls(self) -> None:
        """End every running call now with ShuttingDown (the end of a drain, or a second SIGTERM)."""
        self.draining = True
        for cut in self._cuts:
            if not cut.done():
                cut.set_result(None)

    # ------------------------------------------------------------------ validation

    def plan(self, request: RolloutRequest) -> CallPlan:
        """Check a request against the model and limits; raise InvalidRequest naming the field.
        No side effects: the state is read when the call starts (`stream`)."""
        known = self.idempotency.lookup(request)
        if known is not None:  # a retry: replayed (or waited for) by `stream`, not validated again
            # The prompts' ids still: the OpenAI routes build their choices and usage from them.
            prompt_ids = [
                list(p.token_ids) if p.token_ids is not None else self.encode_text(p.text or "")
                for p in request.prompts
            ]
            return CallPlan(
                request,
                request.request_id or "",
                prompt_ids,
                [None] * len(prompt_ids),
                StopRule.NONE,
                self.rule_defaults,
                1,
                known=known,
            )
        self._check_new_work()
        self._check_weights()
        cfg, engine = self.config, self.engine
        if request.batch_id is not None:
            if request.state is not None:
                message = "batch_id groups calls of the server-owned state; with state= the learner owns it"
                raise InvalidRequest(message, "batch_id")
            if not request.update_state:
                raise InvalidRequest(
                    "a call with update_state=false folds nothing: it has no batch_id", "batch_id"
                )
            self.ledger.check_begin(request.batch_id)
        carried_groups, carried_samples = self._check_run(request)
        if not request.prompts and not carried_groups:
            raise InvalidRequest("prompts must not be empty (unless run_id carries groups over)", "prompts")
        groups = len(request.prompts) + carried_groups
        if request.return_groups is not None and request.return_groups > groups:
            raise InvalidRequest(
                f"return_groups={request.return_groups} exceeds the {len(request.prompts)} prompt groups "
                f"of this call plus the {carried_groups} carried over",
                "return_groups",
            )
        if request.n > cfg.max_n:
            raise InvalidRequest(f"n={request.n} exceeds this server's max_n={cfg.max_n}", "n")
        if len(request.prompts) > cfg.max_prompts:
            raise InvalidRequest(
                f"{len(request.prompts)} prompts exceed max_prompts={cfg.max_prompts}", "prompts"
            )
        wanted = request.n * len(request.prompts)
        if wanted > cfg.max_inflight_trajectories:  # a 429 would be retried forever: it can never fit
            raise InvalidRequest(
                f"{len(request.prompts)} prompts x n={request.n} exceed this server's "
                f"max_inflight_trajectories={cfg.max_inflight_trajectories}: split the call",
                "n",
            )
        if self.inflight + wanted > cfg.max_inflight_trajectories:
            raise Overloaded(
                f"{self.inflight} trajectories are generating; {wanted} more would exceed "
                f"max_inflight_trajectories={cfg.max_inflight_trajectories}: retry later",
                retry_after_s=2.0,
            )
        if request.n * len(request.prompts) + carried_samples > cfg.max_trajectories:
            carried = f" (plus {carried_samples} carried over by the run)" if carried_samples else ""
            raise InvalidRequest(
                f"{len(request.prompts)} prompts x n={request.n}{carried} exceed "
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
        if "top_logprobs" in request.include:  # one k serves both: the larger
            top_k = max(top_k, request.top_logprobs or request.entropy_top_k or cfg.entropy_top_k)
        return CallPlan(
            request=request,
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            prompt_texts=prompt_texts,
            rule=rule,
            params=params,
            top_k_logprobs=top_k,
        )

    def _check_run(self, request: RolloutRequest) -> tuple[int, int]:
        """The run's carried (groups, samples); 400 for an unknown or closed run, 409 for a busy one."""
        if request.run_id is None:
            if request.leftover == "carry":
                raise InvalidRequest("leftover=carry needs a run_id (POST /v1/runs opens one)", "run_id")
            return 0, 0
        run = self.runs.get(request.run_id)
        if run.busy:
            raise Conflict(f"run {request.run_id!r} already has a call in progress", "run_id")
        return len(run.groups), len(run.samples())

    def encode_text(self, text: str) -> list[int]:
        return list(self.engine.tokenizer.encode(text))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens skipped (what `include: ["text"]` returns)."""
        return self._decode(ids)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token id decoded on its own (special tokens kept): the `tokens` of OpenAI logprobs."""
        tokenizer = self.engine.tokenizer
        return [tokenizer.decode([token]) for token in ids]

    # ------------------------------------------------------------------ calls

    async def rollouts(self, request: RolloutRequest) -> RolloutResponse:
        """Run a whole call and return every trajectory. A retry with a known request_id gets the
        first call's answer (or waits for it), never a second batch of samples."""
        response = None
        async for item in self.stream(self.plan(request)):
            if isinstance(item, RolloutResponse):
                response = item
        assert response is not None
        return response

    async def stream(self, plan: CallPlan) -> AsyncIterator[Trajectory | GroupEvent | RolloutResponse]:
        """Yield trajectories as they finish and a GroupEvent as each prompt group completes, then the
        whole RolloutResponse. With `return_groups`, a group's trajectories are yielded together when
        the group completes (an incomplete group may be carried over: nothing is sent twice), and the
        call ends once that many groups are complete. A known request_id replays its answer
        (idempotency.py), waiting for it if the first call is still running."""
        request = plan.request
        if plan.known is None and request.request_id is not None:
            # A streamed call is planned by its route and started later: a twin may have begun since.
            plan.known = self.idempotency.lookup(request)
        if plan.known is not None:
            try:
                known = (
                    plan.known
                    if isinstance(plan.known, RolloutResponse)
                    else await asyncio.shield(plan.known)
                )
            except CallEnded:  # the first call was cancelled or failed and folded nothing: run it now
                plan = self.plan(request)
            else:
                for item in _replay(known):
                    yield item
                return
            if plan.known is not None:  # another retry got there first
                async for item in self.stream(plan):
                    yield item
                return
        self.idempotency.begin(request)
        plan.cut = asyncio.get_running_loop().create_future()
        self._cuts.add(plan.cut)
        self.calls += 1
        try:
            async with contextlib.aclosing(self._call(plan)) as items:
                async for item in items:
                    yield item
        except BaseException as exc:
            # However the call ended before its answer (cancelled while it waited for a weight push,
            # a run or batch taken meanwhile, ...), its retries must not wait for it forever.
            self.idempotency.fail(request, exc)
            raise
        finally:
            self.calls -= 1
            self._cuts.discard(plan.cut)

    async def _call(self, plan: CallPlan) -> AsyncIterator[Trajectory | GroupEvent | RolloutResponse]:
        """`stream` of a call that runs (not a replay)."""
        request = plan.request
        async with self.engine.gate.shared():
            run = self.runs.claim(request.run_id) if request.run_id else None
            plan.policy_version = self.engine.policy_version
            try:
                plan.state = (
                    request.state
                    if request.state is not None
                    else self.ledger.begin(request.batch_id, plan.params)
                )
            except BaseException:  # a batch began meanwhile (409): the run keeps what it carried
                if run is not None:
                    self.runs.release(run, run.groups)
                raise
            carried = run.groups if run else []
            for group in carried:  # their next tokens belong to this batch
                for sample in group.samples:
                    sample.rebase(plan.state)
            new = [self._start_group(plan, p) for p in range(len(plan.prompt_ids))]
            groups = new + carried
            target = request.return_groups or len(groups)
            by_group = request.return_groups is not None
            metrics.REQUESTS.labels(outcome="started").inc()
            complete: list[Group] = []
            kept: list[Group] = [g for g in carried]  # what the run keeps if this call fails
            folded = False
            try:
                unseen = {id(g): len(g.samples) for g in groups}  # samples of each group not seen ending
                streamed: set[int] = set()  # samples already yielded one by one (not by group)
                limits = [x for x in (request.deadline_s, self.config.max_call_seconds) if x is not None]
                deadline = plan.started_monotonic + min(limits) if limits else None
                if target > 0:
                    async for group, sample in _endings(groups, deadline, plan.cut):
                        if not by_group:
                            streamed.add(id(sample))
                            yield self._trajectory(plan, group, sample)
                        unseen[id(group)] -= 1
                        if not unseen[id(group)]:
                            complete.append(group)
                            if by_group:
                                for member in group.samples:
                                    yield self._trajectory(plan, group, member)
                            yield _group_event(plan, group)
                            if len(complete) >= target:
                                break
                leftovers = [g for g in groups if g not in complete]
                aborted: list[Group] = []
                if request.leftover == "carry" and run is not None:
                    kept = leftovers
                else:
                    kept, aborted = [], leftovers
                    samples = [s for g in leftovers for s in g.samples]
                    await asyncio.gather(*(s.abort() for s in samples))
                    await asyncio.gather(*(s.task for s in samples if s.task is not None))
                    for group in aborted:  # a group cut short: its samples not yet sent, once
                        for sample in group.samples:
                            if id(sample) not in streamed:
                                yield self._trajectory(plan, group, sample)
                plan.deadline_hit = len(complete) < target
                response = self._finish(plan, complete, aborted, kept)
                folded = True
                self.idempotency.finish(request, response)
                metrics.REQUESTS.labels(outcome="ok").inc()
                yield response
            except BaseException as exc:
                if folded:  # answered (a stream closed during its done line): the run keeps its groups
                    raise
                outcome = "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "error"
                metrics.REQUESTS.labels(outcome=outcome).inc()
                # Nothing is folded into the state: a failed or cancelled call leaves it as it was.
                # Its own samples are cancelled; the groups it took over from its run go back to it,
                # those that completed meanwhile too (the call delivered nothing: a retry gets them).
                kept = list(carried)
                tasks = [s.task for g in new for s in g.samples if s.task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.idempotency.fail(request, exc)
                if request.state is None and not folded:
                    self.ledger.abandon(request.batch_id)
                raise
            finally:
                if run is not None:
                    self.runs.release(run, kept)
                metrics.REQUEST_LATENCY.observe(time.perf_counter() - plan.started)

    def _start_group(self, plan: CallPlan, prompt_index: int) -> Group:
        """The `n` samples of one prompt, started."""
        request = plan.request
        samples = []
        for sample_index in range(request.n):
            flat_index = prompt_index * request.n + sample_index
            spec = SampleSpec(
                engine_id=f"{plan.request_id}-{prompt_index}-{sample_index}",
                prompt_index=prompt_index,
                sample_index=sample_index,
                prompt_ids=plan.prompt_ids[prompt_index],
                generation=replace(
                    plan.generation_params(flat_index), stream_interval=self.config.stream_interval
                ),
                stop_rule=plan.rule,
                shadow=request.shadow,
                include=frozenset(request.include) - {"text"},  # decoded in _trajectory
                r_fail=plan.params.r_fail,
                score=self._scorer(plan, prompt_index),
            )
            tracker = plan.tracker(flat_index, self.config.critic_fallback)
            sample = Sample(spec, tracker, self.engine, self._critic_access)
            self.inflight += 1
            sample.start().add_done_callback(self._sample_ended)
            samples.append(sample)
        return Group(plan.request_id, prompt_index, samples)

    def _sample_ended(self, _: asyncio.Task) -> None:
        self.inflight -= 1

    def _scorer(self, plan: CallPlan, prompt_index: int) -> Scorer | None:
        """The verifier's reward for eos responses of this prompt, if the server can score them."""
        answer = plan.request.prompts[prompt_index].answer
        text = plan.prompt_texts[prompt_index]
        verifier = self.verifier
        if verifier is None or answer is None or text is None:
            return None
        return lambda token_ids: float(verifier(text, self._decode(token_ids), answer))

    def _trajectory(self, plan: CallPlan, group: Group, sample: Sample) -> Trajectory:
        """A finished sample's trajectory (decoded with `include: ["text"]`); one an earlier call
        started says where it came from."""
        assert sample.task is not None and sample.task.done()
        trajectory = sample.task.result().trajectory
        if "text" in plan.request.include and trajectory.text is None:
            trajectory.text = self._decode(trajectory.token_ids)
        if group.request_id == plan.request_id or trajectory.carried is not None:
            return trajectory
        spec, gen = sample.spec, sample.spec.generation
        origin = Carried(
            request_id=group.request_id,
            prompt_token_ids=spec.prompt_ids,
            stop_rule=spec.stop_rule,
            shadow=spec.shadow,
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            seed=gen.seed,
            stop_token_ids=list(gen.stop_token_ids) or None,
            ignore_eos=gen.ignore_eos,
        )
        return trajectory.model_copy(update={"carried": origin})

    # ------------------------------------------------------------------ the end of a call

    def _finish(
        self, plan: CallPlan, complete: list[Group], aborted: list[Group], kept: list[Group]
    ) -> RolloutResponse:
        """The response, and the batch's statistics folded in. The batch holds every kept token a
        sample generated since a batch last took its tokens (docs/algorithm.md, "Carried over"), and
        the stop-rate count of each trajectory that ended since."""
        request = plan.request
        assert plan.state is not None
        stats = BatchStats()
        results: list[SampleResult] = []
        for group in complete + aborted + kept:
            for sample in group.samples:
                if sample.task is not None and sample.task.done():
                    result = sample.task.result()
                    if group not in kept:
                        results.append(result)
                    if not sample.accounted:
                        sample.accounted = True
                        ended = result.trajectory.end_reason != "abort" and result.steers_beta
                        stats.add_trajectory(result.g, result.rule_stopped if ended else None)
                else:
                    stats.add_trajectory(sample.take_batch_regret(), None)
        groups = {id(g): g for g in complete + aborted}
        trajectories = sorted(
            (self._trajectory(plan, g, s) for g in groups.values() for s in g.samples), key=_order
        )
        prompt_tokens = sum(len(s.spec.prompt_ids) for g in groups.values() for s in g.samples)

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
            prompt_tokens=prompt_tokens,
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
            groups_returned=len(complete),
            groups_carried=len(kept),
            carried_in=sum(t.carried is not None for t in trajectories),
            aborted=sum(t.end_reason == "abort" for t in trajectories),
            deadline_hit=plan.deadline_hit,
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
            run_id=request.run_id,
            prompt_token_ids=plan.prompt_ids if any(p.text is not None for p in request.prompts) else None,
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
        self.ledger.commit(batch_id)
        self._publish_state()
        return self.state()

    async def load_weights(self, path: str, version: int | None) -> WeightsResponse:
        """A push by path: `serve_weights` of a directory inside --weights-dir."""
        self._check_new_work()
        self._allowed_weights_dir(path)
        return await self.serve_weights(path, version)

    async def serve_weights(self, path: str | Path, version: int | None) -> WeightsResponse:
        """Reload the policy in place from a directory of this server's (--weights-dir, or an
        upload's staging) once the running calls have ended (new calls wait). Samples that runs
        carry between calls are suspended meanwhile and resume under the new weights."""
        self._check_new_work()
        path = str(path)
        directory = Path(path)
        try:
            usable = directory.is_dir() and any(directory.glob("*.safetensors"))
        except OSError:  # a name too long, a directory it may not read
            usable = False
        if not usable:
            raise InvalidRequest(f"{path} is not a directory with *.safetensors files on the server", "path")
        check_checkpoint(directory, self.engine.model)  # a broken checkpoint would take the engine down
        async with self.engine.gate.exclusive(), self._carried_suspended():
            new_version = self.engine.policy_version + 1 if version is None else version
            try:
                seconds = await self.engine.reload_weights(path, new_version)
            except Exception:
                metrics.WEIGHT_LOADS.labels(outcome="error").inc()
                raise
        metrics.WEIGHT_LOADS.labels(outcome="ok").inc()
        self._publish_state()
        return WeightsResponse(policy_version=new_version, load_time_s=round(seconds, 4))

    def _allowed_weights_dir(self, path: str) -> Path:
        return allowed_weights_dir(path, self.config.weights_dir)

    # ------------------------------------------------------------------ runs

    def open_run(self, body: RunRequest) -> RunResponse:
        self._check_new_work()
        return self.runs.open(body.run_id)

    def run(self, run_id: str) -> RunResponse:
        return self.runs.describe(run_id)

    async def close_run(self, run_id: str) -> RunResponse:
        return await self.runs.close(run_id)

    async def load_critic_weights(self, path: str, version: int | None) -> CriticWeightsResponse:
        """A critic push by path. An in-process critic loads only from --weights-dir; a remote
        critic (`espo-server critic`) gets the push forwarded and checks the directory itself."""
        critic = self._pushable_critic()
        if isinstance(critic, InProcessCritic):
            self._allowed_weights_dir(path)
        return await self.update_critic(lambda: critic.load_weights(path, version))

    async def update_critic(self, load: Callable[[], Awaitable[tuple[int, float]]]) -> CriticWeightsResponse:
        """Serve new critic weights, `load()` (which returns the version and the seconds it took):
        like a policy push, it waits for the running calls and holds new ones back, so every query
        of a call is judged by one critic version; the samples runs carry are suspended meanwhile."""
        self._pushable_critic()
        async with self.engine.gate.exclusive(), self._carried_suspended():
            new_version, seconds = await counted_critic_load(load())
        self._publish_state()
        return CriticWeightsResponse(critic_version=new_version, load_time_s=round(seconds, 4))

    def _pushable_critic(self) -> CriticClient:
        if self.critic is None:
            raise InvalidRequest("this server runs without a critic (--critic none): nothing to push", "path")
        return self.critic

    @contextlib.asynccontextmanager
    async def _carried_suspended(self) -> AsyncIterator[None]:
        """The samples runs carry in the background, paused for a weight push and resumed after it."""
        background = [s for s in self.runs.background() if s.task is not None and not s.task.done()]
        await asyncio.gather(*(sample.suspend() for sample in background))
        log.info("weight push: %d carried samples suspended", len(background))
        try:
            yield
        finally:
            for sample in background:
                sample.resume()

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
            max_num_seqs=engine.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens,
            max_trajectories=cfg.max_trajectories,
            run_idle_timeout_s=cfg.run_idle_timeout_s,
            critic_version=getattr(self.critic, "version", None),
        )

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Whether the server can serve rollouts now, and the health of each part. Readiness follows
        the policy engine: a critic that is down is reported, but the server still serves (its
        queries follow `critic_fallback`, flagged on the trajectories)."""
        detail: dict[str, str] = {}
        try:
            await self.engine.check_health()
            detail["engine"] = "ok" if self.engine.broken is None else f"weights broken: {self.engine.broken}"
        except Exception as exc:
            detail["engine"] = f"down: {exc!r}"
        if self.critic is not None:
            try:
                await self.critic.check()
                detail["critic"] = "ok"
            except CriticError as exc:
                detail["critic"] = f"down: {exc} (serving with critic_fallback={self.config.critic_fallback})"
        if self.draining:
            detail["server"] = "shutting down (SIGTERM): draining the running calls"
        return detail["engine"] == "ok" and not self.draining, detail


async def _endings(
    groups: list[Group], deadline: float | None, cut: asyncio.Future[None] | None = None
) -> AsyncIterator[tuple[Group, Sample]]:
    """(group, sample) as each sample ends; those that ended already come first. Ends early at
    `deadline` (time.monotonic); raises ShuttingDown once `cut` is done."""
    pending = {s.task: (g, s) for g in groups for s in g.samples if s.task is not None}
    ready = [task for task in pending if task.done()]
    while pending:
        if not ready:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            waiting = set(pending) if cut is None else {*pending, cut}
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if cut is not None and cut.done():
                raise ShuttingDown(
                    "this server is shutting down and ended the call before it was complete; nothing "
                    "of it was kept: retry with the same request_id (on another replica or after the restart)"
                )
            if not done:
                return  # the deadline
            ready = list(done)
        for task in ready:
            yield pending.pop(task)
        ready = []


def _order(trajectory: Trajectory) -> tuple:
    """This call's groups in prompt order, then carried-over ones by the call that started them."""
    origin = trajectory.carried.request_id if trajectory.carried else ""
    return (trajectory.carried is not None, origin, trajectory.prompt_index, trajectory.sample_index)


def _group_event(plan: CallPlan, group: Group) -> GroupEvent:
    carried_from = None if group.request_id == plan.request_id else group.request_id
    return GroupEvent(
        prompt_index=group.prompt_index, sample_count=len(group.samples), carried_from=carried_from
    )


def _replay(response: RolloutResponse) -> Iterator[Trajectory | GroupEvent | RolloutResponse]:
    """A finished call's answer again, as its stream sent it: trajectories, group events, the end."""
    groups: dict[tuple[str, int], list[Trajectory]] = {}
    for trajectory in response.trajectories:
        origin = trajectory.carried.request_id if trajectory.carried else response.request_id
        groups.setdefault((origin, trajectory.prompt_index), []).append(trajectory)
    for (origin, prompt_index), members in groups.items():
        yield from members
        if all(t.end_reason != "abort" for t in members):
            carried_from = None if origin == response.request_id else origin
            yield GroupEvent(prompt_index=prompt_index, sample_count=len(members), carried_from=carried_from)
    yield response
