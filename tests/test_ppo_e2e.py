"""The reference PPO learner, examples/ppo_toy.py, run with tiny sizes so that it never rots.

* fast: its pieces (flags from `Args`, logprobs and values on left-padded batches) and its whole
  loop against a fake server (an `httpx.MockTransport`), in both state-ownership modes;
* vllm: two iterations against the real rollout server, pushing by upload (the critic's relayed to
  its remote critic server), then the pushed weights are what it serves.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pydantic import BaseModel

from espo_client import protocol, stop_rule
from espo_client.learner import trajectories_to_tensors
from espo_server.tiny_model import EOS_ID, PAD_ID
from espo_server.toy.task import decode, encode, solve
from tests.scripts import script_module

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ppo_toy.py"


@pytest.fixture(scope="module")
def ppo_toy():
    """examples/ppo_toy.py as a module (examples/ is not a package)."""
    with script_module(EXAMPLE, "ppo_toy") as module:
        yield module


def tiny_args(out: Path, policy: Path, critic: Path, *extra: str) -> list[str]:
    return [
        "--policy", str(policy),
        "--critic", str(critic),
        "--out", str(out),
        "--iterations", "2",
        "--problems", "2",
        "--n", "2",
        "--max-tokens", "16",
        "--epochs", "1",
        "--minibatch-size", "2",
        "--learning-rate", "1e-3",
        "--threads", "1",
        "--ready-timeout", "30",
        *extra,
    ]  # fmt: skip


def hf_logprobs(model_dir: Path | str, prompt: list[int], response: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return np.array([logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response)])


# ---------------------------------------------------------------------------------------------
# Fast: no vLLM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny policy + critic (cheap; the session's `tiny_models` would do as well)."""
    from espo_server.tiny_model import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("ppo-tiny"), seed=3)


def test_flags_come_from_args(ppo_toy):
    args = ppo_toy.parse_args([])
    assert args == ppo_toy.Args()
    args = ppo_toy.parse_args(
        ["--stop-rule", "none", "--state-owner", "server", "--no-norm-adv", "--n", "3", "--policy", "/p"]
    )
    assert (args.stop_rule, args.state_owner, args.norm_adv, args.n, args.policy) == (
        "none", "server", False, 3, "/p"
    )  # fmt: skip
    with pytest.raises(SystemExit):
        ppo_toy.parse_args(["--stop-rule", "sometimes"])
    assert {f.name for f in dataclasses.fields(ppo_toy.Args)} >= {
        "url", "policy", "critic", "out", "problems", "n", "max_tokens", "epochs", "iterations",
        "stop_rule", "state_owner",
    }  # fmt: skip


def fake_trajectories(
    prompts: list[list[int]], n: int, max_tokens: int, seed: int
) -> list[protocol.Trajectory]:
    """Rows of different lengths and every end reason; prompt i's sample 0 ends with EOS."""
    rng = random.Random(seed)
    out = []
    for i, _ in enumerate(prompts):
        for j in range(n):
            reason = ("eos", "length", "espo_stop")[(i + j) % 3]
            length = max_tokens if reason == "length" else rng.randint(2, max_tokens)
            tokens = [rng.randint(4, 20) for _ in range(length)]
            if reason == "eos":
                tokens[-1] = EOS_ID
            out.append(
                protocol.Trajectory(
                    prompt_index=i,
                    sample_index=j,
                    token_ids=tokens,
                    logprobs=[-rng.random() * 3 for _ in tokens],
                    end_reason=reason,
                    stop_step=length - 1 if reason == "espo_stop" else None,
                    reward=-1.0 if reason == "espo_stop" else None,
                    policy_version=0,
                )
            )
    return out


