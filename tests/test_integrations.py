"""espo_client.integrations against a real server: TRL's GRPOTrainer trains the tiny policy with the
server as its rollout backend (weights pushed after every step), and slime's hooks are called the
way slime calls them. Plus the adapters' pure pieces."""

from __future__ import annotations

import asyncio
import enum
import os
import time
from argparse import Namespace
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from espo_client import EspoClient
from espo_client.integrations import DEFAULT_STOP_REWARD, raw_is_sampling
from espo_client.integrations.slime import _request as slime_request
from espo_client.integrations.trl import _groups
from espo_client.integrations.verl import agent_output, espo_request
from espo_client.protocol import Trajectory
from espo_server.process import ServerProcess, espo_server_argv, free_port

EAGER = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}
"""A state under which regret_only stops the random tiny policy readily."""


# ----------------------------------------------------------------------------- pure pieces


def test_grpo_prompt_runs_become_groups():
    assert _groups(["a", "a", "b", "b"], 2) == [(0, 2), (2, 2)]
    assert _groups(["a", "a", "a", "a"], 2) == [(0, 2), (2, 2)]  # the same prompt drawn twice
    with pytest.raises(ValueError, match="num_generations=2"):
        _groups(["a", "a", "b"], 2)


def test_raw_logprobs_are_the_sampling_ones_only_without_processing():
    assert raw_is_sampling({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": None})
    for changed in ({"temperature": 0.7}, {"top_k": 20}, {"top_p": 0.9}, {"repetition_penalty": 1.1}):
        assert not raw_is_sampling(changed)


def test_slime_and_verl_sampling_translate():
    fields = slime_request(
        {"max_new_tokens": 32, "temperature": 0.8, "top_k": -1, "stop": "#", "no_stop_trim": True,
         "skip_special_tokens": False, "sampling_seed": 3}
    )  # fmt: skip
    assert fields == {"max_tokens": 32, "temperature": 0.8, "top_k": 0, "stop": ["#"], "seed": 3}
    with pytest.raises(ValueError, match="json_schema"):
        slime_request({"json_schema": "{}"})
    request = espo_request([5, 6], {"temperature": 1.0, "top_k": -1, "logprobs": 1}, 64)
    assert (
        request["max_tokens"] == 64
        and request["top_k"] == 0
        and request["prompts"] == [{"token_ids": [5, 6]}]
    )
    stopped = Trajectory(
        prompt_index=0, sample_index=0, token_ids=[5, 6, 7], logprobs=[-1.0, -2.0, -3.0],
        end_reason="espo_stop", stop_step=2, reward=-1.0, policy_version=4,
    )  # fmt: skip
    out = agent_output(stopped, response_length=2)
    assert out["response_ids"] == [5, 6] and out["response_logprobs"] == [-1.0, -2.0]
    assert out["reward_score"] == DEFAULT_STOP_REWARD == 0.0  # not the server's r_fail
    assert out["extra_fields"]["espo"]["policy_version"] == 4
    assert agent_output(stopped.model_copy(update={"end_reason": "eos"}), 8)["reward_score"] is None


# ----------------------------------------------------------------------------- against a server


@pytest.fixture(scope="module")
def trainer_server(tiny_models, server_logs, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server of its own (the trainers push weights into it), without a critic: GRPO-style
    trainers use regret_only."""
    weights = tmp_path_factory.mktemp("pushed")
    port = free_port()
    argv = espo_server_argv(
        "serve", "--model", str(tiny_models["policy"]), "--critic", "none", "--dtype", "float32",
        "--max-model-len", "512", "--port", str(port), "--weights-dir", str(weights),
        "--served-model-name", "tiny", "--verifier", "none",
    )  # fmt: skip
    with ServerProcess("trainer", argv, port, server_logs) as proc:
        proc.weights_dir = weights  # type: ignore[attr-defined]
        yield proc.wait_ready()


@pytest.mark.vllm
def test_trl_grpo_trains_with_espo_server_as_its_rollout_backend(trainer_server, tiny_models, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from espo_client.integrations.trl import EspoRollouts, PushWeights, stop_aware
    from espo_server.toy.task import generate, verify

    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    problems = generate(8, seed=3)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    client = EspoClient(base_url=trainer_server.url)
    client.set_state(EAGER)
    rollouts = EspoRollouts(client, rule_params={"min_tokens": 20}, seed=0)  # some end before
    scored: list[tuple[str, float]] = []

    def correct(prompts, completions, answer, **kwargs) -> list[float]:
        return [
            verify(p, c, a, finished=True).reward
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]

    task_reward = stop_aware(correct)

    def reward(*args, **kwargs) -> list[float]:
        rewards = task_reward(*args, **kwargs)
        scored.extend(zip(kwargs["espo_end_reason"], rewards, strict=True))
        return rewards

    steps = 3
    push = PushWeights(client)  # uploads: the trainer shares no disk with the server
    config = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), max_steps=steps, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=24, learning_rate=1e-4, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, bf16=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=str(tiny_models["policy"]), reward_funcs=[reward], args=config, train_dataset=dataset,
        rollout_func=rollouts, callbacks=[push],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    # every step sampled with the weights the step before pushed: versions 0, 1, 2
    assert [sorted({t.policy_version for t in r.trajectories}) for r in rollouts.responses] == [[0], [1], [2]]
    assert push.pushed == [1, 2, 3] and client.info().policy_version == steps
    # one ESPO batch per step: two closed (by the next step's call), the last one still open
    state = client.state()
    assert state.state.batches == EAGER["batches"] + steps - 1
    assert state.open_batch_id == f"{rollouts.batch_prefix}-{steps - 1}"
    # the rule stopped some completions, and the trainer saw the stop reward for them
    stops = [r for end, r in scored if end == "espo_stop"]
    assert stops and all(r == DEFAULT_STOP_REWARD for r in stops)
    assert len(stops) < len(scored)  # and the others got the task's reward
    assert len(scored) == steps * 4
    print(f"TRL GRPO: {steps} steps in {seconds:.1f}s, {len(stops)} of {len(scored)} completions stopped")


@dataclass
class SlimeSample:
    """The fields of slime's `Sample` (slime.utils.types) that a custom generate function uses."""

    class Status(enum.Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    prompt: str | list = ""
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    response_length: int = 0
    reward: float | None = None
    loss_mask: list[int] | None = None
    rollout_log_probs: list[float] | None = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)


@pytest.mark.vllm
def test_slime_generate_and_post_write_as_slime_calls_them(
    trainer_server, tiny_models, tmp_path, monkeypatch
):
    import shutil

    from espo_client.integrations import slime

    monkeypatch.setenv("ESPO_URL", trainer_server.url)
    monkeypatch.setenv("ESPO_BATCH_ID", "slime-test")
    client = EspoClient(base_url=trainer_server.url)
    client.set_state(EAGER)
    args = Namespace(rollout_max_response_len=32)
    sampling = {"max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop": None,
                "stop_token_ids": None, "skip_special_tokens": True, "no_stop_trim": True,
                "spaces_between_special_tokens": False}  # fmt: skip

    async def rollout() -> list[SlimeSample]:  # slime gathers a group's samples concurrently
        group = [SlimeSample(prompt="7+5+9=") for _ in range(6)] + [
            SlimeSample(tokens=[5, 6, 14]) for _ in range(2)
        ]
        return await asyncio.gather(*(slime.generate(args, s, dict(sampling)) for s in group))

    samples = asyncio.run(rollout())
    assert client.state().open_batch_id == "slime-test"  # one batch for the rollout step
    ends = set()
    for sample in samples:
        espo = sample.metadata["espo"]
        ends.add(espo["end_reason"])
        assert sample.response_length == len(sample.rollout_log_probs) == len(sample.loss_mask) > 0
        assert len(sample.tokens) > sample.response_length  # prompt + response
        if espo["end_reason"] == "espo_stop":
            assert sample.status is SlimeSample.Status.COMPLETED and sample.reward == DEFAULT_STOP_REWARD
        elif espo["end_reason"] == "length":
            assert sample.status is SlimeSample.Status.TRUNCATED and sample.reward is None
        else:
            assert sample.status is SlimeSample.Status.COMPLETED and sample.reward is None
    assert "espo_stop" in ends
    assert samples[-1].tokens[:3] == [5, 6, 14]

    # the trainer wrote weight_v000007 on its own disk (not the server's --weights-dir): the hook
    # closes the batch and uploads them as version 7
    version_dir = tmp_path / "weight_v000007"
    shutil.copytree(tiny_models["policy"], version_dir)
    batches = client.state().state.batches
    slime.post_write(args, str(version_dir), [])
    after = client.state()
    assert after.open_batch_id is None and after.state.batches == batches + 1
    assert client.info().policy_version == 7
    sample = asyncio.run(slime.generate(args, SlimeSample(prompt="1+2="), dict(sampling)))
    assert sample.metadata["espo"]["policy_version"] == 7
