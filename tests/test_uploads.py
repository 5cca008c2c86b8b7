"""Weight uploads over HTTP, against real servers on loopback (uvicorn in a thread): the protocol,
the client's shards made from a module, a state_dict or an iterator, every kind of bad input, idle
expiry, and the relay of critic uploads to a critic server. The push a commit makes is a stand-in
here that runs the real checks on the staged directory and records what it would have loaded
(tests/test_arch_parity.py pushes into real vLLM engines)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from safetensors.torch import load_file, save

from espo_client import APIStatusError, AsyncEspoClient, EspoClient
from espo_client.checkpoint import shards
from espo_client.protocol import CriticWeightsResponse, WeightsResponse
from espo_server.app import build_app
from espo_server.config import ServerConfig
from espo_server.critic import CriticAnswer
from espo_server.critic_server import build_critic_app
from espo_server.errors import ReloadFailed
from espo_server.tiny_model import QWEN2, TinyConfig, make_arch_model, make_arch_models
from espo_server.upload_forward import ForwardedUploads
from espo_server.upload_targets import LocalUploads
from espo_server.uploads import UploadStore
from espo_server.weights import check_checkpoint

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
POLICY = "/v1/weights/uploads"
CRITIC = "/v1/critic/weights/uploads"


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(condition: Callable[[], bool], what: str, bound_s: float = 30.0) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {bound_s}s: {what}"
        time.sleep(0.02)


class Pushes:
    """What a commit calls: the push's real checks of the staged directory, then a stand-in for
    the engine that records the tensors it would load and serves them as a new version."""

    def __init__(self, served: Path, answer: type = WeightsResponse) -> None:
        self.served, self.answer = served, answer
        self.version, self.path = 0, str(served)
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.fail: Exception | None = None
        self.hold: tuple[threading.Event, threading.Event] | None = None
        """(entered, release): the push says it has begun, then waits to be released."""

    async def __call__(self, directory: Path, version: int | None):
        check_checkpoint(directory, str(self.served))
        if self.hold is not None:
            entered, release = self.hold
            entered.set()
            assert await asyncio.to_thread(release.wait, 60), "never released"
        if self.fail is not None:
            raise self.fail
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(directory.glob("*.safetensors")):
            tensors.update(load_file(file))
        self.loaded.append(tensors)
        self.version, self.path = (self.version + 1 if version is None else version), str(directory)
        if self.answer is WeightsResponse:
            return WeightsResponse(policy_version=self.version, load_time_s=0.0)
        return self.version, 0.0


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> SimpleNamespace:
    """A tiny Qwen2 pair (tied embeddings) on disk, and a policy and critic of another seed in memory."""
    policy, critic = make_arch_models(tmp_path_factory.mktemp("qwen2"), QWEN2, seed=0)
    return SimpleNamespace(
        policy=policy,
        critic=critic,
        new_policy=make_arch_model(QWEN2, TinyConfig(), seed=5),
        new_critic=make_arch_model(QWEN2, TinyConfig(), seed=6, critic=True),
    )


@pytest.fixture
def server(qwen, tmp_path) -> Iterator[SimpleNamespace]:
    """The rollout server's app with policy uploads staged in tmp_path/staging."""
    pushes = Pushes(qwen.policy)
    staging = tmp_path / "staging"
    store = UploadStore(
        staging, what="policy", reference=str(qwen.policy), idle_timeout_s=60, in_use=lambda: pushes.path
    )
    app = build_app(ServerConfig(api_key=KEY))
    app.state.uploads = {"policy": LocalUploads(store, pushes)}
    with serving(app) as url:
        yield SimpleNamespace(url=url, store=store, pushes=pushes, staging=staging)


def uploads_on_disk(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.iterdir())


