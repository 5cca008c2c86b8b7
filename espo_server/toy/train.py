"""Train the toy policy and critic from a seed, on CPU, in a few minutes; deterministic on a machine.

1. policy: supervised next-token training on prompt + canonical solution for a fixed number of steps
   (warm-up, then cosine decay), sized so that its exact-answer accuracy at temperature 1 lands mid-band
   (30-70%): a policy that fails often, with failures that start at a wrong step and run on, is what
   ESPO needs to show anything. There is no early stop on a measured accuracy: a noisy estimate
   crossing a band edge one evaluation sooner or later gave different models on different machines.
2. critic: the trained policy samples its own responses (temperature 1, several per problem, seeded),
   the verifier scores them (final reward only), and a LlamaForTokenClassification, initialised from
   the policy's layers plus fresh ones on top, regresses V(s_t) at every state of every response onto
   that final reward (the Monte-Carlo return, 0 or 1). The verifier's first wrong token is never a
   target: it is the oracle, used only to measure the critic on held-out samples.
3. both are saved in HF format (safetensors + tokenizer) in a cache directory keyed by seed and
   configuration; `report.json` is written last and marks a complete entry.

Determinism: one torch thread (a reduction's order depends on the thread count), torch's
deterministic algorithms, and every random draw from a seeded generator (batches, sampling, inits),
so that the same seed gives bit-identical weights on one machine (`weights_sha256` in the report).
Another CPU (other vector kernels) may round differently; docs/benchmarks.md gives ranges over seeds.

Conventions shared with the server: prompts are the token ids of the text, no BOS (`task.encode`);
responses end with EOS; the critic output at position i is V of the prefix ending with token i, so
V(s_t) for s_t = prompt + response[:t] is read at position len(prompt) - 1 + t.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from espo_server.config import default_cache_dir, default_toy_size
from espo_server.tiny_model import (
    EOS_ID,
    PAD_ID,
    TinyConfig,
    build_tokenizer,
    make_critic,
    make_policy,
    save_model,
)
from espo_server.toy.task import Problem, TaskSpec, decode, encode, generate, verify

VERSION = 2  # bump when training changes in a way the config hash cannot see


@dataclass(frozen=True)
class ToyConfig:
    task: TaskSpec = field(default_factory=TaskSpec)
    # 2 heads of 64 (vLLM's CPU attention needs head_dim 64). One head of 64 trained ~2x faster per
    # step but needed ~2x the steps, and its critic barely learnt (mid-response AUC ~0.6 vs ~0.75).
    model: TinyConfig = field(default_factory=lambda: TinyConfig(128, 2, 2, 512))
    # policy: a fixed budget (no early stop), lr warm-up then cosine decay to lr * lr_final
    batch_size: int = 64
    lr: float = 2e-3
    lr_final: float = 0.1
    warmup_steps: int = 50
    policy_steps: int = 600
    eval_every: int = 200  # progress lines only: nothing depends on these estimates
    eval_problems: int = 128
    final_eval_problems: int = 512
    max_new_tokens: int = 96  # the longest default solution is ~60 tokens
    # critic: the policy's layers plus fresh ones on top. Seeing that token j contradicts what the
    # policy predicted at j-1 needs a layer after the policy's prediction is formed, and carrying
    # "a mistake was made" forward to later positions needs another.
    critic_extra_layers: int = 2
    critic_problems: int = 4096
    critic_samples_per_problem: int = 4  # same prompt, different outcomes: what separates them is the path
    critic_heldout_problems: int = 256
    critic_steps: int = 1000
    critic_batch_size: int = 64
    critic_lr: float = 1e-3
    log_every: int = 100

    @classmethod
    def quick(cls) -> ToyConfig:
        """The reduced toy (`toy_size: quick`, what the tests run on): a smaller task and model trained
        in about a minute on one core. Its policy lands mid-band too (about 0.44 at T=1, seed 0);
        its critic is weak (mid-response AUC about 0.55): enough to exercise every path, not to
        measure what the value gate buys."""
        return cls(
            task=TaskSpec(min_terms=3, max_terms=4, high=20),
            model=TinyConfig(64, 2, 1, 256),
            batch_size=64,
            policy_steps=500,
            eval_every=250,
            eval_problems=64,
            final_eval_problems=64,
            max_new_tokens=40,
            critic_extra_layers=1,
            critic_problems=512,
            critic_samples_per_problem=4,
            critic_heldout_problems=128,
            critic_steps=200,
            critic_batch_size=64,
            log_every=100,
        )

    def critic_model(self) -> TinyConfig:
        m = self.model
        return TinyConfig(
            m.hidden_size, m.num_layers + self.critic_extra_layers, m.num_heads, m.intermediate_size
        )

    def key(self) -> str:
        return hashlib.sha256(json.dumps([VERSION, asdict(self)], sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class ToyModels:
    policy_dir: Path
    critic_dir: Path
    task: TaskSpec
    report: dict


@dataclass(frozen=True)
class Sample:
    """One policy response, labelled by the verifier."""

    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless truncated
    reward: float
    first_wrong: int | None


def log(msg: str) -> None:
    print(f"[train-toy] {msg}", flush=True)


# --- data -> tensors, sampling, scoring ---


def batch_tensors(prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids and a 0/1 mask over response tokens (causal: pads come last,
    so no real position ever attends to one and no attention mask is needed)."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids = torch.full((len(prompts), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), T))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) : len(p) + len(r)] = 1.0
    return ids, mask


def solution_ids(problem: Problem) -> list[int]:
    return [*encode(problem.solution), EOS_ID]


@torch.no_grad()
def log_likelihood(model, problems: list[Problem]) -> float:
    """Mean log-probability per token of the canonical solutions (+EOS) given their prompts."""
    model.eval()
    ids, mask = batch_tensors([encode(p.prompt) for p in problems], [solution_ids(p) for p in problems])
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return float((tok_logp * mask[:, 1:]).sum() / mask[:, 1:].sum())


def decode_step(model, ids, attn, pos, past, temperature: float, generator: torch.Generator):
    """One step of KV-cached decoding: (past, last logits as float32, the next token per row; greedy at
    temperature 0)."""
    o = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
    logits = o.logits[:, -1].float()
    if temperature > 0:
        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
    else:
        nxt = logits.argmax(-1)
    return o.past_key_values, logits, nxt


@torch.no_grad()
def sample(
    model,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 512,
) -> list[list[int]]:
    """One sampled response (token ids, ending with EOS unless truncated) per prompt.

    Prompts are left-padded, with an attention mask and explicit position ids so that padding
    changes nothing (checked against unpadded prompts to ~1e-6). temperature 0 means greedy."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        enc = [encode(p) for p in prompts[start : start + batch_size]]
        width = max(map(len, enc))
        x = torch.tensor([[PAD_ID] * (width - len(e)) + e for e in enc])
        attn = (x != PAD_ID).long()
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(enc), dtype=torch.bool)
        tokens, past = [], None
        for _ in range(max_new_tokens):
            past, _, nxt = decode_step(model, x, attn, pos, past, temperature, gen)
            tokens.append(nxt)
            done |= nxt == EOS_ID
            if done.all():
                break
            x, pos = nxt[:, None], pos[:, -1:] + 1
            attn = torch.cat([attn, torch.ones_like(x)], 1)
        for row in torch.stack(tokens, 1).tolist():
            out.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return out


