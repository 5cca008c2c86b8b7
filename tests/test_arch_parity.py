"""The architectures users train, served for real: a Qwen2.5-style and a Llama-3.2-style pair (tied
embeddings, grouped-query attention, a chat template; `*ForTokenClassification` critics), made from
configs with random weights. Each is served (policy and critic in one process, float32), rolled out
with `espo` on chat-templated prompts, then pushed a new policy and a new critic by upload from
torch modules in this process, and another policy as (name, tensor) copies (a weight hook's form:
the tied output layer a copy of the input embeddings); logprobs and critic values match HF before
and after the pushes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from espo_client import APIStatusError, EspoClient
from espo_server.process import ServerProcess, espo_server_argv, free_port
from espo_server.tiny_model import ARCHS, TinyConfig, make_arch_model, make_arch_models
from tests.conftest import CRITIC_TIMEOUT_S

pytestmark = pytest.mark.vllm

# mu = -1 puts every normalised regret at >= 1 (g >= 0), so z_t passes beta*eps = 0.2 from the first
# token whatever is sampled: the critic is asked in every trajectory, on any CPU (a random model's
# regrets are small: with mu 0.3 whether it was asked depended on what was sampled)
EAGER = {"mu": -1.0, "var": 1.0, "beta": 1.0, "warm": True, "initialised": True, "batches": 5}
TOLERANCE = 1e-4
QUESTIONS = ["7+5=", "(3*4)-2="]


@pytest.fixture(scope="module")
def arch_servers(tmp_path_factory, server_logs) -> Iterator[dict[str, tuple[ServerProcess, Path, Path]]]:
    """A server per architecture, started together (their engines load side by side)."""
    servers: dict[str, tuple[ServerProcess, Path, Path]] = {}
    try:
        for arch in sorted(ARCHS):
            policy, critic = make_arch_models(tmp_path_factory.mktemp(arch), arch, seed=0)
            port = free_port()
            argv = espo_server_argv(
                "serve", "--model", str(policy), "--critic-model", str(critic), "--dtype", "float32",
                "--max-model-len", "256", "--port", str(port), "--served-model-name", arch,
                "--critic-timeout-s", CRITIC_TIMEOUT_S,  # a busy machine's first critic call is slow
            )  # fmt: skip
            servers[arch] = (ServerProcess(f"arch-{arch}", argv, port, server_logs).start(), policy, critic)
        yield servers
    finally:
        for server, _, _ in servers.values():
            server.terminate()
        for server, _, _ in servers.values():
            server.stop()


@pytest.fixture(params=sorted(ARCHS))
def served(request, arch_servers) -> tuple[str, ServerProcess, Path, Path]:
    arch = request.param
    server, policy, critic = arch_servers[arch]
    return arch, server.wait_ready(), policy, critic


def chat_prompts(policy_dir: Path) -> list[list[int]]:
    """The questions as chats through the model's own tokenizer, loaded as the server loads it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chats]


def hf_logprobs(model, prompt: list[int], response: list[int]) -> np.ndarray:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].float(), dim=-1)
    return np.array([logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response)])


def hf_value(critic, prefix: list[int]) -> float:
    with torch.no_grad():
        return critic(torch.tensor([prefix])).logits[0, -1, 0].item()


def parity(
    client: EspoClient, prompts: list[list[int]], policy, critic, seed: int
) -> tuple[float, float, int]:
    """Roll out with `espo` (shadow: every trajectory runs to the end, the critic is still asked);
    the largest |vLLM - HF| of the sampled tokens' logprobs and of the critic values, and how many
    values were compared."""
    out = client.rollouts(
        prompts=[{"token_ids": p} for p in prompts], n=2, max_tokens=24, seed=seed, ignore_eos=True,
        stop_rule="espo", shadow=True, state=EAGER, include=["values"],
        rule_params={"min_tokens": 2, "critic_stride": 2},
    )  # fmt: skip
    assert not any(t.critic_error for t in out.trajectories), "a critic call failed (timed out?)"
    logprob_diff, value_diff, values = 0.0, 0.0, 0
    for t in out.trajectories:
        prompt = prompts[t.prompt_index]
        ref = hf_logprobs(policy, prompt, t.token_ids)
        logprob_diff = max(logprob_diff, float(np.max(np.abs(ref - np.array(t.logprobs)))))
        for step, value in enumerate(t.traces.values or []):
            if value is not None:  # V(s_t): the prompt and the tokens before step t
                value_diff = max(value_diff, abs(value - hf_value(critic, prompt + t.token_ids[:step])))
                values += 1
    return logprob_diff, value_diff, values


def test_serve_rollout_push_by_upload_and_match_hf(served, tmp_path):
    arch, server, policy_dir, critic_dir = served
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, torch_dtype=torch.float32).eval()
    critic = AutoModelForTokenClassification.from_pretrained(critic_dir, torch_dtype=torch.float32).eval()
    assert policy.config.tie_word_embeddings and critic.config.problem_type == "regression"
    prompts = chat_prompts(policy_dir)

    # the server's chat template is the tokenizer's: the same prompt tokens as applied here
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": arch, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 2},
        timeout=60,
    )
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(prompts[0]), chat.text

    with EspoClient(base_url=server.url) as client:
        before = parity(client, prompts, policy, critic, seed=1)
        # a model of another size is refused shard by shard; the old weights serve on
        other = make_arch_model(ARCHS[arch], TinyConfig(hidden_size=64, num_heads=1), seed=3)
        with pytest.raises(APIStatusError) as refused:
            client.upload_weights(other)
        assert refused.value.status_code == 400 and "has shape" in str(refused.value)
        assert client.info().policy_version == 0
        # a torch module (its state_dict names the tied tensor twice: sent once)
        new_policy = make_arch_model(ARCHS[arch], TinyConfig(), seed=11).eval()
        new_critic = make_arch_model(ARCHS[arch], TinyConfig(), seed=12, critic=True).eval()
        assert client.upload_weights(new_policy).policy_version == 1
        assert client.upload_critic_weights(new_critic).critic_version == 1
        after = parity(client, prompts, new_policy, new_critic, seed=1)
        # what a weight hook that gathers each parameter apart hands over: the tied output layer as
        # a copy of the input embeddings (taken as the one tensor both share)
        hooked = make_arch_model(ARCHS[arch], TinyConfig(), seed=13).eval()
        copies = ((name, tensor.clone()) for name, tensor in hooked.state_dict().items())
        assert client.upload_weights(copies).policy_version == 2
        after_copies = parity(client, prompts, hooked, new_critic, seed=2)
        stale = parity(client, prompts, policy, critic, seed=1)  # the old models no longer match
    phases = (("before pushes", before), ("after upload", after), ("after upload of copies", after_copies))
    for phase, (dlogprob, dvalue, values) in phases:
        print(f"\nPARITY {arch} {phase}: max|dlogp| {dlogprob:.2e}, max|dV| {dvalue:.2e} ({values} values)")
    assert all(values > 0 for _, (_, _, values) in phases), "the critic was never asked"
    assert all(max(diffs[:2]) < TOLERANCE for _, diffs in phases)
    assert stale[0] > 1e-2 and stale[1] > 1e-3  # the pushes really changed what serves
