"""`GrpcEspoClient` on par with the HTTP client: runs (open, describe, close), typed errors
(FAILED_PRECONDITION/ALREADY_EXISTS -> ConflictError, RESOURCE_EXHAUSTED -> RateLimitError), and
retries after `espo-retry-after-s`.

Against the real gRPC server (espo_server.grpc_server) over the real service with the scripted
engine of test_rollout_loop (no vLLM: calls held running on purpose), then against the test
suite's real server on the tiny models (`inprocess_server`, vLLM)."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import empty_pb2

from espo_client import BadRequestError, ConflictError, RateLimitError, ServiceUnavailableError
from espo_client import grpc_client as grpc_client_module
from espo_client.grpc_client import (
    GRPC_HTTP_STATUS,
    GrpcConflictError,
    GrpcEspoClient,
    GrpcRateLimitError,
    GrpcStatusError,
    grpc_status_error,
)
from espo_client.grpc_codec import to_message
from espo_client.proto import espo_pb2 as pb
from espo_client.proto import espo_pb2_grpc as pb_grpc
from espo_client.protocol import (
    EspoState,
    RolloutResponse,
    RunRequest,
    RunResponse,
    StateResponse,
    Trajectory,
)
from espo_server.grpc_server import grpc_server
from espo_server.process import free_port
from tests.fakes import FakeCritic, GatedEngine, service
from tests.test_grpc import model_fields


@pytest.mark.parametrize("name", ["RunRequest", "RunResponse"])
def test_run_messages_mirror_the_protocol_models(name: str) -> None:
    model = {"RunRequest": RunRequest, "RunResponse": RunResponse}[name]
    assert set(getattr(pb, name).DESCRIPTOR.fields_by_name) == model_fields(model)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


@pytest.mark.parametrize(
    ("code", "cls", "status"),
    [
        (grpc.StatusCode.FAILED_PRECONDITION, ConflictError, 409),
        (grpc.StatusCode.ALREADY_EXISTS, ConflictError, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimitError, 429),
        (grpc.StatusCode.UNAVAILABLE, ServiceUnavailableError, 503),
        (grpc.StatusCode.INVALID_ARGUMENT, BadRequestError, 400),
        (grpc.StatusCode.PERMISSION_DENIED, BadRequestError, 403),
    ],
)
def test_grpc_codes_map_to_the_http_clients_classes(code, cls, status) -> None:
    trailing = (
        ("espo-error-type", "conflict"),
        ("espo-error-param", "run_id"),
        ("espo-retry-after-s", "1.5"),
    )
    error = grpc_status_error(FakeRpcError(code, "it clashed", trailing))
    assert isinstance(error, GrpcStatusError) and isinstance(error, cls)
    assert error.code == code and error.status_code == status == GRPC_HTTP_STATUS[code]
    assert (error.message, error.details, error.type, error.param) == (
        "it clashed",
        "it clashed",
        "conflict",
        "run_id",
    )
    assert error.retry_after == 1.5 and error.response is None
    assert str(error) == f"{code.name}: it clashed"
    if cls is not ConflictError:
        assert not isinstance(error, ConflictError)


# ---------------------------------------------------------------------------------------------
# The real gRPC server over the real service, a scripted engine
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's retry waits (recorded, and not waited)."""
    waits: list[float] = []
    monkeypatch.setattr(grpc_client_module, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def serve(engine, test: Callable[[GrpcEspoClient, object], None], **config) -> None:
    """Run `test(client, service)` in a thread against a gRPC server on loopback whose service runs
    `engine`, in this thread's event loop."""
    svc = service(engine, FakeCritic(), grpc_port=free_port(), **config)

    async def main() -> None:
        async with grpc_server(svc, svc.config) as port:
            with GrpcEspoClient(f"127.0.0.1:{port}", timeout=60, backoff=0.0) as client:
                await asyncio.to_thread(test, client, svc)

    asyncio.run(main())


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `condition` from the test's thread until it holds; fail after a generous `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


BODY = {"n": 2, "max_tokens": 3, "stop_rule": "none"}


def test_runs_open_describe_close_and_a_busy_run_is_a_conflict() -> None:
    engine = GatedEngine(length=3, delay=0.0)

    def test(client: GrpcEspoClient, svc) -> None:
        opened = client.open_run("run-1")
        assert (opened.run_id, opened.open, opened.calls) == ("run-1", True, 0)
        assert client.open_run("run-1").open  # opening again is harmless (a retried open)
        results: list = []
        call = threading.Thread(
            target=lambda: results.append(client.rollouts(prompts=[[5, 6]], run_id="run-1", **BODY))
        )
        call.start()
        wait_for(lambda: svc.runs.get("run-1").busy)
        with pytest.raises(ConflictError) as busy:
            client.rollouts(prompts=[[7]], run_id="run-1", **BODY)
        assert isinstance(busy.value, GrpcConflictError) and busy.value.param == "run_id"
        assert busy.value.code == grpc.StatusCode.FAILED_PRECONDITION and busy.value.status_code == 409
        with pytest.raises(ConflictError, match="in progress"):
            client.close_run("run-1")
        engine.release.set()
        call.join(timeout=60)
        assert len(results[0].trajectories) == 2
        described = client.describe_run("run-1")
        assert (described.open, described.calls, described.carried_groups) == (True, 1, 0)
        closed = client.close_run("run-1")
        assert (closed.open, closed.calls) == (False, 1)
        assert not client.describe_run("run-1").open
        with pytest.raises(BadRequestError) as unknown:
            client.describe_run("never-opened")
        assert unknown.value.param == "run_id" and unknown.value.code == grpc.StatusCode.INVALID_ARGUMENT

    serve(engine, test)


def test_a_reused_request_id_is_a_conflict_and_a_retry_is_replayed() -> None:
    engine = GatedEngine(length=3, delay=0.0)
    engine.release.set()

    def test(client: GrpcEspoClient, svc) -> None:
        first = client.rollouts(prompts=[[5, 6]], request_id="once", **BODY)
        again = client.rollouts(prompts=[[5, 6]], request_id="once", **BODY)
        assert again.trajectories == first.trajectories  # the same body: the first answer, replayed
        with pytest.raises(ConflictError) as reused:
            client.rollouts(prompts=[[9]], request_id="once", **BODY)
        assert reused.value.param == "request_id" and reused.value.request_id == "once"

    serve(engine, test)


def test_resource_exhausted_is_retried_until_there_is_room(sleeps) -> None:
    engine = GatedEngine(length=3, delay=0.0)

    def test(client: GrpcEspoClient, svc) -> None:
        results: list = []
        first = threading.Thread(target=lambda: results.append(client.rollouts(prompts=[[5, 6]], **BODY)))
        first.start()
        wait_for(lambda: svc.admission.inflight == 2)  # the server is full
        client.max_retries = 0
        with pytest.raises(RateLimitError) as limited:
            client.rollouts(prompts=[[7, 8]], request_id="full", **BODY)
        error = limited.value
        assert isinstance(error, GrpcRateLimitError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.type == "overloaded" and error.request_id == "full" and sleeps == []
        # with retries: the client backs off (espo-retry-after-s when the server sends it) until
        # the first call is released and the server has room again
        client.max_retries = 1_000
        second = threading.Thread(target=lambda: results.append(client.rollouts(prompts=[[7, 8]], **BODY)))
        second.start()
        wait_for(lambda: len(sleeps) >= 2)
        engine.release.set()
        first.join(timeout=60)
        second.join(timeout=60)
        assert [len(r.trajectories) for r in results] == [2, 2]

    serve(engine, test, max_inflight_trajectories=2)


class ScriptedServicer(pb_grpc.RolloutsServicer):
    """Answers GetState with the scripted failures first (code, trailing metadata), then a state."""

    def __init__(self, failures: list[tuple[grpc.StatusCode, tuple]]) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def GetState(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> pb.StateResponse:
        self.calls += 1
        if self.failures:
            code, trailing = self.failures.pop(0)
            context.set_trailing_metadata(trailing)
            await context.abort(code, "too much in flight")
        return to_message(StateResponse(state=EspoState(beta=4.0)), pb.StateResponse)


def with_scripted_server(
    servicer: ScriptedServicer, test: Callable[[GrpcEspoClient], None], **options
) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_RolloutsServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            with GrpcEspoClient(f"127.0.0.1:{port}", timeout=60, **options) as client:
                await asyncio.to_thread(test, client)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


def test_retry_waits_honour_espo_retry_after_s(sleeps) -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    servicer = ScriptedServicer(
        [
            (exhausted, (("espo-error-type", "overloaded"), ("espo-retry-after-s", "2"))),
            (exhausted, (("espo-retry-after-s", "30"),)),  # beyond backoff_max: capped
            (grpc.StatusCode.UNAVAILABLE, ()),  # no metadata: the client's own backoff
        ]
    )

    def test(client: GrpcEspoClient) -> None:
        assert client.state().state.beta == 4.0

    with_scripted_server(servicer, test, backoff=1.0, backoff_max=8.0, max_retries=3)
    assert servicer.calls == 4
    first, capped, own = sleeps
    assert first == 2.0 and capped == 8.0 and 2.0 <= own <= 4.0


def test_retries_are_spent_then_the_rate_limit_error_is_raised(sleeps) -> None:
    exhausted = (grpc.StatusCode.RESOURCE_EXHAUSTED, (("espo-retry-after-s", "0.5"),))
    servicer = ScriptedServicer([exhausted] * 3)

    def test(client: GrpcEspoClient) -> None:
        with pytest.raises(RateLimitError) as info:
            client.state()
        assert info.value.retry_after == 0.5

    with_scripted_server(servicer, test, backoff=0.0, max_retries=2)
    assert servicer.calls == 3 and sleeps == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# The test suite's real server (tiny policy + in-process critic, vLLM)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(inprocess_server) -> Iterator[GrpcEspoClient]:
    with GrpcEspoClient(f"127.0.0.1:{inprocess_server.grpc_port}", timeout=300) as c:
        yield c


@pytest.mark.vllm
def test_runs_carry_groups_between_calls_over_grpc(client: GrpcEspoClient) -> None:
    """Greedy, the tiny policy ends prompt [5, 6, 30, 7] with EOS after a few tokens and runs the
    others to max_tokens (test_runs_vllm.py): the call returns that group and carries the others."""
    run = client.open_run()
    assert run.open and run.calls == 0 and len(run.run_id) >= 32
    prompts = [[5, 6, 30, 7], [5, 6, 14, 7], [5, 6, 15, 7]]
    out = client.rollouts(
        prompts=prompts,
        n=2,
        max_tokens=400,
        temperature=0.0,
        run_id=run.run_id,
        return_groups=1,
        leftover="carry",
    )
    assert out.usage.groups_returned == 1 and out.usage.groups_carried == 2
    carried = client.describe_run(run.run_id)
    assert (carried.open, carried.calls, carried.carried_groups, carried.carried_trajectories) == (
        True,
        1,
        2,
        4,
    )
    closed = client.close_run(run.run_id)
    assert not closed.open and closed.calls == 1
    assert 0 <= closed.aborted <= 4  # the carried samples still generating were aborted
    assert not client.describe_run(run.run_id).open
    with pytest.raises(BadRequestError, match="closed"):
        client.rollouts(prompts=prompts[:1], max_tokens=4, run_id=run.run_id)


@pytest.mark.vllm
def test_a_reused_request_id_is_a_conflict_on_the_real_server(client: GrpcEspoClient) -> None:
    body = {"n": 2, "max_tokens": 8, "seed": 11}
    first = client.rollouts(prompts=[[5, 6, 7]], request_id="grpc-once", **body)
    streamed = list(client.stream_rollouts(prompts=[[5, 6, 7]], request_id="grpc-once", **body))
    replayed = sorted((t for t in streamed if isinstance(t, Trajectory)), key=lambda t: t.sample_index)
    assert [t.token_ids for t in replayed] == [t.token_ids for t in first.trajectories]
    assert isinstance(streamed[-1], RolloutResponse)
    with pytest.raises(ConflictError) as reused:
        client.rollouts(prompts=[[5, 6, 8]], request_id="grpc-once", **body)
    error = reused.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.param == "request_id"
    assert error.type == "conflict" and error.request_id == "grpc-once"
    assert client.rollouts(prompts=[[5, 6]], max_tokens=2).usage.trajectories == 1  # still serving
