"""The gRPC API: the .proto mirrors the protocol models, the generated code is current, the codec
round-trips, errors map to status codes naming the field; and a real grpcio client on loopback
against the real server (tiny policy + in-process critic)."""

from __future__ import annotations

import asyncio
import dataclasses
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2
from pydantic import BaseModel

from espo_client import protocol
from espo_client.grpc_client import GrpcEspoClient, GrpcStatusError
from espo_client.grpc_codec import from_message, to_message
from espo_client.proto import espo_pb2 as pb
from espo_client.proto import espo_pb2_grpc as pb_grpc
from espo_client.protocol import (
    EspoState,
    GroupEvent,
    Prompt,
    RolloutRequest,
    RolloutResponse,
    RuleParams,
    Traces,
    Trajectory,
    Usage,
)
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client"
PROTO = CLIENT / "espo_client" / "proto"
EAGER = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}

MIRRORED = [
    "Prompt",
    "RuleParams",
    "EspoState",
    "RolloutRequest",
    "Traces",
    "Carried",
    "Trajectory",
    "Usage",
    "RolloutResponse",
    "StateResponse",
    "CommitRequest",
    "WeightsRequest",
    "WeightsResponse",
    "CriticWeightsRequest",
    "CriticWeightsResponse",
    "InfoResponse",
    "UploadRequest",
    "UploadCommitRequest",
]


def model_fields(model) -> set[str]:
    if dataclasses.is_dataclass(model):
        return {f.name for f in dataclasses.fields(model)}
    assert issubclass(model, BaseModel)
    return set(model.model_fields)


@pytest.mark.parametrize("name", MIRRORED)
def test_proto_messages_mirror_the_protocol_models(name):
    message = getattr(pb, name).DESCRIPTOR
    assert set(message.fields_by_name) == model_fields(getattr(protocol, name)), (
        f"espo.proto's {name} and espo_client.protocol.{name} have parted: edit the .proto and regenerate"
    )


def test_generated_code_is_up_to_date(tmp_path):
    """The committed espo_pb2*.py are what grpcio-tools makes of espo.proto today."""
    src = tmp_path / "espo_client" / "proto"
    src.mkdir(parents=True)
    shutil.copy(PROTO / "espo.proto", src / "espo.proto")
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", str(tmp_path),
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(src / "espo.proto"),
        ],
        check=True,
    )  # fmt: skip
    for name in ("espo_pb2.py", "espo_pb2.pyi", "espo_pb2_grpc.py"):
        assert filecmp.cmp(src / name, PROTO / name, shallow=False), (
            f"{name} is stale: regenerate it (the command is at the top of espo.proto)"
        )


def test_codec_round_trips_requests_and_responses():
    request = RolloutRequest(
        prompts=[Prompt(token_ids=[5, 6, 0]), Prompt(text="7+5=", answer="12")],
        n=3,
        max_tokens=16,
        temperature=0.0,  # an explicit zero survives (optional scalars keep presence)
        seed=2**40,
        stop=["\n"],
        stop_rule="espo",
        rule_params=RuleParams(tau=0.0, min_tokens=0),
        state=EspoState(mu=0.0, var=0.5, beta=10.0, warm=True, initialised=True, batches=3),
        include=["regret", "values", "top_logprobs", "text"],
        top_logprobs=2,
        request_id="r-1",
    )
    assert from_message(to_message(request, pb.RolloutRequest), RolloutRequest) == request
    assert from_message(
        to_message(RolloutRequest(prompts=[Prompt(text="x")]), pb.RolloutRequest), RolloutRequest
    ) == (RolloutRequest(prompts=[Prompt(text="x")]))

    trajectory = Trajectory(
        prompt_index=0,
        sample_index=0,
        token_ids=[],
        logprobs=[],
        end_reason="abort",
        policy_version=0,
    )
    full = Trajectory(
        prompt_index=1,
        sample_index=2,
        token_ids=[3, 4],
        logprobs=[-0.5, 0.0],
        end_reason="espo_stop",
        stop_step=1,
        reward=-1.0,
        policy_version=7,
        traces=Traces(regret=[0.0, 0.25], values=[None, 0.5], top_token_ids=[[3, 9], [4, 1]],
                      top_logprobs=[[-0.5, -1.0], [0.0, -3.0]]),
        text="ab",
    )  # fmt: skip
    response = RolloutResponse(
        request_id="r",
        trajectories=[trajectory, full],
        usage=Usage(prompt_tokens=3, generated_tokens=2, trajectories=2, regret_sum=0.25),
        stop_rule="espo",
        shadow=False,
        rule_params={"tau": 0.25, "min_tokens": 8, "warm_after_batches": None},
        state_used=EspoState(),
        state_after=None,
        policy_version=7,
        prompt_token_ids=[[5, 6], [1]],
    )
    back = from_message(to_message(response, pb.RolloutResponse), RolloutResponse)
    assert back.rule_params == {"tau": 0.25, "min_tokens": 8}  # nulls are not sent; ints stay ints
    assert isinstance(back.rule_params["min_tokens"], int)
    assert back.model_copy(update={"rule_params": response.rule_params}) == response


