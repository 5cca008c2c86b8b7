"""Soak: many concurrent SDK clients against one server for minutes; nothing lost, nothing twice.

Starts (unless given `--url`) an `espo-server critic` and an `espo-server serve` on seeded random
tiny models (`make-tiny-model`, the fastest engine there is), on loopback only, with a small
`--max-inflight-trajectories` so that backpressure (429) happens. Then `--clients` clients, half
`EspoClient` (sync, each call in a worker thread) and half `AsyncEspoClient`, call it until
`--seconds` have passed, each picking at random:

  call        one call: a rule of none / espo / regret_only / random (learner-owned warm state or
              the server's), 1-3 prompts, n 1-4, streamed or not, sometimes with a deadline
  replay      a call, then the same request_id and body again: must be the same answer
  conflict    a finished request_id with another body: must be a 409 (nothing stored)
  timeout     a call with a 0.3 s read timeout (long, rule none), retried with the same
              request_id until it succeeds: the server cancels the abandoned call, the retry runs it
  abandon     a streamed call closed after its first trajectory, then retried with its request_id
  run         a run (POST /v1/runs): 2-3 calls with return_groups=1 and leftover=carry, then a last
              call that takes back every carried group, then DELETE

(each client runs every scenario once first, in its own order, even past `--seconds`, then draws at
random), and a pusher loads the two policies' weights in turn every `--push-every` seconds (from the
server's --weights-dir), or, with `--push-every-calls N`, the client that finishes every N-th scenario
pushes. Pushes are made by upload (`upload_weights`: the checkpoint's tensors streamed over
/v1/weights/uploads, its config.json sent) and by path (POST /v1/weights) in turn, the first by upload.
`--seconds 0 --push-every-calls N` is a workload of a fixed size, whatever the machine's speed.
A 429 is retried after its Retry-After with the same request_id.

Checks (the exit status is 1 if one fails):
  - every trajectory is delivered exactly once: counted by (request_id that started it, prompt
    index, sample index) over the distinct answered calls (replays are compared, not counted), and
    every sample of every answered call was delivered (carried ones in a later call of the run)
  - /metrics (parsed with prometheus_client's parser) moved by exactly the sums the clients saw:
    trajectories, generated tokens, stops, critic calls, calls answered, weight loads, and the
    pushes by path and by upload apart (espo_weight_push_seconds_count{model=policy,source})
  - no 5xx answer at all, and no error other than the intended ones (429, 409, client timeouts)
  - the RSS of the server process, and of each engine's process tree, grew by less than
    `--rss-budget-mb` from the end of the warm-up (`--warmup` s, at most a quarter of the run) to
    the end

The memory curve: every `--rss-every-s` seconds, the RSS (MiB) of the server process itself, of
the policy engine's process tree (the server's oldest VLLM::EngineCore child and its children: the
CPU worker, unless ESPO_CPU_WORKER=inline runs it inside the EngineCore) and of the critic
engine's (an in-process critic's: the server's second EngineCore; a remote one's: that of the
critic server, `--critic-pid` with `--url`), into the JSON (`rss_curve`). Printed at the end: the
curve, one line per 5 minutes (about 10 lines for a run under 25 minutes), and per series the RSS
at the end of the warm-up, the plateau (the median of the samples of the last third of the run),
the end, the max, and the growth over the last half (end minus the sample at half the run): near
zero when memory has flattened.

Prints a summary table and writes `--out` (JSON).

    .venv/bin/python -m bench.soak                                  # 8 clients, 5 minutes
    .venv/bin/python -m bench.soak --clients 4 --seconds 90 --rss-every-s 10   # a quick look
    make soak               # 30 minutes (--seconds 1800), pushes every 20 s, RSS every 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import harness
from bench.harness import Metrics
from espo_client import (
    APIStatusError,
    AsyncEspoClient,
    ConnectError,
    EspoClient,
    EspoError,
    RequestTimeoutError,
    RolloutResponse,
    StreamError,
)
from espo_server.process import ServerProcess

# A learner-owned state that makes espo and regret_only stop readily on the random tiny policy.
EAGER = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}
RULES = ("none", "espo", "regret_only", "random")
INTENDED = {"429", "409", "client_timeout", "abandoned"}
"""Error kinds the workload provokes on purpose."""

WATCHED = {  # /metrics series compared with the clients' sums: key -> (series, labels, Tally field)
    "espo_trajectories_total": ("espo_trajectories_total", {}, "trajectories"),
    "espo_generated_tokens_total": ("espo_generated_tokens_total", {}, "tokens"),
    "espo_stopped_trajectories_total": ("espo_stopped_trajectories_total", {}, "stopped"),
    "espo_critic_calls_total": ("espo_critic_calls_total", {}, "critic_calls"),
    "espo_rollout_requests_total": ("espo_rollout_requests_total", {"outcome": "ok"}, "answered"),
    "espo_weight_loads_total": ("espo_weight_loads_total", {"outcome": "ok"}, "pushes"),
    "espo_weight_push_seconds_count{source=path}": (
        "espo_weight_push_seconds_count",
        {"model": "policy", "source": "path"},
        "pushes_by_path",
    ),
    "espo_weight_push_seconds_count{source=upload}": (
        "espo_weight_push_seconds_count",
        {"model": "policy", "source": "upload"},
        "pushes_by_upload",
    ),
}


# --------------------------------------------------------------------------------------------- tally


@dataclasses.dataclass
class Tally:
    """What the clients saw. Thread-safe (the sync clients run in worker threads)."""

    answers: dict[str, RolloutResponse] = dataclasses.field(default_factory=dict)
    """The first answer of every distinct answered call, by request_id."""
    bodies: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Their bodies (for the report of a trajectory lost or delivered twice)."""
    delivered: Counter = dataclasses.field(default_factory=Counter)
    """(starting request_id, prompt index, sample index) -> times delivered."""
    expected: set = dataclasses.field(default_factory=set)
    """Every sample of every answered call."""
    kinds: Counter = dataclasses.field(default_factory=Counter)
    """Scenarios run."""
    errors: Counter = dataclasses.field(default_factory=Counter)
    """Errors seen, by kind (status code, or a name)."""
    error_samples: dict[str, str] = dataclasses.field(default_factory=dict)
    end_reasons: Counter = dataclasses.field(default_factory=Counter)
    trajectories: int = 0
    tokens: int = 0
    stopped: int = 0
    critic_calls: int = 0
    critic_errors: int = 0
    flagged: int = 0
    """Trajectories with critic_error set."""
    answered: int = 0
    replays: int = 0
    replay_mismatches: int = 0
    pushes_by_path: int = 0
    pushes_by_upload: int = 0
    push_tries: int = 0
    """Pushes begun (each one's version: 1000 + its number)."""
    runs_closed_with_leftovers: int = 0
    calls_given_up: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def answer(self, rid: str, body: dict, response: RolloutResponse, stream: bool = False) -> None:
        with self.lock:
            first = self.answers.get(rid)
            if first is not None:  # a replay: the same answer again, not new trajectories
                self.replays += 1
                if _fingerprint(first) != _fingerprint(response):
                    self.replay_mismatches += 1
                return
            self.answers[rid] = response
            self.bodies[rid] = {k: v for k, v in body.items() if k != "prompts"} | {
                "prompts": len(body.get("prompts", [])),
                "streamed": stream,
            }
            self.answered += 1
            for p in range(len(body.get("prompts", []))):
                for s in range(body.get("n", 1)):
                    self.expected.add((rid, p, s))
            for t in response.trajectories:
                origin = t.carried.request_id if t.carried is not None else rid
                self.delivered[(origin, t.prompt_index, t.sample_index)] += 1
                self.end_reasons[t.end_reason] += 1
                self.flagged += t.critic_error
            usage = response.usage
            self.trajectories += usage.trajectories
            self.tokens += usage.generated_tokens
            self.stopped += usage.stopped
            self.critic_calls += usage.critic_calls
            self.critic_errors += usage.critic_errors

    @property
    def pushes(self) -> int:
        return self.pushes_by_path + self.pushes_by_upload

    def error(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.error_samples.setdefault(kind, str(exc)[:300])

    def lost_or_twice(self) -> tuple[list, list]:
        lost = sorted(k for k in self.expected if self.delivered[k] == 0)
        twice = sorted(k for k, n in self.delivered.items() if n != 1 or k not in self.expected)
        return lost, twice

    def explain(self, key: tuple) -> dict:
        """What is known of a trajectory lost or delivered twice: its call's body and answer."""
        rid = key[0]
        response = self.answers.get(rid)
        sent = response.trajectories if response is not None else []
        return {
            "key": list(key),
            "delivered": self.delivered[key],
            "expected": key in self.expected,
            "body": self.bodies.get(rid),
            "answer": [
                (t.prompt_index, t.sample_index, t.end_reason, len(t.token_ids)) for t in sent
            ],
            "delivered_in": sorted(
                other for other, r in self.answers.items()
                if any(t.carried is not None and t.carried.request_id == rid for t in r.trajectories)
            ),
        }  # fmt: skip


def _fingerprint(response: RolloutResponse) -> list:
    origin = response.request_id
    return sorted(
        (t.carried.request_id if t.carried else origin, t.prompt_index, t.sample_index, t.end_reason,
         tuple(t.token_ids))
        for t in response.trajectories
    )  # fmt: skip


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, APIStatusError):
        return str(exc.status_code)
    if isinstance(exc, StreamError):
        return f"stream_{exc.code}" if exc.code else "stream_broken"
    if isinstance(exc, RequestTimeoutError):
        return "client_timeout"
    if isinstance(exc, ConnectError):
        return "connect"
    return type(exc).__name__


