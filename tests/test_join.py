"""Replicas that join warm (`--join`): the join step against peers on loopback without vLLM (the
real app over a fake engine, or a small fake peer that lies), and end to end between two real
rollout servers (the session's `rollout_server` as the peer, one new server joining it)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from espo_client import EspoClient
from espo_client.protocol import EspoState
from espo_server import weight_files as weight_files_module
from espo_server.admin import JoinStatus
from espo_server.app import build_app
from espo_server.config import ServerConfig
from espo_server.critic_engine import InProcessCritic
from espo_server.errors import ServiceError
from espo_server.join import run_join
from espo_server.process import ServerProcess, espo_server_argv, free_port
from espo_server.service import RolloutService
from espo_server.uploads import UploadStore
from espo_server.weight_files import weight_files
from tests.conftest import CRITIC_TIMEOUT_S, MAX_MODEL_LEN
from tests.fakes import FakeEngine, service
from tests.live_server import EAGER, PROMPT, rollouts
from tests.test_uploads import serving

KEY = "sesame"
WARM = EspoState(**EAGER)


def peer_app(weights: Path, version: int, state: EspoState = WARM, key: str | None = KEY) -> FastAPI:
    """The real rollout app over a fake engine that serves `weights` as `version`."""
    engine = FakeEngine()
    engine.weights_path, engine.policy_version = str(weights), version
    svc = service(engine, None, api_key=key)
    svc.set_state(state)
    app = build_app(ServerConfig(model="fake", api_key=key))
    app.state.service = svc
    return app


def join_once(url: str, tmp_path: Path, model: str = "fake", **cfg) -> tuple[JoinStatus, RolloutService]:
    """A joiner (a fake engine serving `model`) joins `url`: its join status and its service; the
    copies are staged in an upload store in `tmp_path`, `joiner.store`."""
    config = ServerConfig(model=model, join=url, api_key=KEY, **cfg)
    engine = FakeEngine()
    engine.model = engine.weights_path = model
    joiner = service(engine, None)
    status = joiner.admin.join = JoinStatus("joining")

    async def main() -> None:
        joiner.store = UploadStore(
            tmp_path, what="policy", reference=None, in_use=lambda: engine.weights_path
        )
        await run_join(joiner, config, {"policy": joiner.store}, status)

    asyncio.run(main())
    return status, joiner


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def test_a_replica_joins_a_peer_over_http(tiny_models, tmp_path):
    with serving(peer_app(tiny_models["policy_b"], 7)) as url:
        listing = httpx.get(url + "/v1/weights/files", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert httpx.get(url + "/v1/weights/files").status_code == 401  # the weights need the key
        status, joiner = join_once(url, tmp_path)
    assert status.done, status.detail
    assert "policy version 7" in status.detail
    assert joiner.engine.policy_version == 7
    assert joiner.state().state == WARM
    served = {f.name: sha256(f) for f in weight_files(tiny_models["policy_b"])}
    assert {f["name"]: f["sha256"] for f in listing["files"]} == served
    assert "model.safetensors" in served and "config.json" in served
    (copy,) = tmp_path.glob("joined-policy-*")  # one directory of its own, what the peer serves
    assert {f.name: sha256(f) for f in weight_files(copy)} == served
    ok, detail = asyncio.run(joiner.readiness())
    assert ok and detail["join"].startswith(f"joined {url}")
    joiner.engine.weights_path = str(tiny_models["policy"])  # a later push serves other weights:
    joiner.store.sweep()  # the copy goes, as a committed upload's directory would
    assert not copy.exists()


class FakeCriticEngine:
    """Stands in for the vLLM engine of an `InProcessCritic`: a reload is accepted, and recorded."""

    def __init__(self) -> None:
        self.reloaded: list[str] = []

    async def collective_rpc(self, method: str, args: tuple) -> list[str | None]:
        self.reloaded.append(args[0])
        return [None]

    async def reset_prefix_cache(self) -> None:
        pass

    async def check_health(self) -> None:
        pass


def test_an_in_process_critic_is_copied_too(tiny_models, tmp_path):
    critic_dir = str(tiny_models["critic"])
    engine = FakeEngine()
    engine.weights_path, engine.policy_version = str(tiny_models["policy_b"]), 7
    peer = service(engine, InProcessCritic(FakeCriticEngine(), critic_dir, version=3), api_key=KEY)
    app = build_app(ServerConfig(model="fake", api_key=KEY))
    app.state.service = peer
    ours = InProcessCritic(FakeCriticEngine(), critic_dir)  # its load runs the critic's own checks
    joiner = service(FakeEngine(), ours)
    status = joiner.admin.join = JoinStatus("joining")

    async def main() -> None:
        stores = {
            what: UploadStore(tmp_path / what, what=what, reference=None, in_use=lambda: None)
            for what in ("policy", "critic")
        }
        await run_join(joiner, ServerConfig(model="fake", join=url, api_key=KEY), stores, status)

    with serving(app) as url:
        asyncio.run(main())
    assert status.done, status.detail
    assert "policy version 7, critic version 3" in status.detail
    assert ours.version == 3 and ours.llm.reloaded == [ours.weights_dir]
    (copy,) = (tmp_path / "critic").glob("joined-critic-*")
    assert ours.weights_dir == str(copy)
    assert {f.name: sha256(f) for f in weight_files(copy)} == {
        f.name: sha256(f) for f in weight_files(tiny_models["critic"])
    }


def test_a_replica_that_cannot_reach_its_peer_stays_unready(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    status, joiner = join_once(url, tmp_path, join_timeout_s=1.5)
    assert not status.done
    assert status.detail.startswith("join failed:") and "no answer within 1.5s" in status.detail
    ok, detail = asyncio.run(joiner.readiness())
    assert not ok and detail["join"] == status.detail
    assert joiner.engine.policy_version == 0


def test_join_required_false_serves_as_started_when_no_peer_answers(tmp_path):
    status, joiner = join_once(
        f"http://127.0.0.1:{free_port()}", tmp_path, join_timeout_s=1, join_required=False
    )
    assert status.done and "serving as started" in status.detail
    assert asyncio.run(joiner.readiness())[0]


def lying_peer(
    weights: Path, *, sha: str | None = None, state: dict | str | None = None, moving: bool = False
) -> FastAPI:
    """A peer that lists `weights` (with a wrong SHA-256 if `sha`) and answers `state`; `moving`: a
    peer whose version goes up at every look (a learner pushing all the time)."""
    app = FastAPI()
    files = weight_files(weights)
    looks = [0]

    @app.get("/v1/info")
    async def info() -> dict:
        looks[0] += moving
        return {"policy_version": 3 + looks[0], "critic_version": None}

    @app.get("/v1/weights/files")
    async def listing() -> dict:
        return {
            "version": 3,
            "files": [{"name": f.name, "size": f.stat().st_size, "sha256": sha or sha256(f)} for f in files],
        }

    @app.get("/v1/weights/files/{name}")
    async def download(name: str) -> FileResponse:
        return FileResponse(weights / name)

    @app.get("/v1/espo/state")
    async def get_state():
        if state == "busy":  # a peer that went away mid-join (answers 503 from here on)
            return JSONResponse({"error": {"message": "draining"}}, status_code=503)
        return {"state": state if state is not None else WARM.__dict__}

    return app


def test_a_peer_that_answered_then_went_away_is_not_given_up_on(tiny_models, tmp_path):
    """join_required=false gives up only on a peer that never answered: one that served its weights
    and then answered only 503 leaves the replica unready, not 'serving as started'."""
    with serving(lying_peer(tiny_models["policy_b"], state="busy")) as url:
        status, joiner = join_once(url, tmp_path, join_timeout_s=1, join_required=False)
    assert not status.done and status.detail.startswith("join failed:"), status.detail
    assert not asyncio.run(joiner.readiness())[0]


def test_a_file_that_fails_its_checksum_keeps_the_replica_unready(tiny_models, tmp_path):
    with serving(lying_peer(tiny_models["policy_b"], sha="0" * 64)) as url:
        status, joiner = join_once(url, tmp_path)
    assert not status.done
    assert "SHA-256" in status.detail and "its listing says" in status.detail and "0" * 64 in status.detail
    assert joiner.engine.policy_version == 0
    assert not list(tmp_path.glob("joined-*"))  # nothing of the failed copies is kept
    assert not asyncio.run(joiner.readiness())[0]


def test_a_peer_whose_weights_keep_changing_is_copied_again_then_given_up(tiny_models, tmp_path):
    with serving(lying_peer(tiny_models["policy_b"], moving=True)) as url:
        status, joiner = join_once(url, tmp_path)
    assert not status.done and "the peer's weights changed during the copy" in status.detail
    assert joiner.engine.policy_version == 0 and not list(tmp_path.glob("joined-*"))


def test_a_push_that_lands_while_the_state_is_read_is_copied_again(tiny_models, tmp_path):
    """The state is read before the versions are checked: a peer whose learner pushes version 4 (and
    its state) while the joiner reads the state is copied again, so weights and state are of one
    version (the state's `batches` here tells which version it came with)."""
    app = FastAPI()
    files = weight_files(tiny_models["policy_b"])
    version, state_reads = [3], [0]

    @app.get("/v1/info")
    async def info() -> dict:
        return {"policy_version": version[0], "critic_version": None}

    @app.get("/v1/weights/files")
    async def listing() -> dict:
        listed = [{"name": f.name, "size": f.stat().st_size, "sha256": sha256(f)} for f in files]
        return {"version": version[0], "files": listed}

    @app.get("/v1/weights/files/{name}")
    async def download(name: str) -> FileResponse:
        return FileResponse(tiny_models["policy_b"] / name)

    @app.get("/v1/espo/state")
    async def get_state() -> dict:
        state_reads[0] += 1
        answer = {**WARM.__dict__, "batches": version[0]}
        if state_reads[0] == 1:  # the push lands just after this read
            version[0] = 4
        return {"state": answer}

    with serving(app) as url:
        status, joiner = join_once(url, tmp_path)
    assert status.done, status.detail
    assert joiner.engine.policy_version == 4 and joiner.state().state.batches == 4
    assert state_reads[0] == 2 and len(list(tmp_path.glob("joined-policy-*"))) == 1


def test_weights_the_replica_cannot_serve_keep_it_unready(tiny_models, tmp_path):
    with serving(lying_peer(tiny_models["critic"])) as url:  # a critic's checkpoint for a policy
        status, joiner = join_once(url, tmp_path, model=str(tiny_models["policy"]))
    assert not status.done
    assert "the peer's policy weights cannot be served here" in status.detail, status.detail
    assert "not a checkpoint of the served model" in status.detail
    assert joiner.engine.policy_version == 0


def test_a_state_the_replica_refuses_keeps_it_unready(tiny_models, tmp_path):
    with serving(lying_peer(tiny_models["policy_b"], state={**WARM.__dict__, "var": "lots"})) as url:
        status, _ = join_once(url, tmp_path)
    assert not status.done
    assert "the peer's ESPO state is not one this server takes: state.var" in status.detail, status.detail


def test_a_peer_that_is_joining_itself_is_no_peer_yet(tiny_models, tmp_path):
    app = peer_app(tiny_models["policy_b"], 4)
    app.state.service.admin.join = JoinStatus("joining: copying")
    with serving(app) as url:
        r = httpx.get(url + "/v1/weights/files", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and "not ready to be joined" in r.json()["error"]["message"]
        status, _ = join_once(url, tmp_path, join_timeout_s=1)
    assert not status.done and "503" in status.detail and "no answer within" in status.detail


def test_the_file_route_serves_only_the_checkpoints_files(tiny_models):
    auth = {"Authorization": f"Bearer {KEY}"}
    with serving(peer_app(tiny_models["policy_b"], 1)) as url:
        with EspoClient(base_url=url, api_key=KEY) as client:
            listed = client.weight_files()
        assert listed.version == 1 and {f.name for f in listed.files} == {"config.json", "model.safetensors"}
        r = httpx.get(url + "/v1/weights/files/model.safetensors", headers=auth)
        assert (
            r.status_code == 200 and r.content == (tiny_models["policy_b"] / "model.safetensors").read_bytes()
        )
        for name in ("tokenizer.json", "..%2Fconfig.json", "missing.safetensors"):
            r = httpx.get(url + f"/v1/weights/files/{name}", headers=auth)
            assert r.status_code == 404, (name, r.text)
        r = httpx.get(url + "/v1/critic/weights/files", headers=auth)  # no in-process critic here
        assert r.status_code == 400 and "no in-process critic" in r.json()["error"]["message"]


@pytest.mark.vllm
def test_a_second_real_server_joins_warm(rollout_server, critic_server, tiny_models, server_logs):
    """The peer (the session's rollout server) gets a weight push and a state; a new server started
    with --join reports ready with its version and state and samples the same tokens."""
    peer = rollout_server.url
    original = httpx.get(peer + "/v1/espo/state", timeout=10).json()["state"]
    push = httpx.post(
        peer + "/v1/weights", json={"path": str(tiny_models["policy_b"]), "version": 41}, timeout=300
    )
    assert push.status_code == 200, push.text
    assert httpx.put(peer + "/v1/espo/state", json=EAGER, timeout=10).status_code == 200
    try:
        port = free_port()
        argv = espo_server_argv(
            "serve", "--model", str(tiny_models["policy"]), "--critic", "remote",
            "--critic-url", critic_server.url, "--critic-timeout-s", CRITIC_TIMEOUT_S,
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--port", str(port),
            "--verifier", "toy", "--join", peer,
        )  # fmt: skip
        with ServerProcess("joiner", argv, port, server_logs) as joiner:
            joiner.wait_ready()
            ready = httpx.get(joiner.url + "/readyz", timeout=10).json()
            assert ready["detail"]["join"].startswith(f"joined {peer}: policy version 41"), ready
            assert httpx.get(joiner.url + "/v1/info", timeout=10).json()["policy_version"] == 41
            assert httpx.get(joiner.url + "/v1/espo/state", timeout=10).json()["state"] == EAGER
            theirs, ours = (
                rollouts(
                    server, prompts=[{"token_ids": PROMPT}], n=2, max_tokens=24, seed=5, stop_rule="none"
                )
                for server in (rollout_server, joiner)
            )
            for a, b in zip(theirs["trajectories"], ours["trajectories"], strict=True):
                assert b["policy_version"] == 41 and a["token_ids"] == b["token_ids"]
                assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) < 1e-4
            assert "join: copying the policy weights" in joiner.log_tail(400)
    finally:  # the peer serves the seed-0 policy and its state again, for the other tests
        back = httpx.post(
            peer + "/v1/weights", json={"path": str(tiny_models["policy"]), "version": 42}, timeout=300
        )
        assert back.status_code == 200, back.text
        assert httpx.put(peer + "/v1/espo/state", json=original, timeout=10).status_code == 200


def test_replicas_listing_one_new_checkpoint_together_hash_it_once(tmp_path, monkeypatch):
    """A scale-up: several joiners list the same just-pushed checkpoint at once; each shard is read
    and hashed once, the others wait for its digest."""
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(bytes(range(256)) * 40_000)
    hashed: list[Path] = []
    digest = weight_files_module._digest

    def counted_digest(file: Path) -> str:
        hashed.append(file)
        return digest(file)

    monkeypatch.setattr(weight_files_module, "_digest", counted_digest)
    start = threading.Barrier(4)
    digests: list[str] = []

    def listing() -> None:
        start.wait()
        digests.append(weight_files_module.sha256_of(shard))

    threads = [threading.Thread(target=listing) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert hashed == [shard]
    assert digests == [hashlib.new("sha256", shard.read_bytes()).hexdigest()] * 4


def test_a_learners_push_to_a_joining_replica_is_503_and_the_join_still_loads(tiny_models, tmp_path):
    """A push sent straight to a replica still copying its peer (not through the Service, which sends
    only to ready replicas) would be overwritten by the peer's copy: refused with 503 and a
    Retry-After, by path and by upload alike, until the join is done; the join's own load goes on."""
    joiner = service(FakeEngine(), None, weights_dir=[str(tiny_models["policy"].parent)])
    joiner.admin.join = JoinStatus("joining: http://peer (copying 1 of 2 files)")

    async def refused() -> list:
        errors = []
        for push in (
            lambda: joiner.load_weights(str(tiny_models["policy"]), 5),
            lambda: joiner.serve_weights(str(tiny_models["policy"]), 5),  # an upload's commit
            lambda: joiner.update_critic(lambda: asyncio.sleep(0, (1, 0.0))),
        ):
            with pytest.raises(ServiceError) as error:
                await push()
            errors.append(error.value)
        return errors

    for error in asyncio.run(refused()):
        assert error.status == 503 and error.retry_after_s == 5.0
        assert "joining a peer" in error.message and "overwritten" in error.message
    assert joiner.engine.policy_version == 0
    asyncio.run(joiner.admin.serve_weights(str(tiny_models["policy"]), 9))  # the join's load
    assert joiner.engine.policy_version == 9
    joiner.admin.join.done = True
    asyncio.run(joiner.load_weights(str(tiny_models["policy"]), 10))  # joined: pushes as usual
    assert joiner.engine.policy_version == 10
