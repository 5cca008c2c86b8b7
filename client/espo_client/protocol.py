"""The wire protocol of the ESPO rollout server: the one definition, imported by the server.

Every model forbids unknown fields: a misspelled sampling field that is silently ignored would
corrupt RL data without anyone noticing. The server's OpenAPI schema is generated from these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .stop_rule import BatchStats, EspoParams, EspoState, StopRule

__all__ = [
    "MAX_TOP_K_LOGPROBS",
    "Carried",
    "CommitRequest",
    "CriticInfoResponse",
    "CriticValuesRequest",
    "CriticValuesResponse",
    "CriticWeightsRequest",
    "CriticWeightsResponse",
    "DoneEvent",
    "EndReason",
    "ErrorBody",
    "ErrorEvent",
    "ErrorResponse",
    "EspoState",
    "GroupEvent",
    "HealthResponse",
    "InfoResponse",
    "Prompt",
    "RolloutRequest",
    "RolloutResponse",
    "RolloutStreamEvent",
    "RuleParams",
    "RunRequest",
    "RunResponse",
    "Sampling",
    "StateResponse",
    "StopRule",
    "Traces",
    "Trajectory",
    "TrajectoryEvent",
    "UploadCommitRequest",
    "UploadRequest",
    "UploadResponse",
    "Usage",
    "VersionSpan",
    "WeightFile",
    "WeightFilesResponse",
    "WeightsRequest",
    "WeightsResponse",
]

MAX_TOP_K_LOGPROBS = 64
"""Most log-probabilities per step a request may ask for (the entropy estimate's k); the server's
engine is started with this as vLLM's `max_logprobs`."""

MAX_SEED = 2**63 - 1
"""Largest seed a request may give. A sample's engine seed (seed + i*n + j, and its continuations')
wraps modulo 2**63, so it always fits vLLM's 64-bit generator."""

MAX_TEMPERATURE = 2.0
"""vLLM's (and OpenAI's) upper bound of the sampling temperature."""

EndReason = Literal["eos", "length", "espo_stop", "abort"]
TraceName = Literal["regret", "z", "values", "entropy", "top_logprobs", "text"]
"""What `include` can ask for: per-token traces (`Traces`), and `text`, the decoded response
(`Trajectory.text`)."""


class _Model(BaseModel):
    # No NaN or infinity anywhere: Python's JSON reader would let `NaN` through into the maths.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Prompt(_Model):
    """One prompt: token ids or text (tokenised by the server), and optionally the task's answer."""

    token_ids: list[int] | None = Field(None, description="Prompt token ids (preferred: exact).")
    text: str | None = Field(None, description="Prompt text, tokenised by the server's tokenizer.")
    answer: str | None = Field(
        None,
        description="Expected answer. When the server has a verifier for the task, `eos` trajectories "
        "get its reward (1 correct, 0 wrong); otherwise their reward is null and the learner scores them.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> Prompt:
        if (self.token_ids is None) == (self.text is None):
            raise ValueError("give exactly one of token_ids or text")
        if self.token_ids is not None and not self.token_ids:
            raise ValueError("token_ids must not be empty")
        if self.text is not None and not self.text:
            raise ValueError("text must not be empty")
        return self


class RuleParams(_Model):
    """Per-request overrides of the stop rule's parameters; unset fields keep the server's defaults."""

    a_ema: float | None = Field(None, ge=0, le=1, description="a_ema: EMA weight of mu/var (paper 0.99).")
    alpha_s: float | None = Field(None, ge=0, le=1, description="alpha_s: smoothing of z (paper 0.9).")
    cumulative: bool | None = Field(
        None,
        description="true (default): the smoothed cumulative regret z_t = alpha_s*z_{t-1} + gn_t; "
        "false: the average alpha_s*z_{t-1} + (1-alpha_s)*gn_t, (1-alpha_s) times it, so beta0, "
        "eta_beta, beta_min and beta_max must be (1-alpha_s) times as large for the same rule.",
    )
    beta0: float | None = Field(None, gt=0, description="beta_0: initial threshold scale (paper 7.0).")
    eta_beta: float | None = Field(None, ge=0, description="eta_beta: beta controller step (paper 0.1).")
    tau: float | None = Field(None, ge=0, le=1, description="tau: target stop rate (paper 0.25).")
    eps: float | None = Field(None, ge=0, description="eps: floor on V in the threshold (paper 0.2).")
    r_fail: float | None = Field(None, description="r_fail: reward of a stopped trajectory (paper -1).")
    clip_c: float | None = Field(None, gt=0, description="c: clip of the normalised regret.")
    delta: float | None = Field(None, gt=0, description="delta: added to var under the square root.")
    beta_min: float | None = Field(None, gt=0, description="Lower clip of beta (> 0: beta stays positive).")
    beta_max: float | None = Field(None, gt=0, description="Upper clip of beta.")
    min_tokens: int | None = Field(None, ge=0, description="No stop before this response token index.")
    critic_stride: int | None = Field(
        None, ge=1, description="At most one critic query per this many tokens."
    )
    warm_after_batches: int | None = Field(
        None, ge=0, description="State turns warm after this many batches."
    )
    random_rate: float | None = Field(
        None, ge=0, le=1, description="`random`: fraction of trajectories stopped."
    )
    v_const: float | None = Field(None, description="`regret_only`: constant standing in for V(s_t).")
    v_min: float | None = Field(None, description="`value_only`: stop when V(s_t) < v_min.")

    def overrides(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)

    def apply(self, base: EspoParams) -> EspoParams:
        return base.with_overrides(self.overrides())


class Sampling(_Model):
    """The sampling settings of a call: the one definition, shared by the request (`RolloutRequest`),
    the record of a carried-over trajectory (`Carried`) and the OpenAI requests; the server turns
    them into the engine's parameters in one place.

    Beyond max_tokens, temperature, top_p, seed and the stops, they are vLLM's settings with vLLM's
    names, defaults and meaning (its `SamplingParams`). They change which token is sampled, never the
    log-probabilities returned: those stay raw (the log-softmax of the model's logits, before
    temperature, penalties, logit bias, token masks, min_tokens, top-k, top-p and min-p), which is
    what the ESPO regret and a learner's importance ratio against the policy's own forward pass need.
    A raw logprob equals the one the token was sampled from only at temperature 1 with all of these
    at their defaults."""

    max_tokens: int = Field(256, ge=1, description="Response token limit; ends with `length` when hit.")
    temperature: float = Field(
        1.0, ge=0, le=MAX_TEMPERATURE, description="Sampling temperature, 0 to 2 (regret uses raw logprobs)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Base seed (0 to 2**63-1); sample j of prompt i uses seed + i*n + j.",
    )
    stop_token_ids: list[int] | None = Field(None, description="Extra token ids that end a response (eos).")
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None,
        max_length=16,
        description="Strings that end a response (eos) once the decoded text contains one; the tokens up "
        "to and including the one that completed it are kept.",
    )
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks: fixed lengths).")
    top_k: int = Field(0, ge=-1, description="Sample among the k most likely tokens only (0 or -1: all).")
    min_p: float = Field(
        0.0, ge=0, le=1, description="Drop tokens less likely than min_p times the most likely one."
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0,
        description="Divide positive logits (multiply negative ones) of tokens already in the prompt or "
        "response by this (1: off).",
    )
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="Subtract from the logit of each token already in the response."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="Subtract this times its count so far from each token's logit."
    )
    min_tokens: int = Field(
        0,
        ge=0,
        description="EOS and stop_token_ids cannot end a response before this many tokens (vLLM's; not "
        "the stop rule's rule_params.min_tokens).",
    )
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Token id -> value added to its logit before sampling (-100 to 100)."
    )
    allowed_token_ids: list[int] | None = Field(
        None, min_length=1, description="Sample only among these token ids."
    )
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Words whose token sequences are never completed."
    )

    def sampling(self) -> Sampling:
        """Just the sampling settings (of a request, say)."""
        return Sampling(**{name: getattr(self, name) for name in Sampling.model_fields})