def expected_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What save_pretrained writes of it: the state_dict without the tied output layer."""
    return {k: v for k, v in module.state_dict().items() if k != "lm_head.weight"}


def assert_loaded(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


# --- the protocol, end to end ------------------------------------------------------------------


def test_a_module_a_state_dict_and_an_iterator_upload_sharded(server, qwen):
    model = qwen.new_policy
    want = expected_tensors(model)
    with EspoClient(base_url=server.url, api_key=KEY) as client:
        answer = client.upload_weights(model, shard_bytes=64 << 10)  # several shards
        assert answer.policy_version == 1
        assert_loaded(server.pushes.loaded[-1], want)
        first = server.pushes.path
        assert len(list(Path(first).glob("*.safetensors"))) > 3 and uploads_on_disk(server.staging) == [
            Path(first).name
        ]

        assert client.upload_weights(model.state_dict(), version=7).policy_version == 7
        assert_loaded(server.pushes.loaded[-1], want)
        lazy = ((name, tensor.clone()) for name, tensor in want.items())  # a weight hook's generator
        assert client.upload_weights(lazy, shard_bytes=1).policy_version == 8  # one tensor per shard
        assert_loaded(server.pushes.loaded[-1], want)
    # only the directory that serves is kept (a later failed push rolls back to it)
    assert uploads_on_disk(server.staging) == [Path(server.pushes.path).name] and not Path(first).exists()


def test_a_copy_of_the_tied_output_layer_is_taken(server, qwen):
    """A weight hook that gathers each parameter apart hands over the tied output layer as a copy of
    the input embeddings (not an alias): taken, and served as the one tensor both layers share."""
    state = qwen.new_policy.state_dict()
    copies = ((name, tensor.clone()) for name, tensor in state.items())
    assert "lm_head.weight" in state
    with EspoClient(base_url=server.url, api_key=KEY) as client:
        assert client.upload_weights(copies, shard_bytes=64 << 10).policy_version == 1
    loaded = server.pushes.loaded[-1]
    assert torch.equal(loaded.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    assert_loaded(loaded, expected_tensors(qwen.new_policy))


def test_the_async_client_uploads_too(server, qwen):
    async def go() -> WeightsResponse:
        async with AsyncEspoClient(base_url=server.url, api_key=KEY) as client:
            return await client.upload_weights(qwen.new_policy, version=3)

    assert asyncio.run(go()).policy_version == 3
    assert_loaded(server.pushes.loaded[-1], expected_tensors(qwen.new_policy))


def test_the_shards_are_safetensors_files_with_the_digest_sent(qwen):
    for shard in shards(qwen.new_policy, shard_bytes=32 << 10):
        data = b"".join(bytes(chunk) for chunk in shard.chunks(1000))
        assert len(data) == shard.size and hashlib.sha256(data).digest() == shard.sha256
        for name, tensor in torch_load(data).items():
            assert torch.equal(tensor, qwen.new_policy.state_dict()[name])


def torch_load(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


# --- bad input: a 4xx naming the problem, the old weights serve on, nothing left in staging ------


def shard_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def put(http: httpx.Client, upload: str, name: str, data: bytes, **headers: str) -> httpx.Response:
    headers = {"Content-Digest": digest(data), **headers}
    return http.put(f"{POLICY}/{upload}/shards/{name}", content=data, headers=headers)


def open_upload(http: httpx.Client) -> str:
    response = http.post(POLICY, json={})
    assert response.status_code == 201, response.text
    return response.json()["upload_id"]


def good(qwen) -> dict[str, torch.Tensor]:
    return expected_tensors(qwen.new_policy)


def half(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    names = sorted(tensors)
    return {n: tensors[n] for n in names[::2]}, {n: tensors[n] for n in names[1::2]}


def bad_shape(t):
    return {"model.norm.weight": torch.zeros(7)}


def bad_dtype(t):
    return {"model.norm.weight": torch.zeros_like(t["model.norm.weight"], dtype=torch.int64)}


def chunked(data: bytes) -> Iterator[bytes]:
    yield data  # a generator body: sent chunked, without Content-Length


@pytest.mark.parametrize(
    ("case", "status", "words", "param"),
    [
        ("truncated", 400, "truncated", "shard"),
        ("length", 400, "the request says", "shard"),
        ("shape", 400, "model.norm.weight has shape [7]", "shard"),
        ("dtype", 400, "model.norm.weight has dtype I64", "shard"),
        ("unknown", 400, "model.extra.weight is not a tensor of the served model", "shard"),
        ("another output layer", 400, "lm_head.weight differs from model.embed_tokens.weight", "upload_id"),
        ("same shard twice", 409, "sent twice", "shard"),
        ("same tensor twice", 400, "already sent in another shard", "shard"),
        ("checksum", 400, "SHA-256", "sha256"),
        ("shard name", 400, "a shard is named like", "shard"),
        ("too large", 413, "past its limit", "shard"),
        ("missing at commit", 400, "were never sent", "upload_id"),
        ("commit fails", 500, "rolled back", None),
    ],
)
def test_bad_input_is_a_4xx_naming_it_and_leaves_nothing(server, qwen, case, status, words, param):
    tensors = good(qwen)
    first, second = half(tensors)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        upload = open_upload(http)
        data = shard_bytes(first)
        if case == "truncated":
            whole = shard_bytes(first)
            response = http.put(
                f"{POLICY}/{upload}/shards/model-00001.safetensors",
                content=chunked(whole[:-100]),
                headers={"Content-Digest": digest(whole)},
            )
        elif case == "length":
            response = put(http, upload, "model-00001.safetensors", data + b"\0" * 8)
        elif case in ("shape", "dtype", "unknown"):
            bad = {
                "shape": bad_shape,
                "dtype": bad_dtype,
                "unknown": lambda t: {"model.extra.weight": torch.zeros(2)},
            }[case](tensors)
            response = put(http, upload, "model-00001.safetensors", shard_bytes(bad))
        elif case == "same shard twice":
            assert put(http, upload, "model-00001.safetensors", data).status_code == 200
            response = put(http, upload, "model-00001.safetensors", shard_bytes(second))
        elif case == "same tensor twice":
            assert put(http, upload, "model-00001.safetensors", data).status_code == 200
            response = put(http, upload, "model-00002.safetensors", data)
        elif case == "checksum":
            response = put(http, upload, "model-00001.safetensors", data, **{"Content-Digest": digest(b"x")})
        elif case == "shard name":
            response = put(http, upload, "model.bin", data)
        elif case == "too large":
            server.store.max_bytes = len(data) - 1
            response = put(http, upload, "model-00001.safetensors", data)
        else:  # commits
            assert put(http, upload, "model-00001.safetensors", data).status_code == 200
            if case in ("commit fails", "another output layer"):
                assert put(http, upload, "model-00002.safetensors", shard_bytes(second)).status_code == 200
            if case == "another output layer":  # a model with a separate output layer: not this one
                head = {"lm_head.weight": tensors["model.embed_tokens.weight"] + 1}
                assert put(http, upload, "model-00003.safetensors", shard_bytes(head)).status_code == 200
            if case == "commit fails":
                server.pushes.fail = ReloadFailed(
                    "the reload failed; rolled back to version 0, which serves on"
                )
            response = http.post(f"{POLICY}/{upload}/commit", json={})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert words in error["message"] and error["param"] == param, error
        # the upload is gone, nothing of it is on disk, the old weights serve on
        gone = http.get(f"{POLICY}/{upload}")
        assert gone.status_code == 404 and "ended" in gone.json()["error"]["message"], gone.text
        assert uploads_on_disk(server.staging) == [] and server.pushes.loaded == []
    # and the server takes the next push
    server.store.max_bytes, server.pushes.fail = 1 << 30, None
    with EspoClient(base_url=server.url, api_key=KEY) as client:
        assert client.upload_weights(qwen.new_policy).policy_version == 1


def test_a_request_refused_before_its_body_leaves_the_upload_open(server, qwen):
    """No digest, a Content-Length that is not a number: nothing was received, nothing changes."""
    data = shard_bytes(good(qwen))
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        upload = open_upload(http)
        response = http.put(f"{POLICY}/{upload}/shards/model-00001.safetensors", content=data)
        assert response.status_code == 400 and response.json()["error"]["param"] == "Content-Digest"
        assert http.get(f"{POLICY}/{upload}").json()["state"] == "open"
        assert put(http, upload, "model-00001.safetensors", data).json()["shards"] == [
            "model-00001.safetensors"
        ]
        assert http.post(f"{POLICY}/{upload}/commit", json={"version": 4}).json()["policy_version"] == 4


def test_one_upload_at_a_time_and_a_delete_frees_the_way(server, qwen):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        upload = open_upload(http)
        response = http.post(POLICY, json={})
        assert response.status_code == 409 and upload in response.json()["error"]["message"], response.text
        assert http.delete(f"{POLICY}/{upload}").json()["state"] == "abandoned"
        assert uploads_on_disk(server.staging) == []
        open_upload(http)
        assert http.post(POLICY, json={}, headers={"Authorization": "Bearer nope"}).status_code == 401


def test_while_a_commit_runs_another_push_a_second_commit_and_a_delete_are_409(server, qwen):
    entered, release = threading.Event(), threading.Event()
    server.pushes.hold = (entered, release)
    with (
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as other,
        ThreadPoolExecutor(1) as pool,
    ):
        upload = open_upload(http)
        assert put(http, upload, "model-00001.safetensors", shard_bytes(good(qwen))).status_code == 200
        committing = pool.submit(http.post, f"{POLICY}/{upload}/commit", json={"version": 9})
        assert entered.wait(60), "the commit did not begin"
        for response, words in (
            (other.post(POLICY, json={}), "upload is in progress"),
            (other.post(f"{POLICY}/{upload}/commit", json={}), "is committing"),
            (other.delete(f"{POLICY}/{upload}"), "being committed"),
        ):
            assert response.status_code == 409 and words in response.json()["error"]["message"], response.text
            assert response.json()["error"]["param"] == "upload_id"
        release.set()
        assert committing.result(60).json()["policy_version"] == 9
        assert server.pushes.version == 9
        assert uploads_on_disk(server.staging) == [Path(server.pushes.path).name]
        open_upload(http)  # the next push may begin


def test_a_config_of_another_model_is_refused_at_open(server, qwen):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        config = qwen.new_policy.config.to_dict()
        response = http.post(POLICY, json={"config": json.loads(json.dumps(config, default=str))})
        assert response.status_code == 201, response.text  # the same architecture
        http.delete(f"{POLICY}/{response.json()['upload_id']}")
        config["tie_word_embeddings"] = False
        response = http.post(POLICY, json={"config": json.loads(json.dumps(config, default=str))})
        assert response.status_code == 400 and response.json()["error"]["param"] == "config", response.text
        assert "tie_word_embeddings=False" in response.json()["error"]["message"]


@contextlib.contextmanager
def half_a_shard(server, upload: str, data: bytes) -> Iterator[socket.socket]:
    """A raw connection that has sent the PUT of a shard and half its bytes (then nothing more)."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"PUT {POLICY}/{upload}/shards/model-00001.safetensors HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Digest: {digest(data)}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(head + data[: len(data) // 2])
        yield raw


def test_a_client_that_goes_away_mid_shard_leaves_nothing(server, qwen):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        upload = open_upload(http)
        with half_a_shard(server, upload, shard_bytes(good(qwen))):
            arriving = lambda: any(p.name.endswith(".part") for p in server.staging.rglob("*"))  # noqa: E731
            wait_until(arriving, "the shard arrives")
        # the connection is closed half way: the upload is abandoned
        wait_until(lambda: http.get(f"{POLICY}/{upload}").status_code == 404, "the upload is abandoned")
        assert "could not be read" in http.get(f"{POLICY}/{upload}").json()["error"]["message"]
        assert uploads_on_disk(server.staging) == [] and server.pushes.loaded == []
        assert http.get("/healthz").status_code == 200


def test_a_client_that_stalls_mid_shard_is_cut_off(server, qwen):
    """It sends half a shard and then nothing, the connection open: after the idle timeout the
    upload is abandoned and the client is answered 400."""
    server.store.idle_timeout_s = 0.5
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        upload = open_upload(http)
        with half_a_shard(server, upload, shard_bytes(good(qwen))) as raw:
            answer = raw.recv(65536).decode(errors="replace")  # waits for the server's verdict
        assert answer.startswith("HTTP/1.1 400") and "no bytes for 0.5s" in answer, answer[:300]
        assert http.get(f"{POLICY}/{upload}").status_code == 404
        assert uploads_on_disk(server.staging) == [] and server.pushes.loaded == []


def test_an_idle_upload_expires(server, qwen):
    server.store.idle_timeout_s = 0.2
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        upload = open_upload(http)
        assert (
            put(http, upload, "model-00001.safetensors", shard_bytes(half(good(qwen))[0])).status_code == 200
        )
        wait_until(lambda: uploads_on_disk(server.staging) == [], "the idle upload is deleted")
        response = http.get(f"{POLICY}/{upload}")
        assert response.status_code == 404 and "idle" in response.json()["error"]["message"]


# --- the critic: staged on the critic's own server, relayed by the rollout server ----------------


class FakeCritic:
    """What build_critic_app needs of an in-process critic; loads by the real checks of a push."""

    prefix_caching, block_size = True, 32
    llm = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 56))

    def __init__(self, model: Path) -> None:
        self.model = self.weights_dir = str(model)
        self.version = 0
        self.pushes = Pushes(model, answer=CriticWeightsResponse)

    async def score(self, prefixes):
        return CriticAnswer([0.0] * len(prefixes), [len(p) for p in prefixes], self.version)

    async def check(self) -> None:
        pass

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
        self.version, seconds = await self.pushes(Path(path), version)
        self.weights_dir = path
        return self.version, seconds