# ---------------------------------------------------------------------------- errors without engines


class FakeService:
    """Only what the servicer touches, for the error paths."""

    def plan(self, request: RolloutRequest):
        from espo_server.errors import InvalidRequest

        raise InvalidRequest("n=9 exceeds this server's max_n=4", "n")

    def state(self):
        from espo_server.critic import CriticError

        raise CriticError("critic down")


def test_status_codes_and_auth_on_a_loopback_server():
    from espo_server.config import ServerConfig
    from espo_server.grpc_server import grpc_server
    from espo_server.process import free_port

    async def main() -> None:
        config = ServerConfig(grpc_port=free_port(), api_key="secret")
        async with grpc_server(FakeService(), config) as port:  # type: ignore[arg-type]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RolloutsStub(channel)
                good = (("authorization", "Bearer secret"),)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Info(empty_pb2.Empty())
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in stub.Rollouts(
                        pb.RolloutRequest(prompts=[pb.Prompt(text="x")]), metadata=good
                    ):
                        pass
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert dict(caught.value.trailing_metadata())["espo-error-param"] == "n"
                with pytest.raises(grpc.aio.AioRpcError) as caught:  # pydantic's complaint, field named
                    async for _ in stub.Rollouts(pb.RolloutRequest(prompts=[pb.Prompt()]), metadata=good):
                        pass
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert dict(caught.value.trailing_metadata())["espo-error-param"] == "prompts[0]"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetState(empty_pb2.Empty(), metadata=good)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert dict(caught.value.trailing_metadata())["espo-error-type"] == "critic_unavailable"

    asyncio.run(main())


class BusyService:
    """A server that is too busy for a call (429) and draining (503 shutting_down) for the rest."""

    def plan(self, request: RolloutRequest):
        from espo_server.errors import Overloaded

        raise Overloaded("1000 trajectories are generating: retry later", retry_after_s=2.5)

    def state(self):
        from espo_server.errors import ShuttingDown

        raise ShuttingDown("this server is shutting down")


def test_errors_to_retry_later_carry_their_retry_after_in_the_trailing_metadata():
    from espo_server.config import ServerConfig
    from espo_server.grpc_server import grpc_server
    from espo_server.process import free_port

    async def main() -> list[GrpcStatusError]:
        async with grpc_server(BusyService(), ServerConfig(grpc_port=free_port())) as port:  # type: ignore[arg-type]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RolloutsStub(channel)
                errors = []
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in stub.Rollouts(pb.RolloutRequest(prompts=[pb.Prompt(text="x")])):
                        pass
                errors.append(caught.value)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetState(empty_pb2.Empty())
                errors.append(caught.value)
                return [GrpcStatusError(e) for e in errors]

    overloaded, draining = asyncio.run(main())
    assert overloaded.code == grpc.StatusCode.RESOURCE_EXHAUSTED and overloaded.type == "overloaded"
    assert overloaded.retry_after_s == 2.5  # the error's own hint, not a constant
    assert draining.code == grpc.StatusCode.UNAVAILABLE and draining.type == "shutting_down"
    assert draining.retry_after_s == 5.0


# ---------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def client(inprocess_server):
    with GrpcEspoClient(f"127.0.0.1:{inprocess_server.grpc_port}", timeout=300) as c:
        yield c


@pytest.mark.vllm
def test_rollouts_stream_trajectories_then_the_response(client, inprocess_server):
    import httpx

    request = RolloutRequest(
        prompts=[Prompt(text="7+5="), Prompt(token_ids=[5, 6, 14])],
        n=3,
        max_tokens=24,
        seed=4,
        stop_rule="espo",
        state=EspoState(**EAGER),
        rule_params=RuleParams(critic_stride=2, min_tokens=2),
        include=["regret", "values", "text"],
    )
    items = list(client.stream_rollouts(request))
    trajectories, done = [i for i in items[:-1] if isinstance(i, Trajectory)], items[-1]
    groups = [i for i in items[:-1] if isinstance(i, GroupEvent)]
    assert len(trajectories) == 6 and len(groups) == 2 and {g.sample_count for g in groups} == {3}
    assert isinstance(done, RolloutResponse) and done.trajectories == []
    assert done.usage.trajectories == 6 and done.state_after is not None
    assert done.prompt_token_ids is not None and done.prompt_token_ids[1] == [5, 6, 14]
    assert all(t.text is not None and len(t.traces.regret) == len(t.token_ids) for t in trajectories)

    # the same request over HTTP: the same trajectories (same service code, same seeds)
    http = httpx.post(
        inprocess_server.url + "/v1/rollouts",
        json=request.model_dump(mode="json", exclude_none=True),
        timeout=300,
    ).json()
    over_http = {(t["prompt_index"], t["sample_index"]): t["token_ids"] for t in http["trajectories"]}
    assert {(t.prompt_index, t.sample_index): t.token_ids for t in trajectories} == over_http
    whole = client.rollouts(request)
    assert [(t.prompt_index, t.sample_index) for t in whole.trajectories] == sorted(over_http)


