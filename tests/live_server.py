"""Helpers of the tests against real servers: calls over HTTP, the /metrics scrape, and HF's
reference of what vLLM computed (the policy's logprobs, the critic's values)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# A state that makes `espo` stop readily on the random tiny policy: its regret is around 0.5 +- 0.5.
EAGER = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}


def post(server, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/v1/rollouts", json=body, timeout=300, **kwargs)


def rollouts(server, **body) -> dict:
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def hf_logprobs(model_dir, prompt: list[int], response: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return np.array([logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response)])


def scrape(server) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of GET /metrics, parsed by prometheus_client's own exposition parser."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]


def metric(server, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 where there is none yet)."""
    return sum(
        value
        for sample, have, value in scrape(server)
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


PROMPT = [5, 6, 14, 7, 17]


PREFIXES = [[5, 6, 14, 7, 17], [9, 8, 7], [4] * 40, [30, 31, 39, 44, 38, 5, 5, 22]]


def hf_values(critic_dir: Path, prefixes: list[list[int]]) -> np.ndarray:
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(critic_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return np.array([model(torch.tensor([p])).logits[0, -1, 0].item() for p in prefixes])
