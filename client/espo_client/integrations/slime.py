"""slime with espo-server as its rollout backend: a custom generate function and a post-write hook.

    --custom-generate-function-path espo_client.integrations.slime.generate
    --custom-update-weight-post-write-path espo_client.integrations.slime.post_write
    --update-weight-disk-dir /shared/weights     # under espo-server's --weights-dir
    ESPO_URL=http://rollouts:8000  ESPO_STOP_REWARD=0.0  ESPO_STOP_RULE=regret_only   (environment)

* `generate(args, sample, sampling_params, evaluation=False)` is slime's custom generate function:
  it samples `sample` (its prompt, or its `tokens` when slime already tokenised it) on espo-server
  with slime's SGLang-style sampling parameters (max_new_tokens, temperature, top_p, top_k, min_p,
  stop, stop_token_ids, skip_special_tokens, sampling_seed, ...), fills `tokens`, `response`,
  `response_length`, `rollout_log_probs` (raw: see `RAW_LOGPROBS_NOTE`), `loss_mask` and `status`
  (eos: COMPLETED, length: TRUNCATED, abort: ABORTED), and records the ESPO outcome in
  `sample.metadata["espo"]` (end_reason, stop_step, policy_version). A sample the rule stopped is
  COMPLETED with `sample.reward = ESPO_STOP_REWARD` already set (slime then skips its reward model
  for it): an absorbing failure, never a truncation to continue or an abort to retry.
* Batches: the calls share the batch_id `ESPO_BATCH_ID` (default `slime`), one ESPO batch per
  rollout step; `post_write` commits it when the trainer has written new weights.
* `post_write(args, version_dir, rollout_engines)` is slime's post-write hook: on rank 0 (it gates
  itself, as slime asks) it commits the open ESPO batch and pushes `version_dir` (slime's
  `weight_vNNNNNN`) as policy version NNNNNN (`integrations.push_weights`): its files are read here
  and uploaded, or, with `args.espo_push_by_path` or ESPO_PUSH_BY_PATH=1, pushed by path for the
  server to read (under its --weights-dir).

Not covered: multi-turn and tool rollouts (one generate call, one response), multimodal samples,
slime's partial rollouts (a sample that comes back ABORTED is generated again from scratch, not
continued), routing replay and top-p token replay (the server returns neither), and SGLang-only
parameters (no_stop_trim, spaces_between_special_tokens and the like are ignored; unknown ones
are an error from the server, naming them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from argparse import Namespace
from typing import Any

from . import DEFAULT_STOP_REWARD, end_step

__all__ = ["generate", "post_write"]

log = logging.getLogger(__name__)

# slime's SGLang sampling parameters -> RolloutRequest fields (None: ignored, SGLang-only).
_SAMPLING = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_new_tokens": "min_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "sampling_seed": "seed",
    "skip_special_tokens": None,
    "no_stop_trim": None,
    "spaces_between_special_tokens": None,
    "custom_params": None,
}

_clients: dict[str, Any] = {}


def _client(args: Namespace) -> Any:
    from .._client import EspoClient

    url = getattr(args, "espo_url", None) or os.environ.get("ESPO_URL", "http://127.0.0.1:8000")
    if url not in _clients:
        _clients[url] = EspoClient(base_url=url, api_key=os.environ.get("ESPO_API_KEY"))
    return _clients[url]


def _async_client(args: Namespace) -> Any:
    """One async client per server and event loop (an httpx.AsyncClient belongs to its loop)."""
    from .._client import AsyncEspoClient

    url = getattr(args, "espo_url", None) or os.environ.get("ESPO_URL", "http://127.0.0.1:8000")
    key = f"async:{url}:{id(asyncio.get_running_loop())}"
    if key not in _clients:
        _clients[key] = AsyncEspoClient(base_url=url, api_key=os.environ.get("ESPO_API_KEY"))
    return _clients[key]


def _request(sampling_params: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in sampling_params.items():
        if name not in _SAMPLING:
            raise ValueError(f"sampling parameter {name!r} has no espo-server equivalent")
        target = _SAMPLING[name]
        if target is not None and value is not None:
            fields[target] = [value] if name == "stop" and isinstance(value, str) else value
    if fields.get("top_k") == -1:
        fields["top_k"] = 0
    return fields


async def generate(
    args: Namespace, sample: Any, sampling_params: dict[str, Any], evaluation: bool = False
) -> Any:
    """slime's custom generate function: one sample, sampled on espo-server."""
    status = type(sample).Status
    if sample.tokens:  # the prompt's ids (and of an aborted earlier try, its response: dropped)
        prompt = {"token_ids": list(sample.tokens[: len(sample.tokens) - sample.response_length])}
    elif isinstance(sample.prompt, str):
        prompt = {"text": sample.prompt}
    else:
        raise ValueError("give slime samples as text prompts (apply the chat template) or as tokens")
    fields = _request(sampling_params)
    response = await _async_client(args).rollouts(
        prompts=[prompt],
        n=1,
        stop_rule=os.environ.get("ESPO_STOP_RULE", "regret_only"),
        batch_id=None if evaluation else os.environ.get("ESPO_BATCH_ID", "slime"),
        update_state=not evaluation,
        include=["text"],
        **fields,
    )
    (t,) = response.trajectories
    prompt_ids = response.prompt_token_ids[0] if response.prompt_token_ids else prompt["token_ids"]
    sample.tokens = list(prompt_ids) + list(t.token_ids)
    sample.response = t.text or ""
    sample.response_length = len(t.token_ids)
    sample.rollout_log_probs = list(t.logprobs)
    sample.loss_mask = [1] * len(t.token_ids)
    sample.metadata = {
        **(sample.metadata or {}),
        "espo": {"end_reason": t.end_reason, "stop_step": t.stop_step, "policy_version": t.policy_version},
    }
    if t.end_reason == "espo_stop":
        sample.status = status.COMPLETED
        sample.reward = float(os.environ.get("ESPO_STOP_REWARD", DEFAULT_STOP_REWARD))
    else:
        sample.status = {"eos": status.COMPLETED, "length": status.TRUNCATED}.get(
            t.end_reason, status.ABORTED
        )
    return sample


def post_write(args: Namespace, version_dir: str, rollout_engines: list) -> None:
    """slime's post-write hook: on rank 0, commit the rollout step's ESPO batch and push the weights."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
    except ImportError:
        pass
    match = re.search(r"(\d+)$", os.path.basename(os.path.normpath(version_dir)))
    if match is None:
        raise ValueError(f"{version_dir}: expected slime's weight_vNNNNNN directory name")
    by_path = bool(getattr(args, "espo_push_by_path", False)) or os.environ.get("ESPO_PUSH_BY_PATH") == "1"
    end_step(_client(args), version_dir, int(match.group(1)), by_path=by_path)