class RolloutRequest(Sampling):
    """`POST /v1/rollouts`: sample `n` trajectories per prompt under a stop rule (the sampling
    settings are `Sampling`'s)."""

    prompts: list[Prompt] = Field(
        ...,
        description="Prompts; each gets `n` samples. At least one, unless `run_id` names a run that "
        "carries samples over (a call that only collects them).",
    )
    n: int = Field(1, ge=1, description="Samples per prompt (the server caps it: see /v1/info).")
    stop_rule: StopRule | None = Field(
        None,
        description="none, espo, random, regret_only or value_only (unset: the server's default_stop_rule).",
    )
    rule_params: RuleParams | None = Field(None, description="Overrides of the rule's parameters.")
    shadow: bool = Field(
        False,
        description="Run the rule but never stop: record `shadow_stop_step` and generate to the end.",
    )
    batch_id: str | None = Field(
        None,
        max_length=200,
        description="Calls that share a batch_id form one batch of the server-owned state, closed by "
        "POST /v1/espo/commit or by a call with another batch_id. Unset: this call is its own batch.",
    )
    state: EspoState | None = Field(
        None,
        description="Learner-owned state: used instead of the server's, which is left untouched; the "
        "response's `state_after` is this state updated with the call's batch statistics.",
    )
    update_state: bool = Field(
        True, description="Fold this call's statistics into the server-owned state (false for evaluation)."
    )
    include: list[TraceName] = Field(
        default_factory=list,
        description="Per-token traces to return: regret, z, values, entropy, top_logprobs; and text (the "
        "decoded response of each trajectory).",
    )
    top_logprobs: int | None = Field(
        None,
        ge=1,
        le=MAX_TOP_K_LOGPROBS,
        description="k of the `top_logprobs` trace: the k most likely tokens at each step (default "
        "entropy_top_k). With `entropy` too, both use the larger k.",
    )
    entropy_top_k: int | None = Field(
        None,
        ge=1,
        le=MAX_TOP_K_LOGPROBS,
        description="k of the top-k entropy estimate (server default if unset).",
    )
    request_id: str | None = Field(
        None,
        max_length=200,
        description="Idempotency key: a retry with the same id gets the first call's result, not a "
        "second batch of samples.",
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        description="Return by then (seconds from the call's start): groups not complete are handled as "
        "`leftover` says, and usage.deadline_hit is set. Unset: the server's max_call_seconds, if any.",
    )
    return_groups: int | None = Field(
        None,
        ge=1,
        description="Return as soon as this many prompt groups are complete (all `n` samples of a "
        "prompt ended by eos, length or espo_stop), counting groups carried over from earlier calls "
        "of the run. Unset: wait for every group.",
    )
    leftover: Literal["abort", "carry", "hold"] = Field(
        "abort",
        description="What happens to the samples of groups that were not complete at an early return: "
        "`abort` (returned with end_reason abort; the learner drops them), `carry` (they keep running "
        "in the server and are handed back, as whole groups, by a later call of the same `run_id`) or "
        "`hold` (kept like `carry`, but paused until the run's next call: no engine time between calls, "
        "and every token after the pause comes from the weights served then).",
    )
    run_id: str | None = Field(
        None,
        max_length=200,
        description="The run (POST /v1/runs) this call belongs to: its carried-over groups take part in "
        "this call, and with leftover=carry or hold this call's unfinished groups are kept for the next.",
    )