def test_critic_uploads_are_relayed_to_the_critic_server_under_the_rollout_gate(qwen, tmp_path):
    critic = FakeCritic(qwen.critic)
    staging = tmp_path / "critic-staging"
    store = UploadStore(staging, what="critic", reference=critic.model, in_use=lambda: critic.weights_dir)
    gated: list[int] = []

    async def around_commit(load):
        version, seconds = await load()  # the rollout server's gate would be held here
        gated.append(version)
        return CriticWeightsResponse(critic_version=version, load_time_s=seconds)

    with serving(build_critic_app(critic, api_key=KEY, upload_store=store)) as critic_url:
        rollout = build_app(ServerConfig(api_key=KEY))
        relay = ForwardedUploads(critic_url, api_key=KEY, around_commit=around_commit)
        rollout.state.uploads = {"critic": relay}
        with serving(rollout) as url, EspoClient(base_url=url, api_key=KEY) as client:
            assert client.upload_critic_weights(qwen.new_critic, shard_bytes=64 << 10).critic_version == 1
            assert gated == [1] and critic.version == 1
            assert_loaded(critic.pushes.loaded[-1], qwen.new_critic.state_dict())
            # the critic's complaint comes back with its status and field
            with pytest.raises(APIStatusError) as caught:
                client.upload_critic_weights({"score.weight": torch.zeros(3, 3)})
            assert caught.value.status_code == 400 and "score.weight has shape [3, 3]" in str(caught.value)
            assert "critic at" in str(caught.value)
            assert uploads_on_disk(staging) == [Path(critic.weights_dir).name]
            # a policy upload on a server without policy uploads says so
            with pytest.raises(APIStatusError, match="takes no policy uploads"):
                client.upload_weights({"x": torch.zeros(1)})


