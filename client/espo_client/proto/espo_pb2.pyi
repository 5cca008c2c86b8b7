from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, items: _Optional[_Iterable[int]] = ...) -> None: ...

class Floats(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, items: _Optional[_Iterable[float]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("token_ids", "text", "answer")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    answer: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class RuleParams(_message.Message):
    __slots__ = ("a_ema", "alpha_s", "beta0", "eta_beta", "tau", "eps", "r_fail", "clip_c", "delta", "beta_min", "beta_max", "min_tokens", "critic_stride", "warm_after_batches", "random_rate", "v_const", "v_min", "cumulative")
    A_EMA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_S_FIELD_NUMBER: _ClassVar[int]
    BETA0_FIELD_NUMBER: _ClassVar[int]
    ETA_BETA_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    R_FAIL_FIELD_NUMBER: _ClassVar[int]
    CLIP_C_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BETA_MIN_FIELD_NUMBER: _ClassVar[int]
    BETA_MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CRITIC_STRIDE_FIELD_NUMBER: _ClassVar[int]
    WARM_AFTER_BATCHES_FIELD_NUMBER: _ClassVar[int]
    RANDOM_RATE_FIELD_NUMBER: _ClassVar[int]
    V_CONST_FIELD_NUMBER: _ClassVar[int]
    V_MIN_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_FIELD_NUMBER: _ClassVar[int]
    a_ema: float
    alpha_s: float
    beta0: float
    eta_beta: float
    tau: float
    eps: float
    r_fail: float
    clip_c: float
    delta: float
    beta_min: float
    beta_max: float
    min_tokens: int
    critic_stride: int
    warm_after_batches: int
    random_rate: float
    v_const: float
    v_min: float
    cumulative: bool
    def __init__(self, a_ema: _Optional[float] = ..., alpha_s: _Optional[float] = ..., beta0: _Optional[float] = ..., eta_beta: _Optional[float] = ..., tau: _Optional[float] = ..., eps: _Optional[float] = ..., r_fail: _Optional[float] = ..., clip_c: _Optional[float] = ..., delta: _Optional[float] = ..., beta_min: _Optional[float] = ..., beta_max: _Optional[float] = ..., min_tokens: _Optional[int] = ..., critic_stride: _Optional[int] = ..., warm_after_batches: _Optional[int] = ..., random_rate: _Optional[float] = ..., v_const: _Optional[float] = ..., v_min: _Optional[float] = ..., cumulative: _Optional[bool] = ...) -> None: ...

class EspoState(_message.Message):
    __slots__ = ("mu", "var", "beta", "warm", "initialised", "batches")
    MU_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    INITIALISED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    mu: float
    var: float
    beta: float
    warm: bool
    initialised: bool
    batches: int
    def __init__(self, mu: _Optional[float] = ..., var: _Optional[float] = ..., beta: _Optional[float] = ..., warm: _Optional[bool] = ..., initialised: _Optional[bool] = ..., batches: _Optional[int] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("prompts", "n", "max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "stop", "ignore_eos", "stop_rule", "rule_params", "shadow", "batch_id", "state", "update_state", "include", "entropy_top_k", "top_logprobs", "request_id", "deadline_s", "return_groups", "leftover", "run_id", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    STOP_RULE_FIELD_NUMBER: _ClassVar[int]
    RULE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_STATE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    RETURN_GROUPS_FIELD_NUMBER: _ClassVar[int]
    LEFTOVER_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    stop_rule: str
    rule_params: RuleParams
    shadow: bool
    batch_id: str
    state: EspoState
    update_state: bool
    include: _containers.RepeatedScalarFieldContainer[str]
    entropy_top_k: int
    top_logprobs: int
    request_id: str
    deadline_s: float
    return_groups: int
    leftover: str
    run_id: str
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_tokens: int
    logit_bias: _containers.ScalarMap[int, float]
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bad_words: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., n: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., stop_rule: _Optional[str] = ..., rule_params: _Optional[_Union[RuleParams, _Mapping]] = ..., shadow: _Optional[bool] = ..., batch_id: _Optional[str] = ..., state: _Optional[_Union[EspoState, _Mapping]] = ..., update_state: _Optional[bool] = ..., include: _Optional[_Iterable[str]] = ..., entropy_top_k: _Optional[int] = ..., top_logprobs: _Optional[int] = ..., request_id: _Optional[str] = ..., deadline_s: _Optional[float] = ..., return_groups: _Optional[int] = ..., leftover: _Optional[str] = ..., run_id: _Optional[str] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., min_tokens: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ..., bad_words: _Optional[_Iterable[str]] = ...) -> None: ...

class VersionSpan(_message.Message):
    __slots__ = ("start", "end", "version")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    version: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class Carried(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "stop_rule", "shadow", "max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "ignore_eos", "stop", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_RULE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop_rule: str
    shadow: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_tokens: int
    logit_bias: _containers.ScalarMap[int, float]
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bad_words: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., stop_rule: _Optional[str] = ..., shadow: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., min_tokens: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ..., bad_words: _Optional[_Iterable[str]] = ...) -> None: ...

class Traces(_message.Message):
    __slots__ = ("regret", "z", "values", "entropy", "top_token_ids", "top_logprobs")
    REGRET_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    regret: _containers.RepeatedScalarFieldContainer[float]
    z: _containers.RepeatedScalarFieldContainer[float]
    values: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    entropy: _containers.RepeatedScalarFieldContainer[float]
    top_token_ids: _containers.RepeatedCompositeFieldContainer[TokenIds]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[Floats]
    def __init__(self, regret: _Optional[_Iterable[float]] = ..., z: _Optional[_Iterable[float]] = ..., values: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ..., entropy: _Optional[_Iterable[float]] = ..., top_token_ids: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., top_logprobs: _Optional[_Iterable[_Union[Floats, _Mapping]]] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("prompt_index", "sample_index", "token_ids", "logprobs", "end_reason", "stop_step", "reward", "shadow_stop_step", "policy_version", "discarded_tokens", "critic_error", "traces", "text", "policy_version_spans", "carried", "critic_version")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STEP_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SHADOW_STOP_STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CRITIC_ERROR_FIELD_NUMBER: _ClassVar[int]
    TRACES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_SPANS_FIELD_NUMBER: _ClassVar[int]
    CARRIED_FIELD_NUMBER: _ClassVar[int]
    CRITIC_VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    sample_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    end_reason: str
    stop_step: int
    reward: float
    shadow_stop_step: int
    policy_version: int
    discarded_tokens: int
    critic_error: bool
    traces: Traces
    text: str
    policy_version_spans: _containers.RepeatedCompositeFieldContainer[VersionSpan]
    carried: Carried
    critic_version: int
    def __init__(self, prompt_index: _Optional[int] = ..., sample_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., end_reason: _Optional[str] = ..., stop_step: _Optional[int] = ..., reward: _Optional[float] = ..., shadow_stop_step: _Optional[int] = ..., policy_version: _Optional[int] = ..., discarded_tokens: _Optional[int] = ..., critic_error: _Optional[bool] = ..., traces: _Optional[_Union[Traces, _Mapping]] = ..., text: _Optional[str] = ..., policy_version_spans: _Optional[_Iterable[_Union[VersionSpan, _Mapping]]] = ..., carried: _Optional[_Union[Carried, _Mapping]] = ..., critic_version: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens", "discarded_tokens", "trajectories", "stopped", "shadow_stopped", "tokens_saved_estimate", "tokens_saved_upper_bound", "tokens_saved_shadow", "critic_calls", "critic_errors", "critic_time_s", "trajectory_time_s", "wall_time_s", "regret_tokens", "regret_sum", "regret_sumsq", "groups_returned", "groups_carried", "carried_in", "aborted", "deadline_hit", "critic_tokens", "critic_prefix_tokens", "engine_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_STOPPED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SAVED_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SAVED_UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SAVED_SHADOW_FIELD_NUMBER: _ClassVar[int]
    CRITIC_CALLS_FIELD_NUMBER: _ClassVar[int]
    CRITIC_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CRITIC_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_TIME_S_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    REGRET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REGRET_SUM_FIELD_NUMBER: _ClassVar[int]
    REGRET_SUMSQ_FIELD_NUMBER: _ClassVar[int]
    GROUPS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_CARRIED_FIELD_NUMBER: _ClassVar[int]
    CARRIED_IN_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_HIT_FIELD_NUMBER: _ClassVar[int]
    CRITIC_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CRITIC_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    discarded_tokens: int
    trajectories: int
    stopped: int
    shadow_stopped: int
    tokens_saved_estimate: int
    tokens_saved_upper_bound: int
    tokens_saved_shadow: int
    critic_calls: int
    critic_errors: int
    critic_time_s: float
    trajectory_time_s: float
    wall_time_s: float
    regret_tokens: int
    regret_sum: float
    regret_sumsq: float
    groups_returned: int
    groups_carried: int
    carried_in: int
    aborted: int
    deadline_hit: bool
    critic_tokens: int
    critic_prefix_tokens: int
    engine_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., discarded_tokens: _Optional[int] = ..., trajectories: _Optional[int] = ..., stopped: _Optional[int] = ..., shadow_stopped: _Optional[int] = ..., tokens_saved_estimate: _Optional[int] = ..., tokens_saved_upper_bound: _Optional[int] = ..., tokens_saved_shadow: _Optional[int] = ..., critic_calls: _Optional[int] = ..., critic_errors: _Optional[int] = ..., critic_time_s: _Optional[float] = ..., trajectory_time_s: _Optional[float] = ..., wall_time_s: _Optional[float] = ..., regret_tokens: _Optional[int] = ..., regret_sum: _Optional[float] = ..., regret_sumsq: _Optional[float] = ..., groups_returned: _Optional[int] = ..., groups_carried: _Optional[int] = ..., carried_in: _Optional[int] = ..., aborted: _Optional[int] = ..., deadline_hit: _Optional[bool] = ..., critic_tokens: _Optional[int] = ..., critic_prefix_tokens: _Optional[int] = ..., engine_tokens: _Optional[int] = ...) -> None: ...

class RolloutResponse(_message.Message):
    __slots__ = ("request_id", "trajectories", "usage", "stop_rule", "shadow", "rule_params", "state_used", "state_after", "policy_version", "prompt_token_ids", "run_id")
    class RuleParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_RULE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    RULE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    STATE_USED_FIELD_NUMBER: _ClassVar[int]
    STATE_AFTER_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trajectories: _containers.RepeatedCompositeFieldContainer[Trajectory]
    usage: Usage
    stop_rule: str
    shadow: bool
    rule_params: _containers.ScalarMap[str, float]
    state_used: EspoState
    state_after: EspoState
    policy_version: int
    prompt_token_ids: _containers.RepeatedCompositeFieldContainer[TokenIds]
    run_id: str
    def __init__(self, request_id: _Optional[str] = ..., trajectories: _Optional[_Iterable[_Union[Trajectory, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., stop_rule: _Optional[str] = ..., shadow: _Optional[bool] = ..., rule_params: _Optional[_Mapping[str, float]] = ..., state_used: _Optional[_Union[EspoState, _Mapping]] = ..., state_after: _Optional[_Union[EspoState, _Mapping]] = ..., policy_version: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., run_id: _Optional[str] = ...) -> None: ...

class GroupEvent(_message.Message):
    __slots__ = ("type", "prompt_index", "sample_count", "carried_from")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CARRIED_FROM_FIELD_NUMBER: _ClassVar[int]
    type: str
    prompt_index: int
    sample_count: int
    carried_from: str
    def __init__(self, type: _Optional[str] = ..., prompt_index: _Optional[int] = ..., sample_count: _Optional[int] = ..., carried_from: _Optional[str] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("trajectory", "done", "group")
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    trajectory: Trajectory
    done: RolloutResponse
    group: GroupEvent
    def __init__(self, trajectory: _Optional[_Union[Trajectory, _Mapping]] = ..., done: _Optional[_Union[RolloutResponse, _Mapping]] = ..., group: _Optional[_Union[GroupEvent, _Mapping]] = ...) -> None: ...

class StateResponse(_message.Message):
    __slots__ = ("state", "open_batch_id", "open_batch_calls")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_BATCH_CALLS_FIELD_NUMBER: _ClassVar[int]
    state: EspoState
    open_batch_id: str
    open_batch_calls: int
    def __init__(self, state: _Optional[_Union[EspoState, _Mapping]] = ..., open_batch_id: _Optional[str] = ..., open_batch_calls: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class WeightsRequest(_message.Message):
    __slots__ = ("path", "version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WeightsResponse(_message.Message):
    __slots__ = ("policy_version", "load_time_s")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIME_S_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    load_time_s: float
    def __init__(self, policy_version: _Optional[int] = ..., load_time_s: _Optional[float] = ...) -> None: ...

class CriticWeightsRequest(_message.Message):
    __slots__ = ("path", "version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: _struct_pb2.Struct
    def __init__(self, config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class UploadCommitRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("name", "sha256", "size", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("open", "shard", "commit")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    open: UploadRequest
    shard: ShardChunk
    commit: UploadCommitRequest
    def __init__(self, open: _Optional[_Union[UploadRequest, _Mapping]] = ..., shard: _Optional[_Union[ShardChunk, _Mapping]] = ..., commit: _Optional[_Union[UploadCommitRequest, _Mapping]] = ...) -> None: ...

class CriticWeightsResponse(_message.Message):
    __slots__ = ("critic_version", "load_time_s")
    CRITIC_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIME_S_FIELD_NUMBER: _ClassVar[int]
    critic_version: int
    load_time_s: float
    def __init__(self, critic_version: _Optional[int] = ..., load_time_s: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "policy_version", "vocab_size", "max_model_len", "eos_token_id", "max_n", "max_prompts", "critic", "critic_fallback", "default_stop_rule", "rule_defaults", "entropy_top_k", "state", "verifier", "max_num_seqs", "max_num_batched_tokens", "max_trajectories", "run_idle_timeout_s", "critic_version")
    class RuleDefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CRITIC_FIELD_NUMBER: _ClassVar[int]
    CRITIC_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STOP_RULE_FIELD_NUMBER: _ClassVar[int]
    RULE_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_TOP_K_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    RUN_IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CRITIC_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy_version: int
    vocab_size: int
    max_model_len: int
    eos_token_id: int
    max_n: int
    max_prompts: int
    critic: str
    critic_fallback: str
    default_stop_rule: str
    rule_defaults: _containers.ScalarMap[str, float]
    entropy_top_k: int
    state: EspoState
    verifier: str
    max_num_seqs: int
    max_num_batched_tokens: int
    max_trajectories: int
    run_idle_timeout_s: float
    critic_version: int
    def __init__(self, model: _Optional[str] = ..., policy_version: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., max_n: _Optional[int] = ..., max_prompts: _Optional[int] = ..., critic: _Optional[str] = ..., critic_fallback: _Optional[str] = ..., default_stop_rule: _Optional[str] = ..., rule_defaults: _Optional[_Mapping[str, float]] = ..., entropy_top_k: _Optional[int] = ..., state: _Optional[_Union[EspoState, _Mapping]] = ..., verifier: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_trajectories: _Optional[int] = ..., run_idle_timeout_s: _Optional[float] = ..., critic_version: _Optional[int] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("run_id", "open", "carried_groups", "carried_trajectories", "running", "aborted", "calls", "idle_timeout_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CARRIED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    CARRIED_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    open: bool
    carried_groups: int
    carried_trajectories: int
    running: int
    aborted: int
    calls: int
    idle_timeout_s: float
    def __init__(self, run_id: _Optional[str] = ..., open: _Optional[bool] = ..., carried_groups: _Optional[int] = ..., carried_trajectories: _Optional[int] = ..., running: _Optional[int] = ..., aborted: _Optional[int] = ..., calls: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ...) -> None: ...
