"""Tiny char-level Llama models, made from a seed: the policy, its critic, and their tokenizer.

Models cannot be downloaded here, so tests, the demo and the toy task use these. The policy has
untied embeddings (vLLM's weight reload was checked to match HF only for untied models) and
head_dim 64 (vLLM's CPU attention does not support 16). The critic is a
`LlamaForTokenClassification` with one regression label, so vLLM applies no sigmoid to its output.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHARS = string.digits + "+-*=;#?., :()" + string.ascii_lowercase
VOCAB = SPECIAL_TOKENS + list(CHARS)
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""The tiny tokenizer's chat template: the messages' contents, concatenated. The toy task has no roles
(its prompt is the problem itself), so a chat of one user message "7+5=" is the prompt "7+5="."""


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny models; defaults fit CPU tests (about 0.4M parameters)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A char-level fast tokenizer: one token per character, no normaliser, no added spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llama_config(cfg: TinyConfig, **extra):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
        **extra,
    )


def make_policy(cfg: TinyConfig, seed: int):  # -> transformers.LlamaForCausalLM
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(cfg)).float()


def make_critic(cfg: TinyConfig, seed: int):  # -> transformers.LlamaForTokenClassification
    import torch
    from transformers import LlamaForTokenClassification

    torch.manual_seed(seed)
    config = llama_config(cfg, num_labels=1, problem_type="regression")
    return LlamaForTokenClassification(config).float()


def save_model(model, tokenizer, out_dir: Path) -> Path:
    """Save weights (safetensors), config with its architecture, and the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_models(out_dir: Path, seed: int = 0, cfg: TinyConfig | None = None) -> tuple[Path, Path]:
    """Write `out_dir/policy` and `out_dir/critic` (random weights from `seed`); return both paths."""
    cfg = cfg or TinyConfig()
    tokenizer = build_tokenizer()
    out_dir = Path(out_dir)
    policy = save_model(make_policy(cfg, seed), tokenizer, out_dir / "policy")
    critic = save_model(make_critic(cfg, seed + 1), tokenizer, out_dir / "critic")
    return policy, critic