# --------------------------------------------------------------------------------------------- clients


class Api:
    """One SDK client, sync or async, behind one awaitable interface (sync calls go to a thread)."""

    def __init__(self, url: str, sync: bool, api_key: str | None) -> None:
        self.sync = sync
        short = httpx.Timeout(10.0, read=0.3)
        if sync:
            self.client: Any = EspoClient(base_url=url, api_key=api_key)
            self.impatient: Any = EspoClient(base_url=url, api_key=api_key, timeout=short, max_retries=0)
        else:
            self.client = AsyncEspoClient(base_url=url, api_key=api_key)
            self.impatient = AsyncEspoClient(base_url=url, api_key=api_key, timeout=short, max_retries=0)

    async def _do(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.sync:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await fn(*args, **kwargs)

    async def rollouts(self, body: dict, impatient: bool = False) -> RolloutResponse:
        client = self.impatient if impatient else self.client
        return await self._do(client.rollouts, **body)

    async def stream(self, body: dict, limit: int | None = None) -> RolloutResponse | None:
        """A streamed call; with `limit`, closed after that many trajectories (None returned)."""
        if self.sync:
            return await asyncio.to_thread(self._stream_sync, body, limit)
        async with self.client.stream_rollouts(**body) as stream:
            async for _ in stream:
                if limit is not None:
                    limit -= 1
                    if limit <= 0:
                        return None
        return stream.response

    def _stream_sync(self, body: dict, limit: int | None) -> RolloutResponse | None:
        with self.client.stream_rollouts(**body) as stream:
            for _ in stream:
                if limit is not None:
                    limit -= 1
                    if limit <= 0:
                        return None
        return stream.response

    async def open_run(self) -> str:
        return (await self._do(self.client.open_run)).run_id

    async def close_run(self, run_id: str) -> Any:
        return await self._do(self.client.close_run, run_id)

    async def load_weights(self, path: str, version: int) -> Any:
        return await self._do(self.client.load_weights, path, version)

    async def upload_weights(self, path: str, version: int) -> Any:
        """The checkpoint in `path` pushed by upload: its tensors streamed as shards (the upload
        routes), its config.json sent for the architecture check."""
        weights, config = _checkpoint(path)
        return await self._do(self.client.upload_weights, weights, version=version, config=config)

    async def aclose(self) -> None:
        for client in (self.client, self.impatient):
            if self.sync:
                client.close()
            else:
                await client.aclose()


@dataclasses.dataclass
class Workload:
    url: str
    clients: int
    seconds: float
    weights: list[str]
    push_every_s: float
    seed: int = 0
    push_every_calls: int = 0
    """If set: a weight push after every this many scenarios finished (instead of every push_every_s)."""
    api_key: str | None = None
    push_kinds: tuple[str, ...] = ("path",)
    """How pushes are made, in turn: "path" (POST /v1/weights), "upload" (/v1/weights/uploads)."""
    rules: tuple[str, ...] = RULES
    scenarios: tuple[str, ...] = ("call", "call", "call", "replay", "conflict", "timeout", "abandon", "run")
    tally: Tally = dataclasses.field(default_factory=Tally)
    on_tick: Callable[[float], None] | None = None
    """Called about every second with the seconds elapsed (faults.py injects faults from it)."""
    _finished: int = dataclasses.field(default=0, init=False)
    """Scenarios finished, by all clients."""

    async def run(self) -> Tally:
        # The sync clients' calls run in worker threads: one each, and the pusher's.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=self.clients + 4))
        stop_at = time.monotonic() + self.seconds
        apis = [Api(self.url, sync=i % 2 == 0, api_key=self.api_key) for i in range(self.clients)]
        try:
            tasks = [self._client(i, api, stop_at) for i, api in enumerate(apis)]
            if self.weights and self.push_every_s > 0 and not self.push_every_calls:
                tasks.append(self._pusher(apis[0], stop_at))
            tasks.append(self._ticker(stop_at))
            await asyncio.gather(*tasks)
            if self.push_every_calls and self.tally.pushes % len(self.weights or [None]):
                await self._push(apis[0], self.weights[0])  # leave the first weights served
        finally:
            for api in apis:
                await api.aclose()
        return self.tally

    async def _ticker(self, stop_at: float) -> None:
        started = time.monotonic()
        while time.monotonic() < stop_at:
            await asyncio.sleep(1.0)
            if self.on_tick is not None:
                self.on_tick(time.monotonic() - started)

    async def _pusher(self, api: Api, stop_at: float) -> None:
        for k in itertools.count(1):
            await asyncio.sleep(self.push_every_s)
            if time.monotonic() >= stop_at:
                break
            await self._push(api, self.weights[k % len(self.weights)])
        if self.tally.pushes % len(self.weights):  # leave the first weights served, as they were
            await self._push(api, self.weights[0])

    async def _push(self, api: Api, path: str) -> None:
        """A push of `path`'s weights, made as `push_kinds` say in turn."""
        with self.tally.lock:
            version = 1000 + self.tally.push_tries
            by_upload = self.push_kinds[self.tally.push_tries % len(self.push_kinds)] == "upload"
            self.tally.push_tries += 1
        try:
            if by_upload:
                await api.upload_weights(path, version)
            else:
                await api.load_weights(path, version)
            with self.tally.lock:
                if by_upload:
                    self.tally.pushes_by_upload += 1
                else:
                    self.tally.pushes_by_path += 1
        except EspoError as exc:
            self.tally.error(f"push_{error_kind(exc)}", exc)

    async def _client(self, index: int, api: Api, stop_at: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        distinct = list(dict.fromkeys(self.scenarios))
        first = distinct[index % len(distinct) :] + distinct[: index % len(distinct)]  # each once first
        while first or time.monotonic() < stop_at:
            kind = first.pop(0) if first else rng.choice(self.scenarios)
            with self.tally.lock:
                self.tally.kinds[kind] += 1
            try:
                await getattr(self, f"_{kind}")(api, rng)
            except EspoError as exc:  # an unintended failure: counted, the client goes on
                self.tally.error(error_kind(exc), exc)
            self._finished += 1  # (the clients' loops share one event loop)
            every = self.push_every_calls
            if self.weights and every and self._finished % every == 0:
                await self._push(api, self.weights[(self._finished // every) % len(self.weights)])

    # --- the scenarios ---------------------------------------------------------------------------

    def _body(self, rng: random.Random, **over: Any) -> dict:
        rule = rng.choice(self.rules)
        body: dict = {
            "prompts": [
                [rng.randrange(4, 50) for _ in range(rng.randint(2, 8))] for _ in range(rng.randint(1, 3))
            ],
            "n": rng.randint(1, 4),
            "max_tokens": rng.choice((16, 32, 64, 96)),
            "seed": rng.randrange(1 << 30),
            "stop_rule": rule,
        }
        if rule in ("espo", "regret_only") and rng.random() < 0.8:
            body["state"] = EAGER
        if rule == "random":
            body["rule_params"] = {"random_rate": 0.5}
        if rng.random() < 0.15:
            body["deadline_s"] = rng.choice((0.2, 1.0))
        body.update(over)
        return body

    async def _answer(
        self, api: Api, body: dict, *, stream: bool = False, impatient: bool = False
    ) -> RolloutResponse:
        """Call until answered: a 429 waits for its Retry-After, a client timeout (or a dropped
        connection) retries with the same request_id; anything else is raised."""
        for _ in range(200):
            try:
                if stream:
                    response = await api.stream(body)
                else:
                    response = await api.rollouts(body, impatient=impatient)
                assert response is not None
                self.tally.answer(body["request_id"], body, response, stream)
                return response
            except APIStatusError as exc:
                if exc.status_code != 429:
                    raise
                self.tally.error("429", exc)
                await asyncio.sleep(float(exc.response.headers.get("retry-after", "1")))
            except (RequestTimeoutError, ConnectError) as exc:
                self.tally.error(error_kind(exc), exc)
                impatient = False  # the retry waits as long as it takes
        with self.tally.lock:
            self.tally.calls_given_up += 1
        raise RuntimeError(f"call {body['request_id']} never answered")

    async def _call(self, api: Api, rng: random.Random) -> None:
        body = self._body(rng, request_id=_rid("call"))
        await self._answer(api, body, stream=rng.random() < 0.4)

    async def _replay(self, api: Api, rng: random.Random) -> None:
        body = self._body(rng, request_id=_rid("replay"))
        await self._answer(api, body, stream=rng.random() < 0.5)
        await self._answer(api, body, stream=rng.random() < 0.5)  # the same answer again

    async def _conflict(self, api: Api, rng: random.Random) -> None:
        body = self._body(rng, request_id=_rid("conflict"))
        await self._answer(api, body)
        try:
            await api.rollouts({**body, "seed": body["seed"] + 1})
        except APIStatusError as exc:
            if exc.status_code != 409:
                raise
            self.tally.error("409", exc)
        else:
            self.tally.error("conflict_not_refused", RuntimeError(body["request_id"]))

    async def _timeout(self, api: Api, rng: random.Random) -> None:
        body = self._body(
            rng,
            request_id=_rid("timeout"),
            stop_rule="none",
            max_tokens=400,
            ignore_eos=True,
            n=rng.randint(2, 4),
        )
        body.pop("state", None), body.pop("rule_params", None), body.pop("deadline_s", None)
        await self._answer(api, body, impatient=True)

    async def _abandon(self, api: Api, rng: random.Random) -> None:
        body = self._body(rng, request_id=_rid("abandon"), stop_rule="none", max_tokens=300, n=4)
        body.pop("state", None), body.pop("rule_params", None), body.pop("deadline_s", None)
        try:
            if await api.stream(body, limit=1) is not None:
                return  # it ended before its first trajectory was read
            self.tally.error("abandoned", RuntimeError("closed after one trajectory"))
        except APIStatusError as exc:
            if exc.status_code != 429:
                raise
            self.tally.error("429", exc)
        await self._answer(api, body)  # the retry: whatever the first call did, delivered once

    async def _run(self, api: Api, rng: random.Random) -> None:
        run_id = await api.open_run()
        for _ in range(rng.randint(2, 3)):
            prompts = [[rng.randrange(4, 50) for _ in range(4)] for _ in range(3)]
            body = self._body(
                rng, request_id=_rid("run"), run_id=run_id, return_groups=1, leftover="carry", prompts=prompts
            )
            body.pop("deadline_s", None)
            impatient = body["stop_rule"] == "none" and rng.random() < 0.3
            await self._answer(api, body, stream=not impatient and rng.random() < 0.4, impatient=impatient)
        # The last call takes back every group still carried.
        last = {"request_id": _rid("run-last"), "prompts": [], "run_id": run_id}
        await self._answer(api, last)
        closed = await api.close_run(run_id)
        if closed.aborted:
            with self.tally.lock:
                self.tally.runs_closed_with_leftovers += 1


def _checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors (name -> tensor) and the HF config of a checkpoint directory."""
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        weights |= load_file(file)
    return weights, json.loads((Path(path) / "config.json").read_text())


def _rid(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------------------------- server side


SERIES = ("server", "policy_engine", "critic_engine")
"""The RSS curve's series: the server process itself, and each engine's whole process tree."""


class RssWatch:
    """RSS every `interval` s, in MiB: the server process `pid` itself, and each engine's process
    tree (a VLLM::EngineCore child and its own children: the CPU worker unless
    ESPO_CPU_WORKER=inline). The policy engine is the server's oldest EngineCore (it starts before an
    in-process critic's, the second one); a remote critic's engine is that of `critic_pid`."""

    def __init__(self, pid: int, critic_pid: int | None = None, interval: float = 2.0) -> None:
        self.proc = psutil.Process(pid)
        self.critic = psutil.Process(critic_pid) if critic_pid is not None else None
        self.interval = interval
        self.samples: list[dict[str, float]] = []  # {"t": s, "server": MiB, "policy_engine": MiB, ...}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._started = time.monotonic()

    def _sample(self) -> dict[str, float]:
        sample = {"server": _mib(self.proc.memory_info().rss)}
        engines = _engine_trees(self.proc)
        if self.critic is not None:
            engines = engines[:1] + _engine_trees(self.critic)[:1]
        for name, tree in zip(SERIES[1:], engines, strict=False):
            sample[name] = _mib(sum(_rss(p) for p in tree))
        return sample

    def _loop(self) -> None:
        self._started = time.monotonic()
        while not self._stop.is_set() and self.take():
            self._stop.wait(self.interval)

    def take(self) -> bool:
        """One sample now (False if the server is gone)."""
        try:
            self.samples.append({"t": round(time.monotonic() - self._started, 1)} | self._sample())
        except psutil.Error:
            return False
        return True

    def start(self) -> RssWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def at(self, t: float) -> dict[str, float]:
        """The first sample at or after `t` seconds (the last one if none)."""
        return next((s for s in self.samples if s["t"] >= t), self.samples[-1] if self.samples else {})

    def summary(self, warm: float) -> dict[str, dict[str, float]]:
        """Per series: at the end of the warm-up, the plateau (the median of the samples of the
        last third of the run), the end, the max, the growth from warm-up end to end and over the
        last half (end minus the sample at half the run's time)."""
        if not self.samples:
            return {}
        last = self.samples[-1]["t"]
        tail = [s for s in self.samples if s["t"] >= last * 2 / 3]
        out = {}
        for name in SERIES:
            if not any(name in s for s in self.samples):
                continue
            values = [s.get(name, 0.0) for s in self.samples]
            start, half, end = self.at(warm).get(name, 0.0), self.at(last / 2).get(name, 0.0), values[-1]
            out[name] = {
                "warmup_end": round(start, 1),
                "plateau": round(statistics.median(s.get(name, 0.0) for s in tail), 1),
                "end": round(end, 1),
                "max": round(max(values), 1),
                "growth": round(end - start, 1),
                "growth_last_half": round(end - half, 1),
            }
        return out


def _engine_trees(proc: psutil.Process) -> list[list[psutil.Process]]:
    """The process trees of `proc`'s VLLM::EngineCore descendants, oldest first."""
    return [[core, *_children(core)] for core in harness.engine_cores(proc)]


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0  # ended meanwhile


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def curve(samples: list[dict[str, float]], step: float) -> list[dict[str, float]]:
    """The samples thinned to about one per `step` seconds (the first, then each first one at least
    `step` after the one before, and the last)."""
    out: list[dict[str, float]] = []
    for s in samples:
        if not out or s["t"] >= out[-1]["t"] + step or s is samples[-1]:
            out.append(s)
    return out


@dataclasses.dataclass
class Servers:
    """The soak's own critic and rollout server on tiny models (loopback), stopped on exit."""

    work: Path
    max_inflight: int = 64
    extra: tuple[str, ...] = ()
    critic: ServerProcess | None = None
    server: ServerProcess | None = None
    weights: list[str] = dataclasses.field(default_factory=list)

    def __enter__(self) -> Servers:
        from espo_server.tiny_model import make_tiny_models

        policy, critic = make_tiny_models(self.work / "a", seed=0)
        policy_b, _ = make_tiny_models(self.work / "b", seed=7)
        self.weights = [str(policy), str(policy_b)]
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        self.critic = harness.start_critic("critic", str(critic), logs=logs)
        self.server = harness.start_espo(
            "rollout", "serve", "--model", str(policy), "--critic", "remote", "--critic-url", self.critic.url,
            "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "64",
            "--weights-dir", str(self.work), "--max-inflight-trajectories", str(self.max_inflight),
            *self.extra, logs=logs,
        )  # fmt: skip
        self.critic.wait_ready()
        self.server.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in (self.server, self.critic):
            if proc is not None:
                proc.stop()


# --------------------------------------------------------------------------------------------- the soak


def soak(
    url: str, pid: int, weights: list[str], args: argparse.Namespace, critic_pid: int | None = None
) -> dict:
    """Run the workload against a running server; check and return the figures."""
    before = harness.scrape(url)
    rss = RssWatch(pid, critic_pid, interval=args.rss_every_s).start()
    workload = Workload(
        url, args.clients, args.seconds, weights, args.push_every, seed=args.seed,
        push_every_calls=args.push_every_calls, push_kinds=("upload", "path"),
    )  # fmt: skip
    if args.scenarios:
        workload.scenarios = tuple(args.scenarios.split(","))
    started = time.monotonic()
    try:
        tally = asyncio.run(workload.run())
    finally:
        duration = time.monotonic() - started
        rss.stop()
        rss.take()  # the end
    after = harness.scrape(url)
    return check(tally, before, after, rss, duration, args)


def check(tally: Tally, before: Metrics, after: Metrics, rss: RssWatch, duration: float, args) -> dict:
    lost, twice = tally.lost_or_twice()
    moved = {
        key: after.sum(name, **labels) - before.sum(name, **labels)
        for key, (name, labels, _) in WATCHED.items()
    }
    seen = {key: getattr(tally, field) for key, (_, _, field) in WATCHED.items()}
    warm = min(args.warmup, duration / 4)
    memory = rss.summary(warm)
    five_xx = {k: v for k, v in tally.errors.items() if k.startswith("5") or k.startswith("stream_5")}
    unintended = {k: v for k, v in tally.errors.items() if k not in INTENDED}
    checks = {
        "every trajectory delivered exactly once": not lost and not twice,
        "replays equal their first answer": tally.replay_mismatches == 0,
        "/metrics equal the clients' sums": all(abs(moved[n] - seen[n]) < 1e-6 for n in WATCHED),
        "no 5xx": not five_xx,
        "no unintended errors": not unintended and tally.calls_given_up == 0,
        "runs closed with nothing left": tally.runs_closed_with_leftovers == 0,
    } | {
        f"{name.replace('_', ' ')} RSS growth < {args.rss_budget_mb} MiB": m["growth"] < args.rss_budget_mb
        for name, m in memory.items()
    }
    return {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "duration_s": round(duration, 1),
        "scenarios": dict(tally.kinds),
        "calls_answered": tally.answered,
        "replays": tally.replays,
        "trajectories": tally.trajectories,
        "tokens": tally.tokens,
        "stopped": tally.stopped,
        "critic_calls": tally.critic_calls,
        "critic_errors": tally.critic_errors,
        "critic_error_trajectories": tally.flagged,
        "end_reasons": dict(tally.end_reasons),
        "weight_pushes": tally.pushes,
        "weight_pushes_by_path": tally.pushes_by_path,
        "weight_pushes_by_upload": tally.pushes_by_upload,
        "errors": dict(tally.errors),
        "error_samples": tally.error_samples,
        "lost": [list(k) for k in lost[:20]],
        "twice": [list(k) for k in twice[:20]],
        "explained": [tally.explain(k) for k in (lost[:5] + twice[:5])],
        "metrics_moved": moved,
        "critic_calls_by_outcome": {
            dict(labels).get("outcome", ""): value - before.samples.get((name, labels), 0.0)
            for (name, labels), value in after.samples.items()
            if name == "espo_critic_calls_total"
        },
        "clients_saw": seen,
        "rss_mb": memory | {"after_warmup_s": round(warm, 1)},
        "rss_curve": rss.samples,
        "checks": checks,
        "ok": all(checks.values()),
    }


def print_summary(result: dict) -> None:
    cfg = result["config"]
    r = result["rss_mb"]
    print(f"\nSoak: {cfg['clients']} clients for {result['duration_s']} s")
    rows = [
        ("calls answered (distinct)", result["calls_answered"]),
        ("replays (same request_id)", result["replays"]),
        ("trajectories", result["trajectories"]),
        ("tokens generated", result["tokens"]),
        ("stopped by a rule", result["stopped"]),
        ("critic calls / errors", f"{result['critic_calls']} / {result['critic_errors']}"),
        ("critic calls by outcome (/metrics)", result["critic_calls_by_outcome"]),
        ("trajectories flagged critic_error", result["critic_error_trajectories"]),
        (
            "weight pushes by path / by upload",
            f"{result['weight_pushes_by_path']} / {result['weight_pushes_by_upload']}",
        ),
        ("scenarios", ", ".join(f"{k} {v}" for k, v in sorted(result["scenarios"].items()))),
        ("end reasons", ", ".join(f"{k} {v}" for k, v in sorted(result["end_reasons"].items()))),
        ("errors by kind", ", ".join(f"{k} {v}" for k, v in sorted(result["errors"].items())) or "none"),
    ]
    for name, value in rows:
        print(f"  {name:<36} {value}")
    print_memory(result["rss_curve"], r, result["duration_s"])
    print("checks:")
    for name, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    if not result["checks"]["/metrics equal the clients' sums"]:
        print(f"  metrics moved {result['metrics_moved']}\n  clients saw   {result['clients_saw']}")
    for kind, sample in result["error_samples"].items():
        if kind not in INTENDED:
            print(f"  {kind}: {sample}")
    print(f"soak: {'passed' if result['ok'] else 'FAILED'}")


def print_memory(samples: list[dict[str, float]], summary: dict, duration: float) -> None:
    """The RSS curve (one line per 5 minutes; about 10 lines for a run under 25 minutes) and, per
    series, warm-up end / plateau / end / growth over the last half."""
    names = [n for n in SERIES if n in summary]
    print(f"memory (RSS MiB; warm-up ends at {summary.get('after_warmup_s')} s):")
    print(f"  {'t s':>7} " + " ".join(f"{n:>14}" for n in names))
    for s in curve(samples, 300.0 if duration >= 1500 else max(duration / 10, 1.0)):
        print(f"  {s['t']:>7.0f} " + " ".join(f"{s.get(n, 0.0):>14.1f}" for n in names))
    for n in names:
        m = summary[n]
        print(
            f"  {n:<14} warm-up end {m['warmup_end']}, plateau {m['plateau']}, end {m['end']}, max "
            f"{m['max']}; growth {m['growth']:+}, over the last half {m['growth_last_half']:+}"
        )


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument(
        "--push-every", type=float, default=20.0, help="seconds between weight pushes (0: none)"
    )
    parser.add_argument(
        "--push-every-calls", type=int, default=0,
        help="a weight push after every this many scenarios finished (instead of --push-every)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scenarios", default="", help="comma-separated scenarios to draw from (default: all, calls 3x)"
    )
    parser.add_argument("--warmup", type=float, default=30.0, help="RSS growth is measured from then on")
    parser.add_argument(
        "--rss-budget-mb", type=float, default=200.0,
        help="most RSS growth (warm-up end to end) allowed, per series: server, each engine",
    )  # fmt: skip
    parser.add_argument("--rss-every-s", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument(
        "--max-inflight", type=int, default=32, help="the server's --max-inflight-trajectories"
    )


def main() -> None:
    parser = harness.parser(__doc__)
    add_args(parser)
    harness.add_common_args(parser, "soak", url_help="a running server (default: start one on tiny models)")
    parser.add_argument("--pid", type=int, default=None, help="its process id (for RSS), with --url")
    parser.add_argument(
        "--critic-pid", type=int, default=None, help="with --url: a remote critic's process id (for RSS)"
    )
    parser.add_argument("--weights", nargs="*", default=[], help="weight dirs to push in turn, with --url")
    args = parser.parse_args()
    if args.url is not None:
        if args.pid is None:
            parser.error("--url needs --pid (the server's process, for its RSS)")
        result = soak(args.url, args.pid, args.weights, args, critic_pid=args.critic_pid)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="espo-soak-"))
        with Servers(tmp, args.max_inflight) as s:
            assert s.server is not None and s.server.proc is not None
            print(
                f"servers up (logs in {tmp}/logs); soaking {args.seconds:g} s, {args.clients} clients",
                flush=True,
            )
            assert s.critic is not None and s.critic.proc is not None
            result = soak(s.server.url, s.server.proc.pid, s.weights, args, critic_pid=s.critic.proc.pid)
        if result["ok"]:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # what a failed check needs explaining: the servers' logs
            print(f"kept the servers' logs: {tmp}/logs", flush=True)
    harness.write_result(args.out, result)
    print_summary(result)
    print(f"wrote {args.out}")
    sys.exit(0 if result["ok"] else 1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the servers this script started are stopped too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