def test_logprobs_and_values_line_up_on_left_padded_batches(ppo_toy, tiny_pair):
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    policy = LlamaForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
    critic = LlamaForTokenClassification.from_pretrained(tiny_pair[1], dtype=torch.float32).eval()
    prompts = [encode("7+5="), encode("12+3+19+4=")]  # different lengths: the first is left-padded
    trajectories = fake_trajectories(prompts, n=2, max_tokens=9, seed=1)
    rewards = [1.0 if t.end_reason == "eos" else None for t in trajectories]
    batch = trajectories_to_tensors(trajectories, prompts, pad_id=PAD_ID, rewards=rewards)
    width = batch["input_ids"].shape[1] - batch["responses"].shape[1]
    with torch.no_grad():
        logprobs = ppo_toy.response_logprobs(policy, batch)
        values = ppo_toy.critic_values(critic, batch)
    for row, t in enumerate(trajectories):
        ids = torch.tensor([prompts[t.prompt_index] + t.token_ids])
        p = len(prompts[t.prompt_index])
        with torch.no_grad():
            ref_logp = torch.log_softmax(policy(ids).logits[0].float(), -1)
            ref_v = critic(ids).logits[0, :, 0].float()
        expected = ref_logp[p - 1 : -1].gather(-1, torch.tensor(t.token_ids)[:, None])[:, 0]
        length = len(t.token_ids)
        torch.testing.assert_close(logprobs[row, :length], expected, atol=1e-5, rtol=0)
        # values[:, width-1+t] is V(s_t), the value of the prefix before response token t
        torch.testing.assert_close(values[row, width - 1 : width + length], ref_v[p - 1 :], atol=1e-5, rtol=0)