class Traces(_Model):
    """Per-token traces, one entry per returned token (values: null where the critic was not asked)."""

    regret: list[float] | None = Field(None, description="g_t of each token.")
    z: list[float] | None = Field(None, description="Smoothed normalised regret z_t of each token.")
    values: list[float | None] | None = Field(None, description="V(s_t) where the critic was queried.")
    entropy: list[float] | None = Field(None, description="Top-k estimate of the policy entropy at s_t.")
    top_token_ids: list[list[int]] | None = Field(
        None, description="`top_logprobs`: the k most likely token ids at s_t, most likely first."
    )
    top_logprobs: list[list[float]] | None = Field(
        None, description="`top_logprobs`: their raw log-probabilities, in the same order."
    )


class VersionSpan(_Model):
    """Tokens [start, end) of a response were sampled by policy version `version`."""

    start: int = Field(..., ge=0)
    end: int = Field(..., ge=0)
    version: int


class Carried(Sampling):
    """Where a carried-over trajectory came from: set only on trajectories that an earlier call of the
    run started (its prompt_index and sample_index refer to that call's prompts). Records every
    sampling setting of that call, with the sample's own seed."""

    request_id: str = Field(..., description="The call that started this trajectory.")
    prompt_token_ids: list[int] = Field(..., description="Its prompt, so the learner needs no lookup.")
    stop_rule: StopRule
    shadow: bool
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="The sample's own seed (its first engine request's)."
    )


