"""TRL's `GRPOTrainer` with espo-server as its rollout backend.

    from trl import GRPOConfig, GRPOTrainer
    from espo_client import EspoClient
    from espo_client.integrations.trl import EspoRollouts, PushWeights, stop_aware

    client = EspoClient(base_url="http://rollouts:8000")
    rollouts = EspoRollouts(client)                      # stop_rule regret_only, stop reward 0.0
    trainer = GRPOTrainer(
        model=MODEL_DIR, args=GRPOConfig(..., num_generations=8), train_dataset=dataset,
        reward_funcs=[stop_aware(my_reward)],            # a stopped completion scores 0.0
        rollout_func=rollouts,
        callbacks=[PushWeights(client)],   # uploads the policy after every step
    )
    trainer.train()

* `EspoRollouts` is the trainer's `rollout_func(prompts, trainer)`: each run of `num_generations`
  identical prompts (TRL repeats each prompt that many times) becomes one prompt with `n` samples,
  so an ESPO group is a GRPO group. Sampling follows the trainer's settings (max_completion_length,
  temperature, top_p, top_k, min_p, repetition_penalty). The calls of one training step share the
  batch_id `{prefix}-{global_step}`, so the server's ESPO state is frozen for the step and updated
  once between steps. Besides `prompt_ids`, `completion_ids` and `logprobs` it returns, per
  completion, the fields `espo_end_reason`, `espo_stop_step` and `espo_policy_version`, which TRL
  hands to the reward functions, and it keeps every response in `responses`.
* `stop_aware(reward_func, stop_reward=0.0)` wraps a reward function: completions the rule stopped
  get `stop_reward`, the others what `reward_func` says (see `espo_client.integrations` for why 0.0).
* `PushWeights` uploads the policy after every `every` optimizer steps from memory (no disk the
  server can read is needed) as policy version N (`integrations.push_weights`), so completions of
  step N+1 carry `espo_policy_version` N; with `weights_dir` (the server's --weights-dir on a shared
  volume) it saves `weights_dir/step-N` and pushes that by path instead. With several processes,
  pass `accelerator=trainer.accelerator` so that no process samples before the push has finished.

Not covered: TRL's own vLLM modes (`use_vllm=True`; leave it False: the server is the vLLM),
TRL's vLLM importance-sampling correction (it is off without `use_vllm`; the logprobs returned are
raw, see `RAW_LOGPROBS_NOTE`), tool calling and environments (multi-turn), and multimodal prompts.
A stopped completion does not end in EOS, so TRL counts it in `completions/clipped_ratio`, and
`mask_truncated_completions=True` would drop it from the loss: leave that False.
"""

from __future__ import annotations

import functools
import logging
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..protocol import RolloutResponse
from . import DEFAULT_STOP_REWARD, RAW_LOGPROBS_NOTE, push_weights, raw_is_sampling

__all__ = ["EspoRollouts", "PushWeights", "stop_aware"]

log = logging.getLogger(__name__)


