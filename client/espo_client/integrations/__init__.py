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
* **Weights** are pushed through one function, `push_weights` (a checkpoint directory the server can
  read, under its --weights-dir), so that another way of pushing replaces it in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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


def push_weights(client: Any, directory: str, version: int) -> WeightsResponse:
    """Make the server serve the checkpoint in `directory` as policy `version`; returns once it serves.

    The path push: `directory` must be readable by the server, under its --weights-dir. This is the
    one place the adapters push weights."""
    response = client.load_weights(directory, version=version)
    log.info("pushed %s as policy version %d (%.2fs)", directory, version, response.load_time_s)
    return response


def end_step(client: Any, directory: str, version: int) -> WeightsResponse:
    """A training step is over: close its ESPO batch (fold its statistics into the state; nothing
    open: a no-op), then push its weights as policy `version`."""
    client.commit()
    return push_weights(client, directory, version)
