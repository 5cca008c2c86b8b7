"""Tiny char-level models, made from a seed: policies, their critics, and their tokenizers.

Models cannot be downloaded here, so tests, the demo and the toy task use these. `make_tiny_models`
writes the project's own pair: a Llama policy with untied embeddings and head_dim 64 (vLLM's CPU
attention does not support 16), and a `LlamaForTokenClassification` critic with one regression
label, so vLLM applies no sigmoid to its output. `make_arch_models` writes the architectures users
train, in small (`ARCHS`): the layout, embedding tying, grouped-query attention and chat template
of Qwen2.5 and Llama-3.2, each with a `*ForTokenClassification` critic (the format verl saves
critics in), over the same characters plus the chat template's special tokens.
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


def build_tokenizer(arch: Arch | None = None):  # -> transformers.PreTrainedTokenizerFast
    """A char-level fast tokenizer: one token per character, no normaliser, no added spaces; with
    `arch`, its special tokens (each one token) and chat template too. A byte-level `arch`
    (Qwen2's: transformers loads a qwen2 model's tokenizer as its own byte-level BPE, whatever the
    file says) is a BPE without merges over the byte-level forms of the characters: the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if arch is not None and arch.byte_level:
        vocab = {_byte_level(t, arch): i for i, t in enumerate(arch.vocab)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        vocab = {tok: i for i, tok in enumerate(arch.vocab if arch else VOCAB)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=arch.bos if arch else "<s>",
        eos_token=arch.eos if arch else "</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(arch.specials) if arch else None,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = arch.chat_template if arch else CHAT_TEMPLATE
    return tokenizer


_BYTE_LEVEL = {" ": "\u0120", "\n": "\u010a"}
"""GPT-2's printable stand-ins of the two characters the tiny vocabulary has that are not printable."""


def _byte_level(token: str, arch: Arch) -> str:
    return token if token in arch.specials or token in SPECIAL_TOKENS else _BYTE_LEVEL.get(token, token)


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


# ---------------------------------------------------------------------------------------------
# The architectures users train, in small
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """What a small stand-in keeps of a model family: its classes, embedding tying, attention
    grouping, special tokens and chat template."""

    name: str
    policy_class: str
    critic_class: str
    config_class: str
    tie_word_embeddings: bool
    num_key_value_heads: int
    byte_level: bool
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    chat_template: str

    @property
    def vocab(self) -> list[str]:
        return [*VOCAB, "\n", *self.specials]


QWEN2 = Arch(
    name="qwen2",  # Qwen2.5 0.5B-3B: tied embeddings, q/k/v biases, grouped-query attention, ChatML
    policy_class="Qwen2ForCausalLM",
    critic_class="Qwen2ForTokenClassification",
    config_class="Qwen2Config",
    tie_word_embeddings=True,
    num_key_value_heads=1,
    byte_level=True,
    specials=("<|im_start|>", "<|im_end|>"),
    bos=None,
    eos="<|im_end|>",
    chat_template=(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
)
LLAMA = Arch(
    name="llama",  # Llama-3.2 1B/3B: tied embeddings, grouped-query attention, Llama 3's template
    policy_class="LlamaForCausalLM",
    critic_class="LlamaForTokenClassification",
    config_class="LlamaConfig",
    tie_word_embeddings=True,
    num_key_value_heads=1,
    byte_level=False,
    specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    chat_template=(
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
        "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
)
ARCHS = {arch.name: arch for arch in (QWEN2, LLAMA)}


def arch_config(
    arch: Arch, cfg: TinyConfig, *, critic: bool = False, vocab_size: int | None = None
):  # -> transformers.PretrainedConfig
    """`arch`'s config at `cfg`'s size (`vocab_size`: more embedding rows than the tokenizer has)."""
    import transformers

    tokens = {tok: i for i, tok in enumerate(arch.vocab)}
    extra = {"num_labels": 1, "problem_type": "regression"} if critic else {}
    return getattr(transformers, arch.config_class)(
        vocab_size=max(vocab_size or 0, len(arch.vocab)),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokens[arch.bos] if arch.bos else None,
        eos_token_id=tokens[arch.eos],
        pad_token_id=PAD_ID,
        torch_dtype="float32",
        **extra,
    )


def make_arch_model(
    arch: Arch, cfg: TinyConfig, seed: int, *, critic: bool = False, vocab_size: int | None = None
):
    """A policy (or critic) of `arch` with random weights from `seed` (a transformers model)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, arch.critic_class if critic else arch.policy_class)
    return cls(arch_config(arch, cfg, critic=critic, vocab_size=vocab_size)).float()


def make_arch_models(
    out_dir: Path, arch: Arch | str, seed: int = 0, cfg: TinyConfig | None = None
) -> tuple[Path, Path]:
    """Write `out_dir/policy` and `out_dir/critic` of `arch` (random weights from `seed`)."""
    arch = ARCHS[arch] if isinstance(arch, str) else arch
    cfg = cfg or TinyConfig()
    tokenizer = build_tokenizer(arch)
    out_dir = Path(out_dir)
    policy = save_model(make_arch_model(arch, cfg, seed), tokenizer, out_dir / "policy")
    critic = save_model(make_arch_model(arch, cfg, seed + 1, critic=True), tokenizer, out_dir / "critic")
    return policy, critic