class EspoRollouts:
    """A `rollout_func` for TRL's GRPOTrainer that samples on espo-server."""

    def __init__(
        self,
        client: Any,
        *,
        stop_rule: str = "regret_only",
        rule_params: dict[str, Any] | None = None,
        batch_prefix: str | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        request: dict[str, Any] | None = None,
    ) -> None:
        """`client`: an `EspoClient`. `request`: further `RolloutRequest` fields (e.g. `shadow`).
        `max_tokens` overrides the trainer's max_completion_length."""
        self.client = client
        self.stop_rule = stop_rule
        self.rule_params = rule_params
        self.batch_prefix = batch_prefix or f"trl-{uuid.uuid4().hex[:8]}"
        self.max_tokens = max_tokens
        self.seed = seed
        self.request = dict(request or {})
        self.responses: list[RolloutResponse] = []
        self._warned = False

    def __call__(self, prompts: list, trainer: Any) -> dict[str, list]:
        training = trainer.model.training
        group = trainer.num_generations if training else trainer.num_generations_eval
        groups = _groups(prompts, group)
        unique = [prompts[start] for start, _ in groups]
        prompt_ids = [_tokenize(trainer, p) for p in unique]
        sampling = {
            "temperature": trainer.temperature,
            "top_p": trainer.top_p,
            "top_k": trainer.top_k or 0,
            "min_p": trainer.min_p or 0.0,
            "repetition_penalty": trainer.repetition_penalty,
        }
        if not raw_is_sampling(sampling) and not self._warned:
            log.warning("%s: TRL's importance-sampling correction would be biased by them", RAW_LOGPROBS_NOTE)
            self._warned = True
        step = trainer.state.global_step
        response = self.client.rollouts(
            prompts=[{"token_ids": ids} for ids in prompt_ids],
            n=groups[0][1],
            max_tokens=self.max_tokens or trainer.max_completion_length,
            stop_rule=self.stop_rule,
            rule_params=self.rule_params,
            batch_id=f"{self.batch_prefix}-{step}" if training else None,
            update_state=training,  # evaluation leaves the state alone
            seed=None if self.seed is None else self.seed + step,
            **sampling,
            **self.request,
        )
        if any(t.end_reason == "abort" for t in response.trajectories):
            raise RuntimeError(
                "espo-server aborted samples of this step (deadline or shutdown): retry the step"
            )
        self.responses.append(response)
        out: dict[str, list] = {
            "prompt_ids": [],
            "completion_ids": [],
            "logprobs": [],
            "espo_end_reason": [],
            "espo_stop_step": [],
            "espo_policy_version": [],
        }
        for t in response.trajectories:  # sorted by (prompt_index, sample_index): the prompts' order
            out["prompt_ids"].append(prompt_ids[t.prompt_index])
            out["completion_ids"].append(list(t.token_ids))
            out["logprobs"].append(list(t.logprobs))
            out["espo_end_reason"].append(t.end_reason)
            out["espo_stop_step"].append(t.stop_step)
            out["espo_policy_version"].append(t.policy_version)
        return out


def _groups(prompts: Sequence[Any], size: int) -> list[tuple[int, int]]:
    """(start, length) of each run of identical prompts: TRL repeats each prompt `size` times."""
    runs: list[tuple[int, int]] = []
    for i, prompt in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == prompt and runs[-1][1] < size:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    if len({length for _, length in runs}) != 1:
        raise ValueError(
            f"EspoRollouts needs each prompt repeated the same number of times in a row (GRPO's "
            f"num_generations={size}); got runs of {sorted({length for _, length in runs})}"
        )
    return runs


def _tokenize(trainer: Any, prompt: Any) -> list[int]:
    """A prompt's token ids as TRL's own generation would make them."""
    tokenizer = trainer.processing_class
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    return list(
        tokenizer.apply_chat_template(
            prompt,
            chat_template=getattr(trainer, "chat_template", None),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(getattr(trainer, "chat_template_kwargs", None) or {}),
        )["input_ids"]
    )


def stop_aware(
    reward_func: Callable[..., list], stop_reward: float = DEFAULT_STOP_REWARD
) -> Callable[..., list]:
    """A TRL reward function that gives completions the rule stopped `stop_reward` and the others
    `reward_func`'s reward (it is called for all of them, with the same arguments)."""

    @functools.wraps(reward_func)
    def reward(*args: Any, espo_end_reason: Sequence[str] | None = None, **kwargs: Any) -> list:
        rewards = list(reward_func(*args, espo_end_reason=espo_end_reason, **kwargs))
        if espo_end_reason is None:
            raise ValueError("stop_aware needs the espo_end_reason field: use it with EspoRollouts")
        return [
            stop_reward if end == "espo_stop" else r for r, end in zip(rewards, espo_end_reason, strict=True)
        ]

    return reward


def _trainer_callback() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class PushWeights(_trainer_callback()):  # type: ignore[misc]
    """Push the policy to espo-server after every `every` optimizer steps (policy version = step)."""

    def __init__(
        self,
        client: Any,
        weights_dir: str | Path | None = None,
        *,
        every: int = 1,
        keep: int = 2,
        accelerator: Any = None,
        push: Callable[..., Any] = push_weights,
    ) -> None:
        self.client = client
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.every = every
        self.keep = keep
        self.accelerator = accelerator
        self.push = push
        self.pushed: list[int] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return control
        if state.is_world_process_zero:
            unwrapped = self.accelerator.unwrap_model(model) if self.accelerator is not None else model
            if self.weights_dir is None:
                self.push(self.client, unwrapped, state.global_step)
            else:
                directory = self.weights_dir / f"step-{state.global_step:06d}"
                unwrapped.save_pretrained(directory, safe_serialization=True)
                self.push(self.client, str(directory), state.global_step, by_path=True)
                for old in sorted(self.weights_dir.glob("step-*"))[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
            self.pushed.append(state.global_step)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return control
