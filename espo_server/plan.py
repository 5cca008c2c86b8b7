"""Request -> CallPlan: a call checked against the model and the server's limits, before it runs.

`Planner.plan` raises `errors.InvalidRequest` naming the field for the caller's mistakes (and 409,
429, 503 where the server's state says no) and has no side effects: the ESPO state is read when the
call starts (call.py). A retry with a known request_id is planned as a replay of the first call's
answer (idempotency.py), not validated again. `TextCodec` is the tokenizer as the service uses it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from espo_client.protocol import RolloutRequest, RolloutResponse, Sampling
from espo_client.stop_rule import (
    EspoParams,
    EspoState,
    ParameterError,
    StopRule,
    TrajectoryTracker,
    draw_random_stop,
    make_tracker,
)

from .admission import Admission
from .config import ServerConfig
from .engine import Engine, GenerationParams, sample_seed
from .errors import Conflict, InvalidRequest, ServiceError
from .idempotency import IdempotencyCache
from .ledger import StateLedger
from .runs import RunRegistry
from .sample import Scorer

Verifier = Callable[[str, str, str], float]
"""(prompt text, response text, expected answer) -> reward."""


class TextCodec:
    """Text <-> token ids with the policy's tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens skipped (what `include: ["text"]` returns)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token id decoded on its own (special tokens kept): the `tokens` of OpenAI logprobs."""
        return [self.tokenizer.decode([token]) for token in ids]


