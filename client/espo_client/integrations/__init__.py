"""Adapters that plug the ESPO rollout server into RL trainers, carrying ESPO's meaning, not just bytes.

    espo_client.integrations.trl    GRPOTrainer: `EspoRollouts` (its rollout_func), `stop_aware`
                                    (a reward function wrapper), `PushWeights` (a callback)
    espo_client.integrations.slime  `generate` (--custom-generate-function-path) and `post_write`
                                    (--custom-update-weight-post-write-path)
    espo_client.integrations.verl   `EspoAgentLoop` (agent loop registry: `espo_agent`)

What every adapter does the same way (this module):

* **A stop is a reward the trainer understands.** A trajectory the rule stopped (`espo_stop`) is an
  absorbing failure: it gets `stop_reward` as its outcome reward, instead of whatever the task's
  reward function makes of a cut-off answer. The default, `DEFAULT_STOP_REWARD = 0.0`, is the task's
  failure reward for the 0/1 rewards these trainers use, and it is the safe choice for the
  group-relative learners they run (GRPO, RLOO, DAPO): there the advantage is one number for the
  whole trajectory, so the server's `r_fail = -1` would be spread over every token of a stopped
  trajectory, most of them correct reasoning before the failure. Measured with such a learner (toy
  task, 30 iterations, 3 seeds): `r_fail = -1` gave held-out accuracy 0.07 / 0.25 / 0.24 against
  0.38 / 0.32 / 0.30 without stopping at lr 1e-4 (training collapsed), a tie at lr 3e-5. With 0, a
  stop counts as an ordinary failed attempt. Pass another value knowingly; PPO learners with a
  critic and GAE (espo_client.learner) use the server's `r_fail` on the stop token instead.
* **GRPO-style trainers have no critic**, so the rule is `regret_only` (the threshold uses a
  constant in place of V(s_t)); `espo` would need a critic the trainer does not train.
* **One batch per training step.** The ESPO state is frozen during a batch and updated between
  batches: calls of one step share a `batch_id`, which the server closes when the next step's
  first call names another (TRL: the step number), or which the weight push commits (`end_step`:
  slime, verl).
* **Logprobs are raw** (`RAW_LOGPROBS_NOTE`): before temperature, top-k, top-p, min-p and penalties.
  They equal the sampling distribution's only at temperature 1 with those off (`raw_is_sampling`).
* **Weights** are pushed through one function, `push_weights`: uploaded by default (a model, a state
  dict, or a checkpoint directory read here), so the trainer needs no disk the server can read; with
  `by_path=True`, a directory the server reads itself (under its --weights-dir: faster, a shared
  volume needed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..protocol import Trajectory, WeightsResponse

__all__ = [
    "DEFAULT_STOP_REWARD",
    "RAW_LOGPROBS_NOTE",
    "end_step",
    "outcome_reward",
    "push_weights",
    "raw_is_sampling",
]

log = logging.getLogger(__name__)

DEFAULT_STOP_REWARD = 0.0
"""Outcome reward of a stopped trajectory for group-relative learners: the task's failure reward."""

RAW_LOGPROBS_NOTE = (
    "espo-server returns raw logprobs (the model's log-softmax before temperature, top-k, top-p, "
    "min-p and penalties); they equal the probabilities the tokens were sampled with only at "
    "temperature 1 with those off"
)


def raw_is_sampling(sampling: Mapping[str, Any]) -> bool:
    """Whether raw logprobs are also the sampling distribution's under these settings (vLLM names;
    unset or None counts as the default)."""
    neutral = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": (0, -1),
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    for name, default in neutral.items():
        value = sampling.get(name)
        if value is not None and value not in (default if isinstance(default, tuple) else (default,)):
            return False
    return not sampling.get("logit_bias") and not sampling.get("allowed_token_ids")


def outcome_reward(trajectory: Trajectory, task_reward: float | None, stop_reward: float) -> float | None:
    """The outcome reward a trainer should see: `stop_reward` for a stopped trajectory, else the task's."""
    return stop_reward if trajectory.end_reason == "espo_stop" else task_reward


def push_weights(client: Any, weights: Any, version: int, *, by_path: bool = False) -> WeightsResponse:
    """Make the server serve `weights` as policy `version`; returns once it serves.

    `weights`: a torch module, a state dict or (name, tensor) pairs, uploaded from memory; or a
    checkpoint directory (str or Path), whose safetensors files and config.json are read here and
    uploaded, or, with `by_path`, pushed by path (the server reads it: under its --weights-dir).
    This is the one place the adapters push weights."""
    if isinstance(weights, (str, Path)) and by_path:
        response = client.load_weights(str(weights), version=version)
    elif isinstance(weights, (str, Path)):
        directory = Path(weights)
        config = directory / "config.json"
        response = client.upload_weights(
            checkpoint_tensors(directory),
            version=version,
            config=json.loads(config.read_text()) if config.exists() else None,
        )
    else:
        response = client.upload_weights(weights, version=version)
    log.info("pushed %s as policy version %d (%.2fs)", _name(weights), version, response.load_time_s)
    return response


def checkpoint_tensors(directory: Path) -> Iterator[tuple[str, Any]]:
    """The (name, tensor) pairs of a checkpoint directory's safetensors files, read one at a time."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files to push")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _name(weights: Any) -> str:
    return str(weights) if isinstance(weights, (str, Path)) else type(weights).__name__


def end_step(client: Any, weights: Any, version: int, *, by_path: bool = False) -> WeightsResponse:
    """A training step is over: close its ESPO batch (fold its statistics into the state; nothing
    open: a no-op), then push its weights as policy `version` (`push_weights`)."""
    client.commit()
    return push_weights(client, weights, version, by_path=by_path)