@pytest.mark.vllm
def test_state_commit_info_and_weights(client, tiny_models):
    info = client.info()
    assert info.model == str(tiny_models["policy"]) and info.critic == "inprocess"
    assert isinstance(info.rule_defaults["min_tokens"], int)
    before = client.state().state
    client.rollouts(prompts=[[5, 6]], n=2, max_tokens=4, batch_id="grpc-batch")
    assert client.state().open_batch_id == "grpc-batch"
    after = client.commit("grpc-batch")
    assert after.open_batch_id is None and after.state.batches == before.batches + 1
    new = client.set_state(dataclasses.replace(after.state, beta=3.5))
    assert new.state.beta == 3.5
    client.set_state(after.state)
    weights = client.load_weights(str(tiny_models["policy"]), version=client.info().policy_version)
    assert weights.load_time_s >= 0


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("message", "param"),
    [
        (pb.RolloutRequest(prompts=[pb.Prompt(token_ids=[5])], n=0), "n"),
        (pb.RolloutRequest(), "prompts"),
        (pb.RolloutRequest(prompts=[pb.Prompt(token_ids=[99_999])]), "prompts[0].token_ids"),
        (
            pb.RolloutRequest(prompts=[pb.Prompt(text="7+")], rule_params=pb.RuleParams(tau=3)),
            "rule_params.tau",
        ),
        (pb.RolloutRequest(prompts=[pb.Prompt(text="7+")], stop_rule="bogus"), "stop_rule"),
        (pb.RolloutRequest(prompts=[pb.Prompt(text="7+")], max_tokens=100_000), "max_tokens"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(inprocess_server, client, message, param):
    with grpc.insecure_channel(f"127.0.0.1:{inprocess_server.grpc_port}") as channel:
        stub = pb_grpc.RolloutsStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Rollouts(message, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.trailing_metadata())["espo-error-param"] == param
    assert param in caught.value.details()
    with pytest.raises(GrpcStatusError) as wrapped:
        client.load_weights("/etc")  # outside --weights-dir: nobody loads any path
    assert wrapped.value.code == grpc.StatusCode.PERMISSION_DENIED and wrapped.value.param == "path"
    assert client.rollouts(prompts=[[5, 6]], max_tokens=2).usage.trajectories == 1  # still serving


def _drain(call) -> list:
    """Every event of a streaming call, then the status code name it ended with if not OK."""
    out: list = []
    try:
        out.extend(call)
    except grpc.RpcError as exc:
        out.append(exc.code().name)
    return out


# Greedy, prompt [5, 6, 30, 7] ends with EOS after a few tokens; the twelve others run to max_tokens
# (tests/test_runs_vllm.py): a call of them sends its first event with ~470 engine steps still to go.
QUICK_THEN_LONG = [[5, 6, 30, 7]] + [[5, 6, 14 + p, 7] for p in range(12)]


@pytest.mark.vllm
def test_cancelling_the_call_aborts_the_samples(inprocess_server):
    from tests.live_server import metric

    def policy(name: str, **labels: str) -> float:
        return metric(inprocess_server, name, espo_engine="policy", **labels)

    cancelled = metric(inprocess_server, "espo_rollout_requests_total", outcome="cancelled")
    generated = policy("vllm:generation_tokens_total")
    prompts = [pb.Prompt(token_ids=p) for p in QUICK_THEN_LONG]
    message = pb.RolloutRequest(prompts=prompts, n=3, max_tokens=480, temperature=0.0)
    with grpc.insecure_channel(f"127.0.0.1:{inprocess_server.grpc_port}") as channel:
        call = pb_grpc.RolloutsStub(channel).Rollouts(message, timeout=300)
        first = next(call)  # the quick group's first trajectory: the long ones are generating
        call.cancel()
        rest = _drain(call)
    assert first.WhichOneof("event") == "trajectory" and first.trajectory.prompt_index == 0, first
    assert rest[-1:] == ["CANCELLED"]
    wait_until(
        lambda: (
            metric(inprocess_server, "espo_rollout_requests_total", outcome="cancelled") == cancelled + 1
            and metric(inprocess_server, "espo_inflight_trajectories") == 0
            and policy("vllm:num_requests_running") == 0
        ),
        "the cancelled call's samples aborted",
    )
    assert policy("vllm:generation_tokens_total") - generated < len(QUICK_THEN_LONG) * 3 * 480
