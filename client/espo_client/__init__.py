"""espo-client: wire protocol, stop-rule maths and client SDK for the ESPO rollout server.

    from espo_client import EspoClient

    with EspoClient(base_url="http://rollouts:8000") as client:
        response = client.rollouts(prompts=[[1, 2, 3]], n=4, stop_rule="espo")
        client.upload_weights(model)    # new policy weights, streamed from a torch module in memory

Several replicas (prompts sharded over them, state-changing calls broadcast): `Replicas` and
`AsyncReplicas`, from `espo_client.replicas`.

The gRPC API: `espo_client.grpc_client.GrpcEspoClient` (needs the `grpc` extra). The OpenAI-compatible
API's models, ESPO's `EspoChoice` extension among them: `espo_client.openai_protocol`.

Learner helpers (GAE with absorbing failure states, EGAE, state updates) are in `espo_client.learner`
(needs the `torch` extra); Entropy-ESPO in `espo_client.entropy_espo` (`topk_entropy` is numpy-only).
"""

from . import protocol, stop_rule
from ._client import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    AsyncEspoClient,
    AsyncRolloutStream,
    EspoClient,
    RolloutStream,
)
from ._exceptions import (
    APIStatusError,
    BadRequestError,
    BroadcastError,
    ConflictError,
    ConnectError,
    EspoError,
    RateLimitError,
    RequestTimeoutError,
    ResponseValidationError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
    TransportError,
)
from .protocol import Prompt, RolloutRequest, RolloutResponse, Trajectory, Usage
from .replicas import AsyncReplicas, Replicas
from .stop_rule import BatchStats, EspoParams, StopRule, update_state

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "APIStatusError",
    "AsyncEspoClient",
    "AsyncReplicas",
    "AsyncRolloutStream",
    "BadRequestError",
    "BatchStats",
    "BroadcastError",
    "ConflictError",
    "ConnectError",
    "EspoClient",
    "EspoError",
    "EspoParams",
    "Prompt",
    "RateLimitError",
    "Replicas",
    "RequestTimeoutError",
    "ResponseValidationError",
    "RolloutRequest",
    "RolloutResponse",
    "RolloutStream",
    "ServerError",
    "ServiceUnavailableError",
    "StopRule",
    "StreamError",
    "Trajectory",
    "TransportError",
    "Usage",
    "protocol",
    "stop_rule",
    "update_state",
]
