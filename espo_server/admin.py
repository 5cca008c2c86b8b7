"""The server's other verbs, beside rollout calls: the ESPO state and its batches, policy and
critic weight pushes, runs, info and readiness.

A weight push (policy or critic) waits for the running calls and holds new ones back (the engine's
gate), so that every token and every critic query of a call sees one version; the samples runs
carry between calls are suspended meanwhile and resume under the new weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from espo_client.protocol import (
    CriticWeightsResponse,
    InfoResponse,
    RunRequest,
    RunResponse,
    StateResponse,
    WeightsResponse,
)
from espo_client.stop_rule import EspoState

from . import metrics
from .admission import Admission
from .config import ServerConfig
from .critic import CriticClient, CriticError, counted_critic_load
from .critic_engine import InProcessCritic
from .engine import Engine
from .errors import InvalidRequest, ServiceError
from .ledger import StateLedger
from .runs import RunRegistry
from .weights import allowed_weights_dir, check_checkpoint

log = logging.getLogger(__name__)


@dataclass
class JoinStatus:
    """Where joining a peer stands (`--join`, join.py): the server is not ready until `done`."""

    detail: str
    done: bool = False


class Admin:
    """State, weights, runs, info and readiness of one server."""

    def __init__(
        self,
        engine: Engine,
        critic: CriticClient | None,
        config: ServerConfig,
        *,
        ledger: StateLedger,
        runs: RunRegistry,
        admission: Admission,
    ) -> None:
        self.engine = engine
        self.critic = critic
        self.config = config
        self.ledger = ledger
        self.runs = runs
        self.admission = admission
        self.join: JoinStatus | None = None
        """Set while (and after) this server joins a peer (`--join`); None: it joins none."""

    def publish(self) -> None:
        """The state and the versions serving, as metrics."""
        metrics.set_state_gauges(self.ledger.state)
        metrics.POLICY_VERSION.set(self.engine.policy_version)
        if self.critic is not None:
            version = getattr(self.critic, "version", None)
            metrics.CRITIC_VERSION.set(-1 if version is None else version)

    # ------------------------------------------------------------------ the ESPO state

    def state(self) -> StateResponse:
        batch = self.ledger.open
        return StateResponse(
            state=self.ledger.state,
            open_batch_id=batch.batch_id if batch else None,
            open_batch_calls=batch.calls if batch else 0,
        )

    def set_state(self, state: EspoState) -> StateResponse:
        self.ledger.set(state)
        self.publish()
        return self.state()

    def commit(self, batch_id: str | None) -> StateResponse:
        self.ledger.commit(batch_id)
        self.publish()
        return self.state()

    # ------------------------------------------------------------------ weights

    def check_not_joining(self) -> None:
        """A learner's push while this server joins a peer (`--join`) would be overwritten by the
        peer's copy, loaded after it: 503 until the join is done (the join's own loads pass)."""
        if self.join is not None and not self.join.done:
            error = ServiceError(
                f"this server is joining a peer ({self.join.detail}): a push now would be overwritten "
                "by the peer's weights; push again once /readyz is 200 (the Service sends pushes only "
                "to ready replicas)"
            )
            error.retry_after_s = 5.0
            raise error

    async def load_weights(self, path: str, version: int | None) -> WeightsResponse:
        """A push by path: `serve_weights` of a directory inside --weights-dir."""
        self.check_not_joining()
        self.admission.check_new_work()
        allowed_weights_dir(path, self.config.weights_dir)
        return await self.serve_weights(path, version)

    async def serve_weights(self, path: str | Path, version: int | None) -> WeightsResponse:
        """Reload the policy in place from a directory of this server's (--weights-dir, or an
        upload's staging) once the running calls have ended (new calls wait). Samples that runs
        carry between calls are suspended meanwhile and resume under the new weights."""
        self.admission.check_new_work()
        path = str(path)
        directory = Path(path)
        try:
            usable = directory.is_dir() and any(directory.glob("*.safetensors"))
        except OSError:  # a name too long, a directory it may not read
            usable = False
        if not usable:
            raise InvalidRequest(f"{path} is not a directory with *.safetensors files on the server", "path")
        # a broken checkpoint would take the engine down (read apart: a tied model's may be compared)
        await asyncio.to_thread(check_checkpoint, directory, self.engine.model)
        async with self.engine.gate.exclusive(), self._carried_suspended():
            new_version = self.engine.policy_version + 1 if version is None else version
            try:
                seconds = await self.engine.reload_weights(path, new_version)
            except Exception:
                metrics.WEIGHT_LOADS.labels(outcome="error").inc()
                raise
        metrics.WEIGHT_LOADS.labels(outcome="ok").inc()
        self.publish()
        return WeightsResponse(policy_version=new_version, load_time_s=round(seconds, 4))

    async def load_critic_weights(self, path: str, version: int | None) -> CriticWeightsResponse:
        """A critic push by path. An in-process critic loads only from --weights-dir; a remote
        critic (`espo-server critic`) gets the push forwarded and checks the directory itself."""
        self.check_not_joining()
        critic = self._pushable_critic()
        if isinstance(critic, InProcessCritic):
            allowed_weights_dir(path, self.config.weights_dir)
        return await self.update_critic(lambda: critic.load_weights(path, version))

    async def update_critic(self, load: Callable[[], Awaitable[tuple[int, float]]]) -> CriticWeightsResponse:
        """Serve new critic weights, `load()` (which returns the version and the seconds it took):
        like a policy push, it waits for the running calls and holds new ones back, so every query
        of a call is judged by one critic version; the samples runs carry are suspended meanwhile."""
        self._pushable_critic()
        async with self.engine.gate.exclusive(), self._carried_suspended():
            new_version, seconds = await counted_critic_load(load())
        self.publish()
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

    # ------------------------------------------------------------------ runs

    def open_run(self, body: RunRequest) -> RunResponse:
        self.admission.check_new_work()
        return self.runs.open(body.run_id)

    def run(self, run_id: str) -> RunResponse:
        return self.runs.describe(run_id)

    async def close_run(self, run_id: str) -> RunResponse:
        return await self.runs.close(run_id)

    # ------------------------------------------------------------------ info, readiness

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
            rule_defaults=asdict(cfg.rule_defaults()),
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
        if self.admission.draining:
            detail["server"] = "shutting down (SIGTERM): draining the running calls"
        joined = self.join is None or self.join.done
        if self.join is not None:
            detail["join"] = self.join.detail
        return detail["engine"] == "ok" and not self.admission.draining and joined, detail