class FakeServer:
    """Just enough of the rollout server for the learner's loop; it records every call."""

    def __init__(self) -> None:
        self.version = 0
        self.critic_version = 0
        self.state = protocol.EspoState()
        self.calls: list[tuple[str, str, dict | None]] = []
        self.uploaded: dict[str, dict] = {}

    def handle(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        if "/shards/" in path:  # an upload's shard: a safetensors file, its digest in a header
            return self.shard(request)
        body = json.loads(request.content) if request.content else None
        self.calls.append((method, path, body))
        if path == "/readyz":
            return self.reply(protocol.HealthResponse(status="ready"))
        if path == "/v1/info":
            info = protocol.InfoResponse(
                model="fake", policy_version=self.version, vocab_size=57, max_model_len=512,
                eos_token_id=EOS_ID, max_n=64, max_prompts=64, critic="fake", critic_fallback="no_stop",
                default_stop_rule="none", rule_defaults=dataclasses.asdict(stop_rule.EspoParams()),
                entropy_top_k=8, state=self.state, critic_version=self.critic_version,
            )  # fmt: skip
            return self.reply(info)
        if path == "/v1/rollouts":
            return self.reply(self.rollouts(protocol.RolloutRequest.model_validate(body)))
        if path == "/v1/weights":
            directory = Path(body["path"])
            assert any(directory.glob("*.safetensors")), directory
            assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is False
            self.version = body["version"]
            return self.reply(protocol.WeightsResponse(policy_version=self.version, load_time_s=0.0))
        if path == "/v1/critic/weights":
            assert any(Path(body["path"]).glob("*.safetensors")), body
            self.critic_version = body["version"]
            return self.reply(protocol.CriticWeightsResponse(critic_version=body["version"], load_time_s=0.0))
        if path in ("/v1/weights/uploads", "/v1/critic/weights/uploads"):
            self.uploaded[path] = {}
            status = protocol.UploadResponse(
                upload_id="u", state="open", max_bytes=1 << 30, idle_timeout_s=60
            )
            return self.reply(status)
        if path == "/v1/weights/uploads/u/commit":
            assert "model.embed_tokens.weight" in self.uploaded["/v1/weights/uploads"]
            self.version = body["version"]
            return self.reply(protocol.WeightsResponse(policy_version=self.version, load_time_s=0.0))
        if path == "/v1/critic/weights/uploads/u/commit":
            assert "score.weight" in self.uploaded["/v1/critic/weights/uploads"]
            self.critic_version = body["version"]
            return self.reply(protocol.CriticWeightsResponse(critic_version=body["version"], load_time_s=0.0))
        if path == "/v1/espo/state" and method == "PUT":
            self.state = protocol.EspoState(**body)
            return self.reply(protocol.StateResponse(state=self.state))
        if path == "/v1/espo/commit":
            self.state = dataclasses.replace(self.state, batches=self.state.batches + 1)
            return self.reply(protocol.StateResponse(state=self.state))
        return httpx.Response(404, json={"error": {"message": path, "type": "not_found", "code": 404}})

    def shard(self, request: httpx.Request) -> httpx.Response:
        from safetensors.torch import load

        prefix = request.url.path.split("/u/shards/")[0]
        digest = base64.b64encode(hashlib.sha256(request.content).digest()).decode()
        assert request.headers["content-digest"] == f"sha-256=:{digest}:"
        self.uploaded[prefix].update(load(request.content))
        self.calls.append((request.method, request.url.path, None))
        return self.reply(
            protocol.UploadResponse(upload_id="u", state="open", max_bytes=1 << 30, idle_timeout_s=60)
        )

    @staticmethod
    def reply(model: BaseModel) -> httpx.Response:
        headers = {"content-type": "application/json"}
        return httpx.Response(200, content=model.model_dump_json(), headers=headers)

    def rollouts(self, request: protocol.RolloutRequest) -> protocol.RolloutResponse:
        prompts = [p.token_ids or [] for p in request.prompts]
        trajectories = fake_trajectories(prompts, request.n, request.max_tokens, request.seed or 0)
        for k, t in enumerate(trajectories):
            solution = solve(decode(prompts[t.prompt_index])[0])
            if t.end_reason == "eos" and solution is not None and k % 2 == 0:
                tokens = [*encode(solution.solution), EOS_ID][: request.max_tokens]  # right if it fits
                trajectories[k] = t.model_copy(update={"token_ids": tokens, "logprobs": [-0.5] * len(tokens)})
        trajectories = [t.model_copy(update={"policy_version": self.version}) for t in trajectories]
        lengths = [len(t.token_ids) for t in trajectories]
        usage = protocol.Usage(
            prompt_tokens=sum(len(p) for p in prompts) * request.n,
            generated_tokens=sum(lengths),
            trajectories=len(trajectories),
            stopped=sum(t.end_reason == "espo_stop" for t in trajectories),
            regret_tokens=sum(lengths),
            regret_sum=0.4 * sum(lengths),
            regret_sumsq=0.3 * sum(lengths),
        )
        used = request.state or self.state
        after = None
        if request.state is not None:
            params = stop_rule.EspoParams()
            after = stop_rule.update_state(used, usage.batch_stats(), params)

        return protocol.RolloutResponse(
            request_id=request.request_id or "r",
            trajectories=trajectories,
            usage=usage,
            stop_rule=request.stop_rule or "none",
            shadow=False,
            rule_params=dataclasses.asdict(stop_rule.EspoParams()),
            state_used=used,
            state_after=after,
            policy_version=self.version,
        )


def test_runs_started_at_once_get_directories_of_their_own(ppo_toy, tmp_path):
    """Sixteen threads ask for one run name at the same moment: each gets its own directory (the
    exists()-then-mkdir it replaced let two of bench/reproduce.py's parallel chains collide on CI)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "runs" / "r-2").mkdir(parents=True)  # a suffix taken by an earlier run is skipped
    start = threading.Barrier(16)

    def claim(_: int) -> Path:
        start.wait()
        return ppo_toy.fresh_run_dir(tmp_path / "runs", "r")

    with ThreadPoolExecutor(16) as pool:
        dirs = list(pool.map(claim, range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() and not any(d.iterdir()) for d in dirs)
    assert {d.name for d in dirs} == {"r"} | {f"r-{k}" for k in range(3, 18)}


@pytest.mark.parametrize("owner", ["learner", "server"])
def test_the_loop_against_a_fake_server(ppo_toy, tiny_pair, tmp_path, owner):
    server = FakeServer()
    argv = tiny_args(tmp_path, *tiny_pair, "--url", "http://fake", "--state-owner", owner)
    argv += ["--max-tokens", "64"]  # room for a whole toy solution: the fake's correct answers
    push_initial = owner == "learner"  # both ways, once each; uploads with one, paths with the other
    if not push_initial:
        argv += ["--no-push-initial", "--push", "path"]
    records = ppo_toy.main(argv, transport=httpx.MockTransport(server.handle))

    first = 1 if push_initial else 0
    assert [r["iteration"] for r in records] == [1, 2]
    assert [r["sampled_by_version"] for r in records] == [first, first + 1]
    assert [r["policy_version"] for r in records] == [first + 1, first + 2]
    assert any(r["accuracy"] > 0 for r in records)  # the fake's correct solutions were scored
    for r in records:
        assert np.isfinite([r["pg_loss"], r["v_loss"], r["approx_kl"]]).all()
        assert r["tokens_generated"] > 0 and 0 <= r["stop_rate"] <= 1
    log = [json.loads(line) for line in (Path(records[0]["critic_checkpoint"]).parent / "log.jsonl").open()]
    assert [r["iteration"] for r in log] == [1, 2]

    if push_initial:  # uploads: nothing written for them, the versions counted on
        commits = [body for method, path, body in server.calls if path == "/v1/weights/uploads/u/commit"]
        assert [b["version"] for b in commits] == [1, 2, 3] and all(r["checkpoint"] is None for r in records)
        assert not any(path == "/v1/weights" for _, path, _ in server.calls)
    else:
        pushes = [body for method, path, body in server.calls if path == "/v1/weights"]
        expected = [("iter-0001", first + 1), ("iter-0002", first + 2)]
        assert [(Path(b["path"]).name, b["version"]) for b in pushes] == expected
        assert len({b["path"] for b in pushes}) == len(pushes)  # a fresh directory each time
    calls = [body for method, path, body in server.calls if path == "/v1/rollouts"]
    assert len(calls) == 2 and all(c["stop_rule"] == "espo" for c in calls)
    if owner == "learner":
        assert all("batch_id" not in c for c in calls)
        assert [c["state"]["warm"] for c in calls] == [False, True]  # --warm-after 1
        assert [c["state"]["batches"] for c in calls] == [0, 1]  # folded forward by the learner
    else:
        assert all("state" not in c for c in calls)
        commits = [body["batch_id"] for method, path, body in server.calls if path == "/v1/espo/commit"]
        assert commits == [c["batch_id"] for c in calls] and len(set(commits)) == 2
        puts = [body for method, path, body in server.calls if method == "PUT"]
        assert [p["warm"] for p in puts] == [False, True]  # reset at start, warm before iteration 2
        assert server.state.warm and server.state.batches == 2


# ---------------------------------------------------------------------------------------------
# End to end: the real rollout server (vLLM on CPU, the tiny random policy, a remote critic)
# ---------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_ppo_example_trains_and_pushes_to_the_server(ppo_toy, rollout_server, tiny_models, tmp_path):
    url = rollout_server.url
    info = httpx.get(url + "/v1/info", timeout=30).json()
    start, critic_start = info["policy_version"], info["critic_version"]
    try:
        models = tiny_models["policy"], tiny_models["critic"]
        argv = tiny_args(tmp_path, *models, "--url", url, "--push-critic", "--save-policy")
        records = ppo_toy.main(argv)
        # the critic is pushed like the policy (through the rollout server to its remote critic)
        assert [r["critic_version"] for r in records] == [critic_start + 2, critic_start + 3]
        assert httpx.get(url + "/v1/info", timeout=30).json()["critic_version"] == critic_start + 3

        # the starting policy is pushed first (start + 1), then one push per iteration
        assert [r["iteration"] for r in records] == [1, 2]
        assert [r["sampled_by_version"] for r in records] == [start + 1, start + 2]
        assert [r["policy_version"] for r in records] == [start + 2, start + 3]
        for r in records:
            # the learner's own forward pass agrees with the server on the weights it serves
            assert r["logprob_gap"] < 1e-4, r
            assert r["tokens_generated"] > 0
        assert httpx.get(url + "/v1/info", timeout=30).json()["policy_version"] == start + 3

        # a fresh rollout samples from the pushed weights: HF parity with them, not with the old ones
        prompt = encode("7+5+9+2=")
        body = {
            "prompts": [{"token_ids": prompt}],
            "n": 2,
            "max_tokens": 24,
            "seed": 99,
            "ignore_eos": True,
            "stop_rule": "none",
        }
        out = httpx.post(url + "/v1/rollouts", json=body, timeout=300)
        assert out.status_code == 200, out.text
        pushed = records[-1]["checkpoint"]
        for t in out.json()["trajectories"]:
            assert t["policy_version"] == start + 3
            served = np.array(t["logprobs"])
            assert np.max(np.abs(hf_logprobs(pushed, prompt, t["token_ids"]) - served)) < 1e-4
            original = hf_logprobs(tiny_models["policy"], prompt, t["token_ids"])
            assert np.max(np.abs(original - served)) > 1e-3
    finally:
        # the server is shared with other test modules: give it its original weights back
        r = httpx.post(
            url + "/v1/weights", json={"path": str(tiny_models["policy"]), "version": start + 4}, timeout=300
        )
        assert r.status_code == 200, r.text
        body = {"path": str(tiny_models["critic"]), "version": critic_start + 4}
        r = httpx.post(url + "/v1/critic/weights", json=body, timeout=300)
        assert r.status_code == 200, r.text


def test_the_critic_is_saved_in_the_servers_format_and_evaluation_is_apart(ppo_toy, tiny_pair, tmp_path):
    from transformers import AutoConfig, LlamaForTokenClassification

    server = FakeServer()
    argv = tiny_args(
        tmp_path, *tiny_pair, "--url", "http://fake", "--eval-every", "1", "--eval-problems", "3"
    )
    records = ppo_toy.main(argv, transport=httpx.MockTransport(server.handle))
    for r in records:
        critic_dir = Path(r["critic_checkpoint"])
        assert critic_dir.name == f"critic-{r['iteration']:04d}"
        config = AutoConfig.from_pretrained(critic_dir)
        assert config.architectures == ["LlamaForTokenClassification"]
        assert config.num_labels == 1 and config.problem_type == "regression"
        assert not config.tie_word_embeddings and (critic_dir / "tokenizer.json").exists()
        LlamaForTokenClassification.from_pretrained(critic_dir)  # loads back
        assert 0 <= r["heldout_acc_t1"] <= 1 and 0 <= r["heldout_acc_greedy"] <= 1 and r["eval_tokens"] > 0
    assert [r["cumulative_tokens"] for r in records] == list(
        itertools.accumulate(r["tokens_generated"] for r in records)
    )  # rollout tokens only: the evaluation's are counted apart
    evals = [b for m, p, b in server.calls if p == "/v1/rollouts" and b["stop_rule"] == "none"]
    assert len(evals) == 2 * len(records)  # T=1 and greedy after each iteration
    assert all(not b["update_state"] and b["n"] == 1 for b in evals)
    assert {b["temperature"] for b in evals} == {0.0, 1.0}
    held = {tuple(p["token_ids"]) for b in evals for p in b["prompts"]}
    assert len(held) == 3  # the same held-out problems every time


@pytest.mark.parametrize("push", ["upload", "path"])
def test_push_critic_pushes_the_trained_critic_every_iteration(ppo_toy, tiny_pair, tmp_path, push):
    server = FakeServer()
    argv = tiny_args(tmp_path, *tiny_pair, "--url", "http://fake", "--push-critic", "--push", push)
    records = ppo_toy.main(argv, transport=httpx.MockTransport(server.handle))
    assert [r["critic_version"] for r in records] == [2, 3]
    route = "/v1/critic/weights" if push == "path" else "/v1/critic/weights/uploads/u/commit"
    pushes = [body for method, path, body in server.calls if path == route]
    assert [b["version"] for b in pushes] == [1, 2, 3]  # the starting critic first, then one per iteration
    # each saved in a fresh directory in the server's format (and pushed from there by path)
    saved = [tmp_path / next(tmp_path.iterdir()).name / f"critic-{k:04d}" for k in range(3)]
    if push == "path":
        assert [Path(b["path"]) for b in pushes] == saved
    for directory in saved:
        config = json.loads((directory / "config.json").read_text())
        assert config["architectures"] == ["LlamaForTokenClassification"]
        assert config["problem_type"] == "regression"
    # the critic pushed after iteration 1 comes before the rollouts of iteration 2
    order = [path for _, path, _ in server.calls if path in (route, "/v1/rollouts")]
    assert order[:3] == [route, "/v1/rollouts", route]
