"""verl with espo-server as its rollout backend: an agent loop, and a weight-sync recipe.

Agent loop (verl's registry, `verl.experimental.agent_loop`): importing this module registers
`espo_agent`; point the rollout at it and at the server:

    actor_rollout_ref.rollout.mode=async
    actor_rollout_ref.rollout.agent.default_agent_loop=espo_agent
    +actor_rollout_ref.rollout.agent.agent_loop_config_path=espo_agent.yaml
    # espo_agent.yaml:  - name: espo_agent
    #                     _target_: espo_client.integrations.verl.EspoAgentLoop
    ESPO_URL=http://rollouts:8000  ESPO_STOP_REWARD=0.0  ESPO_STOP_RULE=regret_only   (environment)

`EspoAgentLoop.run(sampling_params, raw_prompt=...)` renders the prompt with verl's chat template,
samples one response on espo-server (verl's temperature, top_p, top_k, repetition_penalty and the
rollout's response_length) and returns verl's `AgentLoopOutput` with the raw logprobs as
`response_logprobs`, `extra_fields["espo"]` (end_reason, stop_step, policy_version) and, for a
stopped response, `reward_score = ESPO_STOP_REWARD` (verl then skips its reward function for it).
The server's own engines sample; verl's rollout replicas still start (keep them small).

Weight sync: verl's checkpoint engines stream tensors into its own rollout replicas; espo-server
loads a directory instead. The recipe: save Hugging Face weights every step and push them,

    trainer.save_freq=1  actor_rollout_ref.actor.checkpoint.save_contents=['model','hf_model']
    trainer.default_local_dir=/shared/ckpt        # under espo-server's --weights-dir

then, after each save, `push_checkpoint(step_dir)` (this module) closes the step's ESPO batch (the
agent loop's calls share the batch_id `ESPO_BATCH_ID`, default `verl`) and pushes
`{default_local_dir}/global_step_N/actor/huggingface` as policy version N (a small loop beside the
trainer, or a line in a custom trainer's `_save_checkpoint`).

Not covered: verl's multi-turn tool agent loop (one response per prompt), multimodal prompts,
verl's own server manager (its replicas' weights are not what samples), routed-experts replay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..protocol import Trajectory
from . import DEFAULT_STOP_REWARD, end_step

__all__ = ["agent_output", "espo_request", "push_checkpoint"]


def espo_request(
    prompt_ids: list[int], sampling_params: dict[str, Any], response_length: int
) -> dict[str, Any]:
    """verl's sampling parameters -> a RolloutRequest's fields (one prompt, one sample)."""
    fields: dict[str, Any] = {
        "prompts": [{"token_ids": list(prompt_ids)}],
        "n": 1,
        "max_tokens": response_length,
        "stop_rule": os.environ.get("ESPO_STOP_RULE", "regret_only"),
        "batch_id": os.environ.get("ESPO_BATCH_ID", "verl"),
    }
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p"):
        if sampling_params.get(name) is not None:
            fields[name] = sampling_params[name]
    if fields.get("top_k") == -1:
        fields["top_k"] = 0
    return fields


def agent_output(trajectory: Trajectory, response_length: int) -> dict[str, Any]:
    """The fields of verl's AgentLoopOutput for one trajectory (the stop reward set explicitly)."""
    ids = list(trajectory.token_ids[:response_length])
    stopped = trajectory.end_reason == "espo_stop"
    return {
        "response_ids": ids,
        "response_mask": [1] * len(ids),
        "response_logprobs": list(trajectory.logprobs[:response_length]),
        "reward_score": float(os.environ.get("ESPO_STOP_REWARD", DEFAULT_STOP_REWARD)) if stopped else None,
        "extra_fields": {
            "espo": {
                "end_reason": trajectory.end_reason,
                "stop_step": trajectory.stop_step,
                "policy_version": trajectory.policy_version,
            }
        },
    }


def push_checkpoint(step_dir: str | Path, client: Any = None, *, by_path: bool = False) -> Any:
    """Close the step's ESPO batch and push verl's `global_step_N` checkpoint (its
    actor/huggingface weights) as policy version N: uploaded, or by path (`by_path`)."""
    from .._client import EspoClient

    step_dir = Path(step_dir)
    version = int(step_dir.name.rsplit("_", 1)[-1])
    client = client or EspoClient(base_url=os.environ.get("ESPO_URL", "http://127.0.0.1:8000"))
    return end_step(client, str(step_dir / "actor" / "huggingface"), version, by_path=by_path)


try:  # the agent loop itself needs verl
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
except ImportError:  # pragma: no cover - verl is not a dependency
    AgentLoopBase = None

if AgentLoopBase is not None:  # pragma: no cover - exercised inside verl only

    @register("espo_agent")
    class EspoAgentLoop(AgentLoopBase):
        """verl agent loop: one response per prompt, sampled by espo-server."""

        async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
            from .._client import AsyncEspoClient

            prompt_ids = await self.apply_chat_template(list(kwargs["raw_prompt"]))
            response_length = self.config.actor_rollout_ref.rollout.response_length
            async with AsyncEspoClient(
                base_url=os.environ.get("ESPO_URL", "http://127.0.0.1:8000")
            ) as client:
                response = await client.rollouts(**espo_request(prompt_ids, sampling_params, response_length))
            (trajectory,) = response.trajectories
            return AgentLoopOutput(
                prompt_ids=prompt_ids, num_turns=2, metrics={}, **agent_output(trajectory, response_length)
            )

    __all__ += ["EspoAgentLoop"]