class Trajectory(_Model):
    prompt_index: int
    sample_index: int
    token_ids: list[int] = Field(..., description="Response token ids (prompt excluded).")
    logprobs: list[float] = Field(..., description="Raw log-probability of each sampled token.")
    end_reason: EndReason
    stop_step: int | None = Field(None, description="Index of the last kept token when stopped, else null.")
    reward: float | None = Field(
        None,
        description="Reward on the last token: r_fail when stopped, the verifier's when known, else null.",
    )
    shadow_stop_step: int | None = Field(None, description="Where the rule would have stopped (shadow mode).")
    policy_version: int = Field(
        ...,
        description="Version of the weights that sampled this trajectory (the oldest, if weights were "
        "pushed while it was carried over: see policy_version_spans).",
    )
    policy_version_spans: list[VersionSpan] = Field(
        default_factory=list,
        description="The policy version of every span of the returned tokens (one span unless the "
        "trajectory was carried over across a weight push).",
    )
    discarded_tokens: int = Field(0, description="Tokens generated past the stop while the critic answered.")
    critic_error: bool = Field(False, description="A critic query of this trajectory failed or timed out.")
    critic_version: int | None = Field(
        None,
        ge=0,
        description="Version of the critic weights that answered this trajectory's last critic query "
        "(for a stopped trajectory: the critic that judged the stop); null if it asked none or the "
        "critic reports no version (a stock vLLM server).",
    )
    traces: Traces | None = None
    carried: Carried | None = Field(
        None, description="Set when an earlier call of the run started this trajectory (carried over)."
    )
    text: str | None = Field(
        None, description='The decoded response (special tokens skipped), with `include: ["text"]`.'
    )


class Usage(_Model):
    prompt_tokens: int
    generated_tokens: int = Field(..., description="Tokens returned in trajectories.")
    discarded_tokens: int = Field(0, description="Tokens generated after a stop step and thrown away.")
    engine_tokens: int = Field(
        0,
        ge=0,
        description="Tokens the engine generated: generated_tokens (kept) plus discarded_tokens, what "
        "the call cost in engine work; left out, it is that sum.",
    )
    trajectories: int
    stopped: int = Field(0, description="Trajectories ended by the rule (espo_stop).")
    shadow_stopped: int = Field(0, description="Trajectories the rule would have stopped (shadow mode).")
    tokens_saved_estimate: int = Field(0, description="Estimate: mean unstopped length minus kept length.")
    tokens_saved_upper_bound: int = Field(0, description="Bound: max_tokens minus kept length.")
    tokens_saved_shadow: int = Field(
        0, description="Exact, shadow mode: full length minus shadow kept length."
    )
    critic_calls: int = 0
    critic_errors: int = 0
    critic_tokens: int = Field(
        0,
        ge=0,
        description="Tokens the critic computed for this call's answered queries (the rest of each "
        "prefix came from its prefix cache); a stock vLLM critic does not say, and counts whole prefixes.",
    )
    critic_prefix_tokens: int = Field(
        0,
        ge=0,
        description="Summed length of the prefixes those queries asked about: what re-encoding every "
        "prefix whole would have cost.",
    )
    critic_time_s: float = Field(0.0, description="Summed latency of this call's critic queries.")
    trajectory_time_s: float = Field(
        0.0, description="Summed lifetime of the trajectories (critic_time_s over this: the critic share)."
    )
    wall_time_s: float = 0.0
    groups_returned: int = Field(0, description="Complete prompt groups in this response.")
    groups_carried: int = Field(0, description="Groups left running for a later call of the run.")
    carried_in: int = Field(0, description="Trajectories in this response that earlier calls started.")
    aborted: int = Field(0, description="Trajectories of incomplete groups aborted at an early return.")
    deadline_hit: bool = Field(False, description="The call returned at its deadline, not at its target.")
    regret_tokens: int = Field(0, description="Batch statistics: number of regret values.")
    regret_sum: float = 0.0
    regret_sumsq: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _engine_tokens(cls, data: object) -> object:
        # Derived, so every producer of a Usage (the fold, fakes, an older server) reports it alike.
        if isinstance(data, dict) and data.get("engine_tokens") is None:
            kept, discarded = data.get("generated_tokens", 0), data.get("discarded_tokens", 0)
            data = {**data, "engine_tokens": kept + discarded}
        return data

    def batch_stats(self, *, shadow: bool = False, steers_beta: bool = True) -> BatchStats:
        """This call's contribution to the ESPO state update: the same sums the server folds in.

        The stop count is `shadow_stopped` in shadow mode (where nothing is really stopped), else
        `stopped`. Under a rule that does not steer beta (`StopRule.steers_beta`), trajectories count
        toward mu/var only, not toward the stop rate. Sums merge exactly (`BatchStats.merge`).
        """
        return BatchStats(
            tokens=self.regret_tokens,
            g_sum=self.regret_sum,
            g_sumsq=self.regret_sumsq,
            trajectories=self.trajectories if steers_beta else 0,
            stops=(self.shadow_stopped if shadow else self.stopped) if steers_beta else 0,
        )