# --- gRPC: the same uploads, client-streamed ------------------------------------------------------


@contextlib.contextmanager
def grpc_serving(uploads: dict) -> Iterator[str]:
    """The gRPC servicer over `uploads` on a free loopback port, its own event loop in a thread."""
    import grpc

    from espo_client.proto import espo_pb2_grpc as pb_grpc
    from espo_server.grpc_server import RolloutsServicer

    loop = asyncio.new_event_loop()
    started: dict = {}

    async def start() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        pb_grpc.add_RolloutsServicer_to_server(RolloutsServicer(None, ServerConfig(), uploads), server)  # type: ignore[arg-type]
        started["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started["server"] = server

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{started['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(started["server"].stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def test_grpc_uploads_stream_the_same_checkpoint_and_refuse_the_same_mistakes(qwen, tmp_path):
    from espo_client.grpc_client import GrpcEspoClient, GrpcStatusError

    pushes = Pushes(qwen.policy)
    staging = tmp_path / "staging"
    store = UploadStore(staging, what="policy", reference=str(qwen.policy), in_use=lambda: pushes.path)
    with grpc_serving({"policy": LocalUploads(store, pushes)}) as target, GrpcEspoClient(target) as client:
        answer = client.upload_weights(qwen.new_policy, version=2, shard_bytes=64 << 10)
        assert answer.policy_version == 2
        assert_loaded(pushes.loaded[-1], expected_tensors(qwen.new_policy))
        with pytest.raises(GrpcStatusError) as caught:
            client.upload_weights(bad_shape(None))
        assert caught.value.param == "shard" and "model.norm.weight has shape [7]" in caught.value.details
        with pytest.raises(GrpcStatusError) as caught:
            client.upload_critic_weights(qwen.new_critic)
        assert "takes no critic uploads" in caught.value.details
        # a stream that stops before its commit loads nothing and leaves nothing
        from espo_client.grpc_client import upload_messages

        messages = list(upload_messages(qwen.new_policy, version=None, config=None))[:-1]
        with pytest.raises(GrpcStatusError, match="without `commit`"):
            client._upload(client._stub.UploadWeights, iter(messages), WeightsResponse)
        assert len(pushes.loaded) == 1 and uploads_on_disk(staging) == [Path(pushes.path).name]


def test_replicas_get_each_shard_made_once_and_all_or_none_commit(qwen, tmp_path):
    from espo_client import BroadcastError, Replicas

    servers = []
    with contextlib.ExitStack() as stack:
        for k in range(2):
            pushes = Pushes(qwen.policy)
            store = UploadStore(
                tmp_path / f"staging{k}",
                what="policy",
                reference=str(qwen.policy),
                in_use=lambda p=pushes: p.path,
            )
            app = build_app(ServerConfig(api_key=KEY))
            app.state.uploads = {"policy": LocalUploads(store, pushes)}
            servers.append(SimpleNamespace(url=stack.enter_context(serving(app)), pushes=pushes, store=store))
        with Replicas(base_urls=[s.url for s in servers], api_key=KEY) as client:
            made = []
            real_shards = shards

            def counted(*args, **kwargs):
                for shard in real_shards(*args, **kwargs):
                    made.append(shard.name)
                    yield shard

            import espo_client.replicas as replicas_module

            replicas_module.shards = counted
            try:
                assert (
                    client.upload_weights(qwen.new_policy, shard_bytes=64 << 10, version=5).policy_version
                    == 5
                )
            finally:
                replicas_module.shards = real_shards
            assert len(made) == len(set(made)) > 1  # each shard made once for both replicas
            for s in servers:
                assert_loaded(s.pushes.loaded[-1], expected_tensors(qwen.new_policy))
            servers[1].store.max_bytes = 1000  # the second replica refuses: no replica commits
            with pytest.raises(BroadcastError) as caught:
                client.upload_weights(qwen.new_policy, version=6)
            assert caught.value.failed and list(caught.value.failed) == [servers[1].url]
            assert [s.pushes.version for s in servers] == [5, 5]
            for k in range(2):
                wait_until(
                    lambda k=k: (
                        uploads_on_disk(tmp_path / f"staging{k}") == [Path(servers[k].pushes.path).name]
                    ),
                    "the abandoned uploads are deleted",
                )
