"""The rollout service: what the transports hold (HTTP and OpenAI routes, gRPC), and how its parts fit.

    RolloutRequest --plan.py--> CallPlan --call.py--> samples (sample.py) --fold.py--> RolloutResponse
                                              \\--> events.py: what a call streams, every transport encodes
    admin.py      the ESPO state, weight pushes, runs, info, readiness
    admission.py  the load (calls, samples in flight), what is refused, the drain on SIGTERM

The parts share the server-owned ESPO state (ledger.py), the runs that carry samples between calls
(runs.py), the answers of finished calls (idempotency.py) and the admission. Nothing here knows
HTTP: errors are `errors.ServiceError`s, answers are protocol models.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from espo_client.protocol import (
    CriticWeightsResponse,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    RunRequest,
    RunResponse,
    StateResponse,
    WeightsResponse,
)
from espo_client.stop_rule import EspoState

from . import metrics
from .admin import Admin
from .admission import Admission
from .call import Calls
from .config import ServerConfig
from .critic import CriticClient
from .critic_batcher import CriticBatcher
from .engine import Engine
from .events import CallEvent, answer
from .idempotency import IdempotencyCache
from .ledger import StateLedger
from .plan import CallPlan, Planner, TextCodec, Verifier
from .runs import RunRegistry
from .sample import CriticAccess


class RolloutService:
    """One server's rollout calls and administration, over its engine and critic."""

    def __init__(
        self,
        engine: Engine,
        critic: CriticClient | None,
        config: ServerConfig,
        verifier: Verifier | None = None,
    ) -> None:
        self.engine = engine
        self.critic = critic
        self.config = config
        self.text = TextCodec(engine.tokenizer)
        self.ledger = StateLedger(config.rule_defaults(), config.initial_state)
        self.runs = RunRegistry(config.run_idle_timeout_s)
        self.idempotency = IdempotencyCache(
            config.idempotency_cache, int(config.idempotency_cache_mb * 2**20), config.idempotency_ttl_s
        )
        self.admission = Admission(engine, config.max_inflight_trajectories)
        # Every critic query of every sample goes through one batcher.
        self.critic_batcher = (
            CriticBatcher(
                critic,
                timeout_s=config.critic_timeout_s,
                window_s=config.critic_batch_window_ms / 1000,
                window_steps=config.critic_batch_window_steps,
                max_batch=config.critic_max_batch,
                max_in_flight=config.critic_batches_in_flight,
            )
            if critic
            else None
        )
        shared = {"ledger": self.ledger, "runs": self.runs, "admission": self.admission}
        self.admin = Admin(engine, critic, config, **shared)
        self.planner = Planner(
            engine,
            config,
            has_critic=critic is not None,
            text=self.text,
            verifier=verifier,
            idempotency=self.idempotency,
            **shared,
        )
        self.calls = Calls(
            engine,
            config,
            planner=self.planner,
            critic=CriticAccess(self.critic_batcher, config.critic_fallback) if self.critic_batcher else None,
            text=self.text,
            idempotency=self.idempotency,
            publish=self.admin.publish,
            **shared,
        )
        self.admin.publish()

    async def aclose(self) -> None:
        """Shutdown: the runs' carried samples are aborted (calls are cancelled by their transports),
        then the critic batches still in flight stop."""
        await self.runs.aclose()
        if self.critic_batcher is not None:
            await self.critic_batcher.aclose()

    # ------------------------------------------------------------------ calls

    def plan(self, request: RolloutRequest) -> CallPlan:
        """Check a request (InvalidRequest naming the field); no side effects."""
        return self.planner.plan(request)

    def stream(self, plan: CallPlan) -> AsyncIterator[CallEvent]:
        """Run a planned call: its events as they happen, the answer last."""
        return self.calls.stream(plan)

    async def rollouts(self, request: RolloutRequest) -> RolloutResponse:
        """Run a whole call and return every trajectory. A retry with a known request_id gets the
        first call's answer (or waits for it), never a second batch of samples."""
        return await answer(self.stream(self.plan(request)))

    # ------------------------------------------------------------------ admission

    def check_alive(self) -> None:
        self.admission.check_alive()

    async def drain(self, grace_s: float) -> int:
        return await self.admission.drain(grace_s)

    def cut_calls(self) -> None:
        self.admission.cut_calls()

    def fail_calls(self) -> None:
        self.admission.fail_calls()

    # ------------------------------------------------------------------ admin

    def state(self) -> StateResponse:
        return self.admin.state()

    def set_state(self, state: EspoState) -> StateResponse:
        return self.admin.set_state(state)

    def commit(self, batch_id: str | None) -> StateResponse:
        return self.admin.commit(batch_id)

    @metrics.timed_push("policy", "path")
    async def load_weights(self, path: str, version: int | None) -> WeightsResponse:
        return await self.admin.load_weights(path, version)

    @metrics.timed_push("critic", "path")
    async def load_critic_weights(self, path: str, version: int | None) -> CriticWeightsResponse:
        return await self.admin.load_critic_weights(path, version)

    @metrics.timed_push("policy", "upload")
    async def serve_weights(self, path: str | Path, version: int | None) -> WeightsResponse:
        """The policy weights in a directory of this server's (an upload's staging): `Admin`."""
        self.admin.check_not_joining()
        return await self.admin.serve_weights(path, version)

    @metrics.timed_push("critic", "upload")
    async def update_critic(self, load: Callable[[], Awaitable[tuple[int, float]]]) -> CriticWeightsResponse:
        """New critic weights by `load()` (an upload's), under the push gate: `Admin`."""
        self.admin.check_not_joining()
        return await self.admin.update_critic(load)

    def open_run(self, body: RunRequest) -> RunResponse:
        return self.admin.open_run(body)

    def run(self, run_id: str) -> RunResponse:
        return self.admin.run(run_id)

    async def close_run(self, run_id: str) -> RunResponse:
        return await self.admin.close_run(run_id)

    def info(self) -> InfoResponse:
        return self.admin.info()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        return await self.admin.readiness()