class RolloutResponse(_Model):
    request_id: str
    trajectories: list[Trajectory]
    usage: Usage
    stop_rule: StopRule
    shadow: bool
    rule_params: dict[str, float | int | bool | None] = Field(..., description="The parameters in effect.")
    state_used: EspoState = Field(..., description="The state the rule ran with (frozen for the call).")
    state_after: EspoState | None = Field(
        None, description="The state after folding this call in (null while its batch is still open)."
    )
    policy_version: int
    run_id: str | None = None
    prompt_token_ids: list[list[int]] | None = Field(
        None,
        description="The token ids of every prompt, in order, when any was given as text (the "
        "tokenisation the trajectories continue); null when all prompts were token ids.",
    )

    def batch_stats(self) -> BatchStats:
        """This call's contribution to the ESPO state update (see `Usage.batch_stats`)."""
        return self.usage.batch_stats(shadow=self.shadow, steers_beta=self.stop_rule.steers_beta)

    def espo_params(self) -> EspoParams:
        """The rule parameters in effect for this call, as the pure maths' `EspoParams`."""
        known = set(EspoParams.names())
        return EspoParams().with_overrides(
            {name: value for name, value in self.rule_params.items() if name in known and value is not None}
        )


class StateResponse(_Model):
    state: EspoState
    open_batch_id: str | None = None
    open_batch_calls: int = 0


class CommitRequest(_Model):
    batch_id: str | None = Field(None, description="The batch to close (default: whichever is open).")


class WeightsRequest(_Model):
    path: str = Field(..., min_length=1, description="Directory with safetensors weights on the server.")
    version: int | None = Field(None, ge=0, description="New policy version (default: current + 1).")


class WeightsResponse(_Model):
    policy_version: int
    load_time_s: float


class UploadRequest(_Model):
    """`POST /v1/weights/uploads` (the policy) or `/v1/critic/weights/uploads`: open an upload, a
    checkpoint streamed into a staging directory of the server, shard by shard."""

    config: dict[str, Any] | None = Field(
        None,
        description="The checkpoint's config.json (an HF config as a dict), if the learner has one: "
        "checked against the served model's architectures, tie_word_embeddings and num_labels.",
    )


class UploadResponse(_Model):
    """Where an upload stands."""

    upload_id: str = Field(..., description="Names the upload in its other routes.")
    state: Literal["open", "committing", "abandoned"] = Field(
        ..., description="open: takes shards; committing: being loaded; abandoned: deleted, nothing kept."
    )
    shards: list[str] = Field(default_factory=list, description="Shards received whole, in order.")
    tensors: int = Field(0, ge=0, description="Tensors received.")
    expected_tensors: int | None = Field(
        None, ge=0, description="Tensors of the served model (null: unknown, not a local directory)."
    )
    bytes_received: int = Field(0, ge=0, description="Bytes of the shards received whole.")
    max_bytes: int = Field(..., ge=0, description="Most bytes one upload may hold (--upload-max-bytes).")
    idle_timeout_s: float = Field(
        ..., gt=0, description="An upload idle this long is abandoned (--upload-idle-timeout-s)."
    )


class UploadCommitRequest(_Model):
    """`POST .../uploads/{upload_id}/commit`: check the whole checkpoint and serve it, like a push by path."""

    version: int | None = Field(None, ge=0, description="New version (default: current + 1).")


class WeightFile(_Model):
    """One file of the checkpoint a server serves."""

    name: str = Field(..., description="The file's name: a *.safetensors shard or config.json.")
    size: int = Field(..., ge=0, description="Bytes.")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of its bytes, hex.")


class WeightFilesResponse(_Model):
    """`GET /v1/weights/files` (or `/v1/critic/weights/files`): the files of the weights serving now,
    each downloadable from `.../files/{name}`; what a replica that joins warm copies."""

    version: int = Field(..., ge=0, description="The version these weights serve as.")
    files: list[WeightFile] = Field(..., description="The checkpoint's files, by name.")


class InfoResponse(_Model):
    model: str
    policy_version: int
    vocab_size: int
    max_model_len: int
    eos_token_id: int | None
    max_n: int
    max_prompts: int
    critic: str
    critic_fallback: str
    default_stop_rule: StopRule
    rule_defaults: dict[str, float | int | bool | None]
    entropy_top_k: int
    state: EspoState
    verifier: str | None = None
    max_num_seqs: int | None = Field(None, description="Sequences the engine runs at once (its slots).")
    max_num_batched_tokens: int | None = Field(None, description="Tokens the engine schedules per step.")
    max_trajectories: int | None = Field(None, description="Most trajectories (prompts x n) per call.")
    run_idle_timeout_s: float | None = Field(None, description="A run with no call for this long is closed.")
    critic_version: int | None = Field(
        None,
        ge=0,
        description="Version of the critic weights serving (null: no critic, or one that reports none).",
    )