@dataclass
class CallPlan:
    """A validated request: what every sample of the call shares."""

    request: RolloutRequest
    request_id: str
    prompt_ids: list[list[int]]
    rule: StopRule
    params: EspoParams
    top_k_logprobs: int
    scorers: list[Scorer | None]
    """Per prompt: the verifier's reward of an `eos` response, where the server can score it."""
    state: EspoState | None = None
    """Set when the call starts: the learner's, or the server's (frozen for the call's batch)."""
    policy_version: int = 0
    started: float = field(default_factory=time.perf_counter)
    started_monotonic: float = field(default_factory=time.monotonic)
    deadline_hit: bool = False
    known: RolloutResponse | asyncio.Future[RolloutResponse] | None = None
    """A retry: the first call's answer, or the future of the first call still running."""
    cut: asyncio.Future[ServiceError | None] | None = None
    """Done when a shutdown ends the call before it is complete (`Admission.cut_calls`), or with
    the error to answer when the engine died (`Admission.fail_calls`)."""
    token_events: bool = False
    """Stream the call's final tokens as they come (events.TokenDelta): the OpenAI streams."""

    @property
    def learner_owned(self) -> bool:
        return self.request.state is not None

    def deadline(self, max_call_seconds: float | None) -> float | None:
        """When the call returns at the latest (time.monotonic), if ever."""
        limits = [x for x in (self.request.deadline_s, max_call_seconds) if x is not None]
        return self.started_monotonic + min(limits) if limits else None

    def sampling(self, flat_index: int) -> Sampling:
        """The sampling settings of sample `flat_index` (= prompt_index * n + sample_index): the
        request's, with the sample's own seed."""
        seed = self.request.seed
        return self.request.sampling().model_copy(
            update={"seed": None if seed is None else sample_seed(seed, flat_index)}
        )

    def generation_params(self, sampling: Sampling, stream_interval: int = 1) -> GenerationParams:
        """A sample's settings (`sampling(flat_index)`) as the engine takes them."""
        return GenerationParams.of(
            sampling,
            top_k_logprobs=self.top_k_logprobs,
            top_ids="top_logprobs" in self.request.include,
            stream_interval=stream_interval,
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


class Planner:
    """Checks requests against the model, the server's limits and its state; plans the calls."""

    def __init__(
        self,
        engine: Engine,
        config: ServerConfig,
        *,
        has_critic: bool,
        text: TextCodec,
        verifier: Verifier | None,
        ledger: StateLedger,
        runs: RunRegistry,
        idempotency: IdempotencyCache,
        admission: Admission,
    ) -> None:
        self.engine = engine
        self.config = config
        self.rule_defaults = config.rule_defaults()
        self.has_critic = has_critic
        self.text = text
        self.verifier = verifier
        self.ledger = ledger
        self.runs = runs
        self.idempotency = idempotency
        self.admission = admission

    def plan(self, request: RolloutRequest) -> CallPlan:
        """Check a request against the model and limits; raise InvalidRequest naming the field.
        No side effects: the state is read when the call starts."""
        known = self.idempotency.lookup(request)
        if known is not None:  # a retry: replayed (or waited for) when it runs, not validated again
            return self.replay(request, known)
        self.admission.check_new_work()
        self.admission.check_weights()
        self._check_batch(request)
        self._check_counts(request)
        prompt_ids = self._prompt_ids(request)
        rule = request.stop_rule or self.config.default_stop_rule
        if rule.needs_critic and not self.has_critic:
            raise InvalidRequest(
                f"stop_rule {rule.value!r} needs a critic; this server runs without one (use regret_only)",
                "stop_rule",
            )
        return CallPlan(
            request=request,
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            rule=rule,
            params=self._rule_params(request),
            top_k_logprobs=self._top_k(request),
            scorers=[self._scorer(request, i, ids) for i, ids in enumerate(prompt_ids)],
        )

    def replay(
        self, request: RolloutRequest, known: RolloutResponse | asyncio.Future[RolloutResponse]
    ) -> CallPlan:
        """The plan of a retry: the first call's answer is replayed. It still has the prompts' ids:
        the OpenAI routes build their choices and usage from them."""
        prompt_ids = [
            list(p.token_ids) if p.token_ids is not None else self.text.encode(p.text or "")
            for p in request.prompts
        ]
        return CallPlan(
            request,
            request.request_id or "",
            prompt_ids,
            StopRule.NONE,
            self.rule_defaults,
            1,
            [None] * len(prompt_ids),
            known=known,
        )

    # ------------------------------------------------------------------ the checks

    def _check_batch(self, request: RolloutRequest) -> None:
        if request.batch_id is None:
            return
        if request.state is not None:
            message = "batch_id groups calls of the server-owned state; with state= the learner owns it"
            raise InvalidRequest(message, "batch_id")
        if not request.update_state:
            message = "a call with update_state=false folds nothing: it has no batch_id"
            raise InvalidRequest(message, "batch_id")
        self.ledger.check_begin(request.batch_id)

    def _check_run(self, request: RolloutRequest) -> tuple[int, int]:
        """The run's carried (groups, samples); 400 for an unknown or closed run, 409 for a busy one."""
        if request.run_id is None:
            if request.leftover != "abort":
                message = f"leftover={request.leftover} needs a run_id (POST /v1/runs opens one)"
                raise InvalidRequest(message, "run_id")
            return 0, 0
        run = self.runs.get(request.run_id)
        if run.busy:
            raise Conflict(f"run {request.run_id!r} already has a call in progress", "run_id")
        return len(run.groups), len(run.samples())

    def _check_counts(self, request: RolloutRequest) -> None:
        """Prompts, groups and samples against the server's limits and its load."""
        cfg, prompts = self.config, len(request.prompts)
        carried_groups, carried_samples = self._check_run(request)
        if not prompts and not carried_groups:
            raise InvalidRequest("prompts must not be empty (unless run_id carries groups over)", "prompts")
        if request.return_groups is not None and request.return_groups > prompts + carried_groups:
            raise InvalidRequest(
                f"return_groups={request.return_groups} exceeds the {prompts} prompt groups "
                f"of this call plus the {carried_groups} carried over",
                "return_groups",
            )
        if request.n > cfg.max_n:
            raise InvalidRequest(f"n={request.n} exceeds this server's max_n={cfg.max_n}", "n")
        if prompts > cfg.max_prompts:
            raise InvalidRequest(f"{prompts} prompts exceed max_prompts={cfg.max_prompts}", "prompts")
        wanted = request.n * prompts
        if wanted > cfg.max_inflight_trajectories:  # a 429 would be retried forever: it can never fit
            raise InvalidRequest(
                f"{prompts} prompts x n={request.n} exceed this server's "
                f"max_inflight_trajectories={cfg.max_inflight_trajectories}: split the call",
                "n",
            )
        self.admission.check_room(wanted)
        if wanted + carried_samples > cfg.max_trajectories:
            carried = f" (plus {carried_samples} carried over by the run)" if carried_samples else ""
            raise InvalidRequest(
                f"{prompts} prompts x n={request.n}{carried} exceed max_trajectories={cfg.max_trajectories}",
                "n",
            )

    def _prompt_ids(self, request: RolloutRequest) -> list[list[int]]:
        """The prompts' token ids (text tokenised), checked against the vocabulary and the model length."""
        engine = self.engine
        if request.max_tokens >= engine.max_model_len:
            raise InvalidRequest(
                f"max_tokens={request.max_tokens} must be below the model length {engine.max_model_len}",
                "max_tokens",
            )
        vocab = engine.vocab_size
        _check_sampling(request, vocab)
        prompt_ids = []
        for i, prompt in enumerate(request.prompts):
            if prompt.token_ids is not None:
                ids = prompt.token_ids
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise InvalidRequest(
                        f"prompts[{i}] has token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                        f"prompts[{i}].token_ids",
                    )
            else:
                ids = self.text.encode(prompt.text or "")
                if not ids:
                    raise InvalidRequest(f"prompts[{i}].text tokenises to nothing", f"prompts[{i}].text")
            if len(ids) + request.max_tokens > engine.max_model_len:
                raise InvalidRequest(
                    f"prompts[{i}] has {len(ids)} tokens; with max_tokens={request.max_tokens} it "
                    f"exceeds the model length {engine.max_model_len}",
                    f"prompts[{i}]",
                )
            prompt_ids.append(ids)
        return prompt_ids

    def _rule_params(self, request: RolloutRequest) -> EspoParams:
        if request.rule_params is None:
            return self.rule_defaults
        try:
            return request.rule_params.apply(self.rule_defaults)
        except ParameterError as exc:
            raise InvalidRequest(str(exc), f"rule_params.{exc.field}") from exc
        except KeyError as exc:  # an unknown name: the protocol model forbids it first, config may not
            raise InvalidRequest(str(exc).strip("'\""), "rule_params") from exc

    def _top_k(self, request: RolloutRequest) -> int:
        """Log-probabilities per step: 1 for the regret, k for the entropy and top_logprobs traces."""
        default = self.config.entropy_top_k
        top_k = (request.entropy_top_k or default) if "entropy" in request.include else 1
        if "top_logprobs" in request.include:  # one k serves both: the larger
            top_k = max(top_k, request.top_logprobs or request.entropy_top_k or default)
        return top_k

    def _scorer(self, request: RolloutRequest, prompt_index: int, prompt_ids: list[int]) -> Scorer | None:
        """The verifier's reward for eos responses of this prompt, if the server can score them."""
        prompt, verifier, text = request.prompts[prompt_index], self.verifier, self.text
        if verifier is None or prompt.answer is None:
            return None
        answer = prompt.answer
        prompt_text = prompt.text if prompt.text is not None else text.decode(prompt_ids)
        return lambda token_ids: float(verifier(prompt_text, text.decode(token_ids), answer))


def _check_sampling(sampling: Sampling, vocab: int) -> None:
    """What the protocol's bounds cannot say: token ids inside the vocabulary, min_tokens within
    max_tokens, top_k within the vocabulary (vLLM would fail the sample: a 503, not a 400)."""
    for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
        bad = [t for t in getattr(sampling, name) or () if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}", name)
    if sampling.min_tokens > sampling.max_tokens:
        raise InvalidRequest(
            f"min_tokens={sampling.min_tokens} exceeds max_tokens={sampling.max_tokens}", "min_tokens"
        )
    if sampling.top_k > vocab:
        raise InvalidRequest(f"top_k={sampling.top_k} exceeds the vocabulary size {vocab}", "top_k")