def rollouts(model, problems: list[Problem], max_new_tokens: int, seed: int, temperature: float = 1.0):
    """Sample one response per problem and label it with the verifier."""
    responses = sample(model, [p.prompt for p in problems], max_new_tokens, temperature, seed)
    out = []
    for p, r in zip(problems, responses, strict=True):
        text, finished = decode(r)
        v = verify(p.prompt, text, p.answer, finished=finished)
        out.append(Sample(encode(p.prompt), r, v.reward, v.first_wrong_index))
    return out


def accuracy(
    model, problems: list[Problem], max_new_tokens: int, seed: int, temperature: float = 1.0
) -> float:
    """Exact-answer accuracy of one sample per problem."""
    return float(np.mean([s.reward for s in rollouts(model, problems, max_new_tokens, seed, temperature)]))


def auc(scores, labels) -> float:
    """ROC AUC (Mann-Whitney U from ranks, ties counted half); nan when one class is missing."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # average rank (1-based) of each group of tied scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --- 1. policy ---


def lr_factor(step: int, warmup: int, total: int, final: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to `final` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weights_sha256(model) -> str:
    """A hash of every tensor (name, dtype, shape, bytes): equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def train_policy(cfg: ToyConfig, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Supervised training for exactly `cfg.policy_steps` steps (evaluations only print progress)."""
    t0 = time.time()
    model = make_policy(cfg.model, seed)
    # a fixed pool, sampled with replacement; large enough that memorising it is not an option
    pool = generate(cfg.batch_size * cfg.policy_steps // 4 + 1, "train", seed, cfg.task)
    eval_set = generate(cfg.eval_problems, "test", seed, cfg.task)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.policy_steps, cfg.lr_final)
    )
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    loss_ema = None
    for step in range(1, cfg.policy_steps + 1):
        model.train()
        batch = [pool[i] for i in rng.integers(0, len(pool), cfg.batch_size)]
        ids, mask = batch_tensors([encode(p.prompt) for p in batch], [solution_ids(p) for p in batch])
        logits = model(input_ids=ids).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()  # response tokens only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % cfg.log_every == 0:
            log(f"policy step {step:5d}/{cfg.policy_steps}  loss {loss_ema:.4f}  {time.time() - t0:6.1f}s")
        if step % cfg.eval_every == 0 and step < cfg.policy_steps:
            acc = accuracy(model, eval_set, cfg.max_new_tokens, seed=seed + step)
            history.append({"step": step, "loss": round(loss_ema, 4), "acc_t1": acc})
            log(f"policy step {step:5d}  test accuracy (T=1, n={len(eval_set)}) {acc:.3f}")
    report = {
        "steps": cfg.policy_steps,
        "train_time_s": round(time.time() - t0, 1),
        "eval_history": history,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, report


# --- 2. critic ---


def critic_batch(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, a mask over the states s_0..s_R (positions len(prompt)-1 .. end), reward targets."""
    ids, mask = batch_tensors([s.prompt_ids for s in samples], [s.response_ids for s in samples])
    for i, s in enumerate(samples):
        mask[i, len(s.prompt_ids) - 1] = 1.0  # s_0, the prompt alone, is valued at its last token
    target = torch.tensor([s.reward for s in samples])[:, None].expand_as(mask)
    return ids, mask, target


@torch.no_grad()
def critic_values(critic, samples: list[Sample]) -> list[np.ndarray]:
    """V(s_0), ..., V(s_R) for each sample (R = its number of response tokens)."""
    critic.eval()
    out = []
    for start in range(0, len(samples), 256):
        chunk = samples[start : start + 256]
        v = critic(input_ids=critic_batch(chunk)[0]).logits[..., 0].float()
        for i, s in enumerate(chunk):
            p = len(s.prompt_ids)
            out.append(v[i, p - 1 : p + len(s.response_ids)].numpy())
    return out


# What the critic should achieve on held-out samples; `train-toy` prints each as met or missed.
CRITIC_TARGETS = {
    "auc_after_mistake": (">=", 0.9),  # V(s_{f+4}) of failing vs V at the same positions of successful
    "mse_ratio": ("<=", 0.7),  # held-out MSE / the best constant's
    "drop_after_mistake": (">=", 0.3),  # mean V(s_f) - V(s_{f+8}) over failing samples
}


def target_met(name: str, value: float | None) -> bool:
    op, bound = CRITIC_TARGETS[name]
    return value is not None and (value >= bound if op == ">=" else value <= bound)


def critic_quality(critic, samples: list[Sample]) -> dict:
    """How well V predicts success and whether it sees mistakes, on samples it was not trained on.

    f is the index of a failing response's first wrong token (the verifier's oracle label, used here
    only to measure); V(s_f) is the state just before that token, V(s_{f+k}) the state k tokens on
    (the wrong token and k-1 after it).
    - auc_after_mistake: AUC separating V(s_{f+4}) of failing samples (f+4 within the response) from
      V(s_{f+4}) of successful samples at every such position f+4 they reach: the same positions,
      so that V's drift along a response does not count.
    - mse_ratio: MSE over all held-out states of V against the final reward, over the MSE of the best
      constant (the held-out success rate; computed with hindsight, so the stricter comparison).
    - drop_after_mistake: mean over failing samples of V(s_f) - V(s_{min(f+8, R)}).
    Also AUCs of success at fractions of each response and mean V around the first mistake."""
    return value_quality(critic_values(critic, samples), samples)


def value_quality(values: list[np.ndarray], samples: list[Sample]) -> dict:
    """`critic_quality`'s figures for any V(s_0..s_R) of each sample (a critic's, an oracle's, ...)."""
    rewards = np.array([s.reward for s in samples])
    report = {"samples": len(samples), "success_rate": round(float(rewards.mean()), 4)}
    flat_v = np.concatenate(values)
    flat_r = np.concatenate([np.full(len(v), r) for v, r in zip(values, rewards, strict=True)])
    report["mse"] = round(float(np.mean((flat_v - flat_r) ** 2)), 4)
    report["mse_constant"] = round(float(np.var(flat_r)), 4)
    report["mse_ratio"] = round(report["mse"] / report["mse_constant"], 4) if report["mse_constant"] else None

    failing = [
        (v, s.first_wrong)
        for v, s in zip(values, samples, strict=True)
        if s.reward == 0 and s.first_wrong is not None
    ]
    successful = [v for v, r in zip(values, rewards, strict=True) if r > 0.5]
    positions = [f + 4 for v, f in failing if f + 4 < len(v)]
    fail_at = [v[f + 4] for v, f in failing if f + 4 < len(v)]
    success_at = [v[p] for p in positions for v in successful if p < len(v)]
    a = auc(np.r_[fail_at, success_at], np.r_[np.zeros(len(fail_at)), np.ones(len(success_at))])
    report["auc_after_mistake"] = None if np.isnan(a) else round(a, 4)
    drops = [v[f] - v[min(f + 8, len(v) - 1)] for v, f in failing if f < len(v)]
    report["drop_after_mistake"] = round(float(np.mean(drops)), 4) if drops else None
    for frac in (0.0, 0.25, 0.5, 0.75):
        at = [v[round(frac * (len(v) - 1))] for v in values]
        a = auc(at, rewards > 0.5)
        report[f"auc_at_{frac:.2f}"] = None if np.isnan(a) else round(a, 4)  # None: one class only
    for k in (0, 1, 4, 8):
        vals = [v[min(f + k, len(v) - 1)] for v, f in failing if f < len(v)]
        report[f"v_at_first_wrong_plus_{k}"] = round(float(np.mean(vals)), 4) if vals else None
    report["v_mean_successful"] = round(float(np.mean(flat_v[flat_r > 0.5])), 4) if rewards.any() else None
    report["targets_met"] = {name: target_met(name, report[name]) for name in CRITIC_TARGETS}
    return report


def train_critic(policy, cfg: ToyConfig, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """MSE regression of V(s_t), at every state of the policy's own samples, onto their final reward."""
    t0 = time.time()
    k = cfg.critic_samples_per_problem
    train_problems = generate(cfg.critic_problems, "train", seed + 1, cfg.task)
    heldout_problems = generate(cfg.critic_heldout_problems, "test", seed + 1, cfg.task)
    train = rollouts(policy, [p for p in train_problems for _ in range(k)], cfg.max_new_tokens, seed + 10_001)
    heldout = rollouts(
        policy, [p for p in heldout_problems for _ in range(k)], cfg.max_new_tokens, seed + 10_002
    )
    log(
        f"critic: sampled {len(train)} + {len(heldout)} held-out responses ({k} per problem) in "
        f"{time.time() - t0:.1f}s; success rate {np.mean([s.reward for s in train]):.3f}"
    )

    critic = make_critic(cfg.critic_model(), seed + 1)
    # start from the policy: embeddings, its layers (the extra ones stay fresh) and final norm
    res = critic.model.load_state_dict(policy.model.state_dict(), strict=False)
    assert not res.unexpected_keys and all(k.startswith("layers.") for k in res.missing_keys), res
    opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 30, cfg.critic_steps, 0.1))
    rng = np.random.default_rng(seed + 1)
    loss_ema = None
    for step in range(1, cfg.critic_steps + 1):
        critic.train()
        batch = [train[i] for i in rng.integers(0, len(train), cfg.critic_batch_size)]
        ids, mask, target = critic_batch(batch)
        v = critic(input_ids=ids).logits[..., 0]
        loss = (((v - target) ** 2) * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % cfg.log_every == 0:
            log(f"critic step {step:5d}/{cfg.critic_steps}  mse {loss_ema:.4f}  {time.time() - t0:6.1f}s")
    report = {
        "steps": cfg.critic_steps,
        "train_time_s": round(time.time() - t0, 1),
        "params": sum(p.numel() for p in critic.parameters()),
        "samples": len(train),
        "train_success_rate": round(float(np.mean([s.reward for s in train])), 4),
        "heldout": critic_quality(critic, heldout),
    }
    return critic, report


# --- 3. cache ---


@contextlib.contextmanager
def deterministic(num_threads: int = 1):
    """Torch set up for repeatable training: `num_threads` threads and deterministic algorithms
    (both restored afterwards: the server trains in its own process before the engines start)."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def ensure_toy_models(
    cache_dir: Path | None = None,
    seed: int = 0,
    *,
    quick: bool | None = None,
    config: ToyConfig | None = None,
    force: bool = False,
    num_threads: int | None = 1,
) -> ToyModels:
    """The trained toy policy and critic for `seed`: from the cache, or trained now and cached.

    quick: the reduced configuration (`ToyConfig.quick()`); None: the configured toy size
    (`ESPO_TOY_SIZE`, the server's `toy_size`: full unless set). `config` overrides both.

    num_threads: torch CPU threads while training (None: 1). 1 by default: these models are so small
    that a second thread gains little, on a shared 2-core machine 2 threads ran ~4x slower than 1, and
    the weights depend on it (the order of a reduction does); another count gives other weights."""
    if quick is None:
        quick = default_toy_size() == "quick"
    cfg = config or (ToyConfig.quick() if quick else ToyConfig())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / f"toy-seed{seed}-{cfg.key()}"
    if (entry / "report.json").exists() and not force:
        return _load(entry, cfg)
    root.mkdir(parents=True, exist_ok=True)
    # One trainer per entry: another process (a second test worker, a second demo) waits, then loads.
    with open(root / f".{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "report.json").exists() and not force:
            return _load(entry, cfg)
        return _train(entry, root, seed, cfg, num_threads)


def _train(entry: Path, root: Path, seed: int, cfg: ToyConfig, num_threads: int | None) -> ToyModels:
    threads = num_threads or 1
    log(
        f"training the toy models for seed {seed} (config {cfg.key()}, {threads} torch thread(s)) "
        f"into {entry}"
    )
    with deterministic(threads):
        t0 = time.time()
        policy, policy_report = train_policy(cfg, seed)
        final_set = generate(cfg.final_eval_problems, "test", seed + 2, cfg.task)
        policy_report["accuracy_t1"] = accuracy(policy, final_set, cfg.max_new_tokens, seed=seed + 20_000)
        policy_report["accuracy_greedy"] = accuracy(policy, final_set, cfg.max_new_tokens, 0, temperature=0)
        policy_report["log_likelihood"] = round(log_likelihood(policy, final_set[:256]), 4)
        lo, hi = 0.3, 0.7
        policy_report["in_band"] = lo <= policy_report["accuracy_t1"] <= hi
        policy_report["weights_sha256"] = weights_sha256(policy)
        log(
            f"policy: accuracy T=1 {policy_report['accuracy_t1']:.3f} (n={len(final_set)}), "
            f"greedy {policy_report['accuracy_greedy']:.3f}; {policy_report['train_time_s']:.0f}s"
        )
        critic, critic_report = train_critic(policy, cfg, seed)
        critic_report["weights_sha256"] = weights_sha256(critic)
        report = {
            "version": VERSION,
            "seed": seed,
            "key": cfg.key(),
            "config": asdict(cfg),
            "policy": policy_report,
            "critic": critic_report,
            "total_time_s": round(time.time() - t0, 1),
            "torch_threads": threads,
            "torch_version": torch.__version__,
        }

    # write to a temporary sibling, then rename: a reader never sees a half-written entry
    tmp = root / f".{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer()
    save_model(policy, tokenizer, tmp / "policy")
    save_model(critic, tokenizer, tmp / "critic")
    (tmp / "report.json").write_text(json.dumps(report, indent=2))  # last: marks the entry complete
    shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry, or --force
    try:
        tmp.rename(entry)
    except OSError:  # another process finished the same entry in between: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(entry, cfg)


def _load(entry: Path, cfg: ToyConfig) -> ToyModels:
    report = json.loads((entry / "report.json").read_text())
    return ToyModels(entry / "policy", entry / "critic", cfg.task, report)


# --- 4. command line ---


def add_train_toy_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="$ESPO_CACHE_DIR or ~/.cache/espo-server"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument(
        "--quick", action="store_true", default=None,
        help="reduced sizes for tests; accuracy not tuned (default: $ESPO_TOY_SIZE, else full)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser


def print_report(models: ToyModels) -> None:
    """The figures of a trained (or cached) entry, the critic's against its targets."""
    p, c = models.report["policy"], models.report["critic"]
    h = c["heldout"]
    print(
        f"policy  {models.policy_dir}  ({p['params']:,} params, {p['steps']} steps, "
        f"weights {p.get('weights_sha256')})"
    )
    print(
        f"critic  {models.critic_dir}  ({c['params']:,} params, {c['steps']} steps, "
        f"weights {c.get('weights_sha256')})"
    )
    band = "" if p["in_band"] else "  (OUTSIDE the 30-70% band)"
    print(f"accuracy at T=1 {p['accuracy_t1']:.3f}{band}, greedy {p['accuracy_greedy']:.3f}")
    print(
        f"critic on {h['samples']} held-out samples of the policy (success rate {h['success_rate']:.3f}); "
        f"AUC of success at mid-response {h['auc_at_0.50']}"
    )
    for name, label in (
        ("auc_after_mistake", "AUC, V 4 tokens after the first mistake vs successful samples there"),
        ("mse_ratio", f"MSE {h['mse']} / constant's {h['mse_constant']}"),
        ("drop_after_mistake", "drop of V within 8 tokens of the first mistake "
         f"({h['v_at_first_wrong_plus_0']} -> {h['v_at_first_wrong_plus_8']})"),
    ):  # fmt: skip
        op, bound = CRITIC_TARGETS[name]
        verdict = "met" if target_met(name, h.get(name)) else "MISSED"
        print(f"  {label}: {h.get(name)}  (target {op} {bound}: {verdict})")
    print(
        f"training took {models.report['total_time_s']:.0f}s "
        f"({models.report['torch_threads']} torch thread(s))"
    )


def train_toy_cli(args: argparse.Namespace) -> int:
    t0 = time.time()
    models = ensure_toy_models(
        args.cache_dir, args.seed, quick=args.quick, force=args.force, num_threads=args.threads
    )
    print_report(models)
    print(f"this call {time.time() - t0:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return train_toy_cli(add_train_toy_args(argparse.ArgumentParser("train-toy")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