class HealthResponse(_Model):
    status: str
    detail: dict[str, str] = Field(default_factory=dict)


class ErrorBody(_Model):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(_Model):
    error: ErrorBody


class TrajectoryEvent(_Model):
    """`POST /v1/rollouts?stream=true` NDJSON line: one trajectory, sent as soon as it finishes."""

    type: Literal["trajectory"] = "trajectory"
    trajectory: Trajectory


class DoneEvent(_Model):
    """The stream's last line on success: the whole response with `trajectories=[]` (they were sent)."""

    type: Literal["done"] = "done"
    response: RolloutResponse


class GroupEvent(_Model):
    """`?stream=true` NDJSON line: every trajectory of a prompt group has been sent (the group is
    complete), so a group-relative learner can score it before the call ends."""

    type: Literal["group"] = "group"
    prompt_index: int
    sample_count: int
    carried_from: str | None = Field(
        None, description="request_id of the call that started the group, if it was carried over."
    )


class ErrorEvent(_Model):
    """The stream's last line on failure after the 200 status was sent: the error envelope's body."""

    type: Literal["error"] = "error"
    error: ErrorBody


RolloutStreamEvent = Annotated[
    TrajectoryEvent | GroupEvent | DoneEvent | ErrorEvent, Field(discriminator="type")
]
"""One NDJSON line of a streamed rollout: trajectory and group lines, then exactly one done or error line."""


class RunRequest(_Model):
    """`POST /v1/runs`: open a run, the owner of samples carried over from one call to the next."""

    run_id: str | None = Field(None, min_length=1, max_length=200, description="Default: a new uuid.")


class RunResponse(_Model):
    run_id: str
    open: bool = Field(..., description="False once closed (DELETE /v1/runs/{run_id}) or expired.")
    carried_groups: int = Field(0, description="Groups waiting for the next call of the run.")
    carried_trajectories: int = Field(0, description="Their samples (finished or still running).")
    running: int = Field(0, description="Of those, samples still generating (held ones are paused).")
    aborted: int = Field(0, description="Samples aborted when the run was closed.")
    calls: int = Field(0, description="Rollout calls of this run so far.")
    idle_timeout_s: float = Field(..., description="A run with no call for this long is closed.")


class CriticValuesRequest(_Model):
    """`POST /v1/values` of a critic server: the value of each whole prefix."""

    token_ids: list[list[int]] = Field(..., min_length=1, description="Prefixes (prompt + response[:t]).")


class CriticValuesResponse(_Model):
    values: list[float] = Field(..., description="V of each prefix: the critic's output at its last token.")
    critic_version: int | None = Field(None, ge=0, description="Version of the weights that computed them.")
    computed_tokens: list[int] | None = Field(
        None,
        description="Tokens the critic computed for each prefix; the rest came from its prefix cache.",
    )


class CriticWeightsRequest(_Model):
    """`POST /v1/critic/weights`: load new critic weights in place (the rollout server forwards it to a
    remote `espo-server critic`)."""

    path: str = Field(
        ...,
        min_length=1,
        description="Directory with the critic's safetensors weights, on the machine of the critic that "
        "loads them; same architecture, tensor names and shapes as the critic being served.",
    )
    version: int | None = Field(None, ge=0, description="New critic version (default: current + 1).")


class CriticWeightsResponse(_Model):
    critic_version: int = Field(..., ge=0, description="Version of the critic weights now serving.")
    load_time_s: float = Field(..., ge=0, description="Seconds the load took, once nothing else ran.")


class CriticInfoResponse(_Model):
    """`GET /v1/info` of `espo-server critic`."""

    model: str = Field(..., description="The directory the critic was started from.")
    critic_version: int = Field(..., ge=0, description="Version of the critic weights serving.")
    weights: str = Field(..., description="The directory of the weights serving now.")
    max_model_len: int
    vocab_size: int
    prefix_caching: bool = Field(..., description="Whether queries reuse cached prefixes (LAST pooling).")
    block_size: int | None = Field(
        None, description="KV cache block size: cached prefixes are reused in whole blocks of this size."
    )
