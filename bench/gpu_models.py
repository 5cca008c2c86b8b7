"""Random-weight Qwen2-shaped policy and critic for the GPU run (bench/gpu.sh): nothing downloaded.

The shapes of Qwen2.5-0.5B and Qwen2.5-1.5B (layers, widths, 2 KV heads, tied embeddings, the full
151,936-row vocabulary) made from configs with random weights from a seed, in bfloat16, over the
project's tiny tokenizer (espo_server/tiny_model.py): its ids are the first rows of the vocabulary,
so the toy task's prompts are valid prompts, and a random policy, spreading its probability over all
151,936 rows, almost never samples EOS: every response runs to max_tokens. `tiny` is the same layout
at the tests' size, for the CPU smoke run. The critic is a `Qwen2ForTokenClassification` with one
label (the format verl saves critics in).

    .venv/bin/python -m bench.gpu_models --out DIR --policy-size 1.5b --critic-size 0.5b
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from bench import harness
from espo_server.tiny_model import QWEN2, TinyConfig, arch_config, build_tokenizer, save_model

QWEN_VOCAB = 151_936
SIZES = {  # (layout, key-value heads)
    "tiny": (TinyConfig(), 1),
    "0.5b": (TinyConfig(896, 24, 14, 4864, 32768), 2),
    "1.5b": (TinyConfig(1536, 28, 12, 8960, 32768), 2),
}


def make_model(size: str, *, critic: bool, seed: int, dtype: str):  # -> transformers.PreTrainedModel
    """A Qwen2 policy (or one-label critic) of `size`, random weights from `seed`, in `dtype`."""
    import torch
    import transformers

    cfg, kv_heads = SIZES[size]
    arch = dataclasses.replace(QWEN2, num_key_value_heads=kv_heads)
    config = arch_config(arch, cfg, critic=critic, vocab_size=QWEN_VOCAB)
    config.dtype = dtype
    torch.manual_seed(seed)
    cls = getattr(transformers, arch.critic_class if critic else arch.policy_class)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialised in `dtype`: half the work in bf16
    try:
        return cls(config), arch
    finally:
        torch.set_default_dtype(default)


def ensure_models(out: Path, policy_size: str, critic_size: str, dtype: str, seed: int = 0) -> dict:
    """`out/policy` and `out/critic` (made now, or kept from an earlier run with the same sizes); a
    description of both (sizes, parameter counts) also written to `out/models.json`."""
    spec = {"policy_size": policy_size, "critic_size": critic_size, "dtype": dtype, "seed": seed}
    index = out / "models.json"
    if index.exists() and {k: v for k, v in json.loads(index.read_text()).items() if k in spec} == spec:
        return json.loads(index.read_text())
    described = dict(spec)
    for role, size, offset in (("policy", policy_size, 0), ("critic", critic_size, 1)):
        started = time.perf_counter()
        model, arch = make_model(size, critic=role == "critic", seed=seed + offset, dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        path = save_model(model, build_tokenizer(arch), out / role)
        del model
        described[role] = str(path)
        described[f"{role}_params"] = params
        print(f"{role}: {size}, {params / 1e9:.3f}B parameters, {dtype}, {path} "
              f"({time.perf_counter() - started:.1f}s)", flush=True)  # fmt: skip
    index.write_text(json.dumps(described, indent=2))
    return described


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for policy/ and critic/")
    parser.add_argument("--policy-size", choices=sorted(SIZES), default="1.5b")
    parser.add_argument("--critic-size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--dtype", default="bfloat16", help="weights as saved (bfloat16, float32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ensure_models(args.out, args.policy_size, args.critic_size, args.dtype, args.seed)


if __name__ == "__main__":
    main()
