"""Running a call: its samples, its groups, its early return, its answer.

    CallPlan --Calls.stream()--> a Sample per sample (sample.py), in groups of n (runs.Group)
             --> events as samples end (events.py) --> the batch folded in (fold.py) --> CallDone

A call holds the engine's gate (a weight push waits for it), takes over the groups its run carries,
starts its own, and yields a trajectory as each sample ends (with `return_groups`: whole groups as
they complete) and a GroupEvent per complete group; a plan with `token_events` also gets the final
tokens of its own samples as they come (TokenDelta: up to each sample's `safe_length`). It ends
when its groups are complete, at the `return_groups` target, at its deadline, or when a shutdown
cuts it; groups not complete then are aborted, or carried for the run's next call. A call that
fails or is cancelled folds nothing and gives back what it took. A retry with a known request_id
replays the first call's answer (or waits for it), never a second batch of samples (idempotency.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from espo_client.protocol import Carried, GroupEvent, RolloutResponse, Trajectory, TrajectoryEvent, Usage
from espo_client.stop_rule import StopRule, update_state

from . import fold, metrics
from .admission import Admission
from .config import ServerConfig
from .engine import Engine
from .errors import ServiceError, ShuttingDown
from .events import CallDone, CallEvent, TokenDelta, replay
from .idempotency import CallEnded, IdempotencyCache
from .ledger import StateLedger
from .plan import CallPlan, Planner, TextCodec
from .runs import Group, Run, RunRegistry
from .sample import CriticAccess, Sample, SampleSpec


class Calls:
    """Runs the calls the planner has planned."""

    def __init__(
        self,
        engine: Engine,
        config: ServerConfig,
        *,
        planner: Planner,
        critic: CriticAccess | None,
        text: TextCodec,
        ledger: StateLedger,
        runs: RunRegistry,
        idempotency: IdempotencyCache,
        admission: Admission,
        publish: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.config = config
        self.planner = planner
        self.critic = critic
        self.text = text
        self.ledger = ledger
        self.runs = runs
        self.idempotency = idempotency
        self.admission = admission
        self.publish = publish
        """Called when the server-owned state changed (its metrics)."""

    async def stream(self, plan: CallPlan) -> AsyncIterator[CallEvent]:
        """The call's events (events.py), its answer last. A known request_id replays its answer,
        waiting for it if the first call is still running."""
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
                token_events, plan = plan.token_events, self.planner.plan(request)
                plan.token_events = token_events
            else:
                for event in replay(known):
                    yield event
                return
            if plan.known is not None:  # another retry got there first
                async for event in self.stream(plan):
                    yield event
                return
        self.idempotency.begin(request)
        with self.admission.call() as cut:
            plan.cut = cut
            try:
                async with contextlib.aclosing(self._run(plan)) as events:
                    async for event in events:
                        yield event
            except BaseException as exc:
                # However the call ended before its answer (cancelled while it waited for a weight
                # push, a run or batch taken meanwhile, ...), its retries must not wait for it forever.
                self.idempotency.fail(request, exc)
                raise

    async def _run(self, plan: CallPlan) -> AsyncIterator[CallEvent]:
        """`stream` of a call that runs (not a replay)."""
        request = plan.request
        async with self.engine.gate.shared():
            run = self._begin(plan)
            carried = run.groups if run else []
            for group in carried:  # their next tokens belong to this batch
                for sample in group.samples:
                    sample.rebase(plan.state)
                group.take_over()
            new = [self._start_group(plan, p) for p in range(len(plan.prompt_ids))]
            groups = new + carried
            target = request.return_groups or len(groups)
            by_group = request.return_groups is not None
            complete: list[Group] = []
            kept: list[Group] = list(carried)  # what the run keeps if this call fails
            folded = False
            try:
                unseen = {id(g): len(g.samples) for g in groups}  # samples of each group not seen ending
                streamed: set[int] = set()  # samples already yielded one by one (not by group)
                deadline = plan.deadline(self.config.max_call_seconds)
                tokens = _TokenFeed([s for g in new for s in g.samples]) if plan.token_events else None
                if target > 0:  # closed at once on break, so that its callbacks go with it
                    async with contextlib.aclosing(_endings(groups, deadline, plan.cut, tokens)) as endings:
                        async for ending in endings:
                            if ending is None:  # samples made progress: their new final tokens
                                for delta in tokens.deltas() if tokens else ():
                                    yield delta
                                continue
                            group, sample = ending
                            if tokens is not None:
                                tokens.forget(sample)
                            if not by_group:
                                streamed.add(id(sample))
                                yield self._event(plan, group, sample)
                            unseen[id(group)] -= 1
                            if not unseen[id(group)]:
                                complete.append(group)
                                if by_group:
                                    for member in group.samples:
                                        yield self._event(plan, group, member)
                                yield _group_event(plan, group)
                                if len(complete) >= target:
                                    break
                leftovers = [g for g in groups if g not in complete]
                aborted: list[Group] = []
                if request.leftover != "abort" and run is not None:
                    kept = leftovers
                    if request.leftover == "hold":
                        await asyncio.gather(*(group.hold() for group in kept))
                else:
                    kept, aborted = [], leftovers
                    samples = [s for g in leftovers for s in g.samples]
                    await asyncio.gather(*(s.abort() for s in samples))
                    await asyncio.gather(*(s.task for s in samples if s.task is not None))
                    for group in aborted:  # a group cut short: its samples not yet sent, once
                        for sample in group.samples:
                            if id(sample) not in streamed:
                                yield self._event(plan, group, sample)
                plan.deadline_hit = len(complete) < target
                response = self._finish(plan, complete, aborted, kept)
                folded = True
                self.idempotency.finish(request, response)
                metrics.REQUESTS.labels(outcome="ok").inc()
                yield CallDone(response)
            except BaseException as exc:
                if folded:  # answered (a stream closed during its done line): the run keeps its groups
                    raise
                kept = list(carried)
                await self._abandon(plan, new, exc)
                raise
            finally:
                if run is not None:
                    self.runs.release(run, kept)
                metrics.REQUEST_LATENCY.observe(time.perf_counter() - plan.started)

    def _begin(self, plan: CallPlan) -> Run | None:
        """The call starts: it takes its run's carried groups, and reads the state it runs with."""
        request = plan.request
        run = self.runs.claim(request.run_id) if request.run_id else None
        plan.policy_version = self.engine.policy_version
        try:
            plan.state = request.state
            if plan.state is None:
                plan.state = self.ledger.begin(request.batch_id, plan.params)
        except BaseException:  # a batch began meanwhile (409): the run keeps what it carried
            if run is not None:
                self.runs.release(run, run.groups)
            raise
        return run

    async def _abandon(self, plan: CallPlan, new: list[Group], exc: BaseException) -> None:
        """A call that failed or was cancelled before its answer: nothing is folded into the state.
        Its own samples are cancelled; the groups it took over from its run go back to it, those that
        completed meanwhile too (the call delivered nothing: a retry gets them)."""
        outcome = "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "error"
        metrics.REQUESTS.labels(outcome=outcome).inc()
        tasks = [s.task for g in new for s in g.samples if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.idempotency.fail(plan.request, exc)
        if plan.request.state is None:
            self.ledger.abandon(plan.request.batch_id)

    def _start_group(self, plan: CallPlan, prompt_index: int) -> Group:
        """The `n` samples of one prompt, started."""
        request = plan.request
        samples = []
        for sample_index in range(request.n):
            flat_index = prompt_index * request.n + sample_index
            sampling = plan.sampling(flat_index)
            spec = SampleSpec(
                engine_id=f"{plan.request_id}-{prompt_index}-{sample_index}",
                prompt_index=prompt_index,
                sample_index=sample_index,
                prompt_ids=plan.prompt_ids[prompt_index],
                sampling=sampling,
                generation=plan.generation_params(sampling, self.config.stream_interval),
                stop_rule=plan.rule,
                shadow=request.shadow,
                include=frozenset(request.include) - {"text"},  # decoded in _trajectory
                r_fail=plan.params.r_fail,
                score=plan.scorers[prompt_index],
            )
            tracker = plan.tracker(flat_index, self.config.critic_fallback)
            sample = Sample(spec, tracker, self.engine, self.critic)
            self.admission.sample_started(sample.start())
            samples.append(sample)
        return Group(plan.request_id, prompt_index, samples)

    def _trajectory(self, plan: CallPlan, group: Group, sample: Sample) -> Trajectory:
        """A finished sample's trajectory (decoded with `include: ["text"]`); one an earlier call
        started says where it came from."""
        assert sample.task is not None and sample.task.done()
        trajectory = sample.task.result().trajectory
        if "text" in plan.request.include and trajectory.text is None:
            trajectory.text = self.text.decode(trajectory.token_ids)
        if group.request_id == plan.request_id or trajectory.carried is not None:
            return trajectory
        spec = sample.spec
        origin = Carried(
            request_id=group.request_id,
            prompt_token_ids=spec.prompt_ids,
            stop_rule=spec.stop_rule,
            shadow=spec.shadow,
            **spec.sampling.model_dump(),
        )
        return trajectory.model_copy(update={"carried": origin})

    def _event(self, plan: CallPlan, group: Group, sample: Sample) -> TrajectoryEvent:
        return TrajectoryEvent(trajectory=self._trajectory(plan, group, sample))

    def _finish(
        self, plan: CallPlan, complete: list[Group], aborted: list[Group], kept: list[Group]
    ) -> RolloutResponse:
        """The answer, and the batch's statistics folded in (fold.py): those of every sample the
        call saw, those it returns and those the run keeps running."""
        request = plan.request
        assert plan.state is not None
        stats = fold.batch_stats(s.batch_share() for g in complete + aborted + kept for s in g.samples)
        returned = [
            fold.Returned(self._trajectory(plan, g, s), s.task.result(), len(s.spec.prompt_ids))
            for g in complete + aborted
            for s in g.samples
            if s.task is not None
        ]
        state_after = None
        if plan.learner_owned:
            state_after = update_state(plan.state, stats, plan.params)
        elif request.update_state:
            state_after = self.ledger.finish(request.batch_id, stats, plan.params)
            self.publish()
        usage = fold.usage(
            returned,
            stats,
            max_tokens=request.max_tokens,
            wall_time_s=time.perf_counter() - plan.started,
            groups_returned=len(complete),
            groups_carried=len(kept),
            deadline_hit=plan.deadline_hit,
        )
        response = fold.response(plan, returned, usage, state_after)
        _count(plan.rule, response.trajectories, usage)
        return response


class _TokenFeed:
    """The final tokens of a call's samples not yet sent (events.TokenDelta), and the signal that
    some may have come (`Sample.progress`)."""

    def __init__(self, samples: list[Sample]) -> None:
        self.sent = {id(s): 0 for s in samples}
        self.samples = {id(s): s for s in samples}
        self.progress = asyncio.Event()
        for sample in samples:
            sample.progress = self.progress.set

    def deltas(self) -> list[TokenDelta]:
        out = []
        for key, sent in self.sent.items():
            sample = self.samples[key]
            safe = sample.safe_length
            if safe <= sent:
                continue
            self.sent[key] = safe
            top_ids = sample.topk_ids[sent:safe] if "top_logprobs" in sample.spec.include else None
            top_lps = sample.topk[sent:safe] if "top_logprobs" in sample.spec.include else None
            spec = sample.spec
            ids, lps = sample.token_ids[sent:safe], sample.logprobs[sent:safe]
            out.append(TokenDelta(spec.prompt_index, spec.sample_index, sent, ids, lps, top_ids, top_lps))
        return out

    def forget(self, sample: Sample) -> None:
        """The sample ended: its trajectory carries the rest."""
        self.sent.pop(id(sample), None)
        sample.progress = None


async def _endings(
    groups: list[Group],
    deadline: float | None,
    cut: asyncio.Future[ServiceError | None] | None = None,
    tokens: _TokenFeed | None = None,
) -> AsyncIterator[tuple[Group, Sample] | None]:
    """(group, sample) as each sample ends; those that ended already come first. With `tokens`, None
    when samples made progress (new final tokens may be there). Ends early at `deadline`
    (time.monotonic); raises ShuttingDown once `cut` is done (or the error it holds).

    Linear in the number of samples: each task reports its end through a done-callback, and the
    wait is on one event, not on every pending task (that was quadratic over a call of 1,024)."""
    owner = {s.task: (g, s) for g in groups for s in g.samples if s.task is not None}
    ended: collections.deque[asyncio.Future] = collections.deque(t for t in owner if t.done())
    wake = asyncio.Event()

    def on_end(task: asyncio.Future) -> None:
        ended.append(task)
        wake.set()

    running = [t for t in owner if not t.done()]
    for task in running:
        task.add_done_callback(on_end)
    if cut is not None:
        cut.add_done_callback(on_end)  # not a task of `owner`: it only wakes the wait
    left = len(owner)
    woken: asyncio.Future | None = None
    progressed: asyncio.Future | None = None
    try:
        while left:
            if cut is not None and cut.done():
                raise cut.result() or ShuttingDown(
                    "this server is shutting down and ended the call before it was complete; nothing "
                    "of it was kept: retry with the same request_id (on another replica or after the "
                    "restart)"
                )
            if not ended:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                wake.clear()
                woken = woken or asyncio.ensure_future(wake.wait())
                waiting = {woken}
                if tokens is not None:
                    progressed = progressed or asyncio.ensure_future(tokens.progress.wait())
                    waiting.add(progressed)
                done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if woken in done:
                    woken = None
                if not done:
                    return  # the deadline
                if tokens is not None and progressed in done:
                    tokens.progress.clear()
                    progressed = None
                    yield None
            while ended:
                task = ended.popleft()
                if task in owner:
                    left -= 1
                    yield owner[task]
    finally:
        for task in (*running, cut):
            if task is not None:
                task.remove_done_callback(on_end)
        for waiter in (woken, progressed):
            if waiter is not None:
                waiter.cancel()


def _group_event(plan: CallPlan, group: Group) -> GroupEvent:
    carried_from = None if group.request_id == plan.request_id else group.request_id
    return GroupEvent(
        prompt_index=group.prompt_index, sample_count=len(group.samples), carried_from=carried_from
    )


def _count(rule: StopRule, trajectories: list[Trajectory], usage: Usage) -> None:
    for t in trajectories:
        metrics.TRAJECTORIES.labels(end_reason=t.end_reason, rule=rule.value).inc()
    metrics.GENERATED_TOKENS.labels(rule=rule.value).inc(usage.generated_tokens)
    metrics.DISCARDED_TOKENS.inc(usage.discarded_tokens)
    metrics.ENGINE_TOKENS.labels(rule=rule.value).inc(usage.engine_tokens)
    metrics.STOPPED.labels(rule=rule.value).inc(usage.stopped)
    metrics.SHADOW_STOPPED.labels(rule=rule.value).inc(usage.shadow_stopped)
    metrics.TOKENS_SAVED_ESTIMATE.inc(usage.tokens_saved_estimate)
    metrics.TOKENS_SAVED_UPPER_BOUND.inc(usage.tokens_saved_upper_bound)
    metrics.TOKENS_SAVED_SHADOW.inc(usage.tokens_saved_shadow)
