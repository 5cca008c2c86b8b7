"""PPO on the toy arithmetic task, with rollouts from an ESPO server: a reference learner.

One file that reads top to bottom, in the manner of CleanRL's ppo.py. Each iteration:

1. sample `--problems` toy problems and ask the server for `--n` rollouts of each
   (`POST /v1/rollouts`) under a stop rule, `espo` by default: failing trajectories come back cut
   short, `end_reason == "espo_stop"`, with the reward r_fail on their last kept token;
2. score the `eos` trajectories with the toy verifier (unless the server already did);
3. pad the batch into tensors (`trajectories_to_tensors`), run the critic for V(s_t), and compute
   advantages with `compute_gae`: `espo_stop` is an absorbing failure and `eos` is terminal (next
   value 0), a `length` cut is bootstrapped with V(s_L) (T-PPO's extended GAE);
4. a few epochs of PPO: the clipped surrogate on the policy, MSE on the critic;
5. push the policy to the server, so that the next iteration samples from the new weights: by
   default its tensors are uploaded straight from memory (`client.upload_weights(policy)`: streamed
   over HTTP as safetensors shards, no file written, no shared file system); with `--push path`
   it is saved (a fresh directory per iteration) and the server loads it (`POST /v1/weights`).
   (The starting policy is pushed too, before the first iteration, unless `--no-push-initial`.)
6. save the critic the same way (`critic-0001`, ...: a LlamaForTokenClassification safetensors
   directory, num_labels 1, regression: the format the server's critic loads) and, with
   `--push-critic`, push it so that the stop rule judges with the critic PPO trains;
7. every `--eval-every` iterations, held-out accuracy (test-split problems, one sample each, at
   T=1 and greedy) through the server with `stop_rule: none` and `update_state: false`: these
   evaluation tokens are not rollout tokens and are counted apart.

The ESPO state (mu, var, beta, warm) is the learner's by default (`--state-owner learner`): sent
with every call and folded forward with `update_learner_state`, the same pure maths the server
runs. With `--state-owner server` the server keeps it: each iteration is one batch (`batch_id`),
closed by `POST /v1/espo/commit`. Either way the learner says when its critic is trusted enough to
stop (`warm`): here simply after `--warm-after` iterations.

    espo-server serve --port 8000        # the embedded toy policy and critic
    python examples/ppo_toy.py --iterations 20 --out /tmp/ppo-toy

    # pushes by path instead: the server must see the files this script writes
    espo-server serve --port 8000 --weights-dir ~/.cache/espo-server --weights-dir /tmp/ppo-toy
    python examples/ppo_toy.py --iterations 20 --out /tmp/ppo-toy --push path

Limits worth knowing:
* `--push path` sends a *path*: the server must see the files this script writes (same machine,
  or a shared volume mounted at the same place). The default upload needs neither.
* The server's critic (the one the stop rule asks) is its own copy. This script trains its critic
  for GAE and saves it every iteration; with `--push-critic` it pushes it too (uploaded, or
  `POST /v1/critic/weights` with `--push path`; relayed to a remote `espo-server critic`), the
  starting critic first (unless `--no-push-initial`), so the stop rule judges with the critic PPO
  trains. Without it the stop rule keeps using the critic the server started with.
* PPO's ratio uses the server's raw (temperature 1) logprobs: keep `--temperature 1`.
"""

import argparse
import ast
import dataclasses
import itertools
import json
import random
import time
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    LlamaForTokenClassification,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from espo_client import EspoClient, protocol
from espo_client.learner import compute_gae, trajectories_to_tensors, update_learner_state
from espo_server.toy.local_rollouts import LocalClient
from espo_server.toy.task import TaskSpec, decode, encode, generate, verify


@dataclass
class Args:
    url: str = "http://127.0.0.1:8000"
    """base URL of a running espo-server"""
    backend: Literal["server", "local"] = "server"
    """server: rollouts from the espo-server at --url; local: sampled in this process by the same
    stop-rule code (espo_server.toy.local_rollouts, no HTTP, pushes in memory): for sweeps"""
    critic_latency: int = 0
    """local backend: tokens a sample generates while its critic query is answered (discarded if the
    answer stops it; the server's race, with a fixed delay)"""
    api_key: str | None = None
    """bearer token of the server, if it has one (default: $ESPO_API_KEY)"""
    policy: str | None = None
    """policy directory (HF LlamaForCausalLM); default: the trained toy policy"""
    critic: str | None = None
    """critic directory (HF LlamaForTokenClassification, num_labels=1); default: the trained toy critic"""
    toy_cache_dir: str | None = None
    """cache of the trained toy models (default: $ESPO_CACHE_DIR or ~/.cache/espo-server)"""
    toy_seed: int = 0
    """seed of the trained toy models"""
    out: str = "runs/ppo_toy"
    """each run writes out/<run name>/iter-0001, iter-0002, ... (the pushed policies) and log.jsonl"""
    seed: int = 0
    """seed of the problems, the rollouts and torch"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""
    ready_timeout: float = 600.0
    """seconds to wait for the server's /readyz"""
    push_initial: bool = True
    """push the starting policy before the first rollouts (the server may serve another run's weights)"""
    push: Literal["upload", "path"] = "upload"
    """upload: weights streamed from memory over HTTP; path: saved under --out, loaded by the server"""
    save_policy: bool = False
    """also save each pushed policy under --out (a path push always does)"""

    # Rollouts
    iterations: int = 30
    """PPO iterations: rollouts, update, push"""
    problems: int = 32
    """toy problems per iteration"""
    n: int = 8
    """samples per problem"""
    max_tokens: int = 96
    """response token limit (the longest toy solution is about 60 tokens)"""
    temperature: float = 1.0
    """sampling temperature; PPO's ratio uses raw (temperature 1) logprobs, so keep 1"""
    stop_rule: Literal["none", "espo", "random", "regret_only", "value_only"] = "espo"
    """the server's stop rule: none is plain PPO"""
    state_owner: Literal["learner", "server"] = "learner"
    """who keeps the ESPO state between batches"""
    warm_after: int = 1
    """iterations before the learner trusts its critic and lets the rule stop (sets `warm`)"""
    rule_params: str = "{}"
    """JSON overrides of the rule's parameters (`RuleParams`), e.g. '{"beta0": 2.0, "min_tokens": 4}'"""

    # PPO
    advantage: Literal["gae", "group"] = "gae"
    """gae: PPO's advantages from the critic (absorbing espo_stop, bootstrapped length); group: the
    group-relative, critic-free estimate (each trajectory's outcome reward minus its prompt group's
    mean, over the group's std, on every token; a stop's outcome is r_fail, a length cut's 0). Its
    critic is trained (and pushed) only for a stop rule that asks it: espo, value_only"""
    epochs: int = 2
    """passes over each batch"""
    minibatch_size: int = 64
    """trajectories per gradient step"""
    learning_rate: float = 1e-4
    """Adam learning rate of the policy"""
    target_kl: float | None = 0.02
    """stop the iteration's remaining policy steps once a minibatch's approximate KL to the sampling
    policy exceeds 1.5 x this (None: never)"""
    critic_learning_rate: float = 1e-4
    """Adam learning rate of the critic"""
    gamma: float = 1.0
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda (< 1 concentrates an espo_stop's negative TD error near the stop)"""
    clip_coef: float = 0.2
    """PPO clip of the probability ratio"""
    norm_adv: bool = True
    """normalise advantages over the batch's response tokens"""
    max_grad_norm: float = 1.0
    """gradient clipping of both networks"""

    # Critic pushes and evaluation
    save_critic: bool = True
    """save the critic after every update (out/<run>/critic-0001, ...), in the server's critic format"""
    push_critic: bool = False
    """push the saved critic to the server each iteration (POST /v1/critic/weights)"""
    eval_every: int = 0
    """held-out accuracy (T=1 and greedy) every this many iterations and after the last (0: never)"""
    eval_problems: int = 2000
    """test-split problems of each evaluation (one sample each, per temperature): 2,000 put the
    standard error of an accuracy near 0.5 at 0.011"""
    eval_greedy: bool = True
    """evaluate greedy decoding too, besides T=1"""


def parse_args(argv: list[str] | None = None) -> Args:
    """argparse from `Args`: one `--flag-name` per field, its help text the field's docstring."""
    source = ast.parse(Path(__file__).read_text())
    body = next(node for node in source.body if isinstance(node, ast.ClassDef) and node.name == "Args").body
    docs = {
        target.target.id: doc.value.value
        for target, doc in itertools.pairwise(body)
        if isinstance(target, ast.AnnAssign) and isinstance(target.target, ast.Name)
        and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }  # fmt: skip
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Args):
        kind, choices = field.type, None
        if isinstance(kind, types.UnionType):  # `X | None`
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if typing.get_origin(kind) is Literal:
            kind, choices = str, list(typing.get_args(kind))
        flag = "--" + field.name.replace("_", "-")
        help_text = docs.get(field.name, "")
        if "default" not in help_text:
            help_text += f" (default: {field.default})"
        if kind is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, default=field.default, help=help_text)
    return Args(**vars(parser.parse_args(argv)))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def response_logprobs(policy: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(a_t | s_t) of each response token, [B, R]: the logits at the token before each one."""
    prompt_width = batch["input_ids"].shape[1] - batch["responses"].shape[1]
    logits = policy(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    ).logits[:, prompt_width - 1 : -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)


def critic_values(critic: LlamaForTokenClassification, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The critic's output at every position, [B, P+R]: column c is V of the prefix ending at c."""
    output = critic(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    )
    return output.logits[..., 0].float()


def push_policy(
    client: "EspoClient | LocalClient",
    policy: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path | None,
    version: int,
    how: str = "upload",
) -> int:
    """Make the server serve the policy as `version`; return the version it serves. `upload`: its
    tensors streamed from memory; `path`: loaded by the server from `directory`. The policy is saved
    into `directory` (safetensors) if one is given. The local backend takes the weights in memory."""
    if isinstance(client, LocalClient):
        return client.set_policy_weights(policy.state_dict(), version)
    if directory is not None:
        policy.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    if how == "upload":
        return client.upload_weights(policy, version=version).policy_version
    return client.load_weights(str(directory), version=version).policy_version


def save_critic(
    critic: LlamaForTokenClassification, tokenizer: PreTrainedTokenizerBase, directory: Path
) -> Path:
    """Save the critic as the server's critic is stored: a LlamaForTokenClassification safetensors
    directory (num_labels 1, problem_type regression, so vLLM's pooling runner applies no
    sigmoid) with its tokenizer."""
    assert critic.config.num_labels == 1 and critic.config.problem_type == "regression"
    critic.config.architectures = [type(critic).__name__]
    critic.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


HELDOUT_SEED = 10_000  # of the evaluation problems (test split) and their sampling


def push_critic(
    client: "EspoClient | LocalClient",
    critic: LlamaForTokenClassification,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path | None,
    version: int,
    how: str = "upload",
) -> int:
    """Make the server's stop rule judge with the critic as `version` (uploaded, or loaded from
    `directory` by path); return the critic version the server serves. It is saved into
    `directory` if one is given. The local backend takes the weights in memory."""
    if directory is not None:
        save_critic(critic, tokenizer, directory)
    if isinstance(client, LocalClient):
        return client.set_critic_weights(critic.state_dict(), version)
    if how == "upload":
        return client.upload_critic_weights(critic, version=version).critic_version
    return client.load_critic_weights(str(directory), version=version).critic_version


EVAL_CALL_PROMPTS = 1000  # prompts per evaluation call (the server takes at most 1,024 by default)


def evaluate_heldout(
    client: "EspoClient | LocalClient", problems: list, max_tokens: int, seed: int, greedy: bool = True
) -> dict:
    """Accuracy on held-out problems at T=1 (and greedy), sampled by the server with no stop rule and
    without touching its ESPO state; returns the accuracies and the tokens it generated."""
    out: dict = {"eval_tokens": 0}
    runs = (("heldout_acc_t1", 1.0), ("heldout_acc_greedy", 0.0))[: 2 if greedy else 1]
    for name, temperature in runs:
        correct = 0
        for start in range(0, len(problems), EVAL_CALL_PROMPTS):
            chunk = problems[start : start + EVAL_CALL_PROMPTS]
            prompts = [{"token_ids": encode(p.prompt), "answer": p.answer} for p in chunk]
            response = client.rollouts(
                prompts=prompts, n=1, max_tokens=max_tokens, temperature=temperature, seed=seed + start,
                stop_rule="none", update_state=False,
            )  # fmt: skip
            for t in response.trajectories:
                if t.end_reason == "eos":
                    problem = chunk[t.prompt_index]
                    text, finished = decode(t.token_ids)
                    correct += verify(problem.prompt, text, problem.answer, finished=finished).correct
            out["eval_tokens"] += response.usage.generated_tokens
        out[name] = correct / len(problems)
    return out


def group_advantages(trajectories: list, rewards: list[float | None], mask: torch.Tensor) -> torch.Tensor:
    """The group-relative (critic-free) advantage on every response token: a trajectory's outcome
    reward (the verifier's for eos, r_fail for espo_stop, 0 for a length cut) minus its prompt
    group's mean, over the group's standard deviation (0 when the group's outcomes are all equal)."""
    outcome = torch.tensor([0.0 if r is None else float(r) for r in rewards])
    groups = torch.tensor([t.prompt_index for t in trajectories])
    adv = torch.zeros_like(outcome)
    for g in groups.unique():
        rows = groups == g
        spread = outcome[rows].std(unbiased=False) if int(rows.sum()) > 1 else torch.tensor(0.0)
        adv[rows] = (outcome[rows] - outcome[rows].mean()) / (spread + 1e-6) if spread > 0 else 0.0
    return adv[:, None] * mask


def fresh_run_dir(out: Path, run_name: str) -> Path:
    """out/run_name, or out/run_name-2, -3, ...: a new directory even for runs started in one second.
    mkdir itself decides which is free: an exists() check first races with another process (two of
    bench/reproduce.py's parallel chains once took the same name on CI)."""
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / run_name
    for suffix in itertools.count(2):
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            run_dir = out / f"{run_name}-{suffix}"
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None, transport: httpx.BaseTransport | None = None) -> list[dict]:
    """Run PPO; return the per-iteration log records. `transport`: an httpx transport (tests)."""
    args = parse_args(argv)
    run_name = f"ppo_toy__{args.stop_rule}__{args.seed}__{int(time.time())}"
    run_dir = fresh_run_dir(Path(args.out), run_name)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()

    # Models: the trained toy policy and critic unless given.
    task = TaskSpec()
    policy_dir, critic_dir = args.policy, args.critic
    if policy_dir is None or critic_dir is None:
        from espo_server.toy.train import ensure_toy_models

        toy = ensure_toy_models(args.toy_cache_dir, args.toy_seed)
        policy_dir = policy_dir or str(toy.policy_dir)
        critic_dir = critic_dir or str(toy.critic_dir)
        task = toy.task
    policy = LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    critic = LlamaForTokenClassification.from_pretrained(critic_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)  # saved with each pushed policy
    pad_id = policy.config.pad_token_id or 0
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, eps=1e-5)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5)
    problems = generate(args.problems * args.iterations, "train", seed=args.seed, spec=task)
    # the same held-out problems for every run, whatever its seed: runs compare on one test set
    heldout = generate(args.eval_problems, "test", seed=HELDOUT_SEED, spec=task) if args.eval_every else []
    rule_params = protocol.RuleParams.model_validate_json(args.rule_params)

    if args.backend == "local":
        if args.state_owner != "learner":
            raise SystemExit("--backend local: the learner owns the state (--state-owner learner)")
        client: EspoClient | LocalClient = LocalClient(
            LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
            LlamaForTokenClassification.from_pretrained(critic_dir, dtype=torch.float32),
            critic_latency=args.critic_latency,
        )
    else:
        client = EspoClient(base_url=args.url, api_key=args.api_key, transport=transport)
    client.wait_ready(timeout=args.ready_timeout)
    info = client.info()
    version = info.policy_version  # pushes continue from the server's version, never go back
    beta0 = rule_params.beta0 if rule_params.beta0 is not None else info.rule_defaults["beta0"]
    state = protocol.EspoState(beta=float(beta0))
    if args.state_owner == "server":
        client.set_state(state)  # this run owns the server's state: start it fresh
    print(f"{run_name}: {args.iterations} iterations of {args.problems} problems x {args.n} samples")
    print(f"server {args.url}: {info.model} (v{version}), critic {info.critic}; writing {run_dir}")
    critic_version = info.critic_version or 0

    def saved(name: str, wanted: bool) -> Path | None:  # where a checkpoint is saved, if it is
        return (run_dir / name).resolve() if wanted or args.push == "path" else None

    if args.push_initial:
        start = saved("iter-0000", args.save_policy)
        version = push_policy(client, policy, tokenizer, start, version + 1, args.push)
        if args.push_critic:
            start = saved("critic-0000", args.save_critic)
            critic_version = push_critic(client, critic, tokenizer, start, critic_version + 1, args.push)

    # The critic: for GAE, and for a stop rule that asks it (a group-relative learner needs no other).
    trains_critic = args.advantage == "gae" or protocol.StopRule(args.stop_rule).needs_critic
    records: list[dict] = []
    cumulative_tokens, cumulative_critic_tokens, started = 0, 0, time.perf_counter()
    for iteration in range(args.iterations):
        t_start = time.perf_counter()

        # 1. Rollouts, with stopping enabled once the critic is trusted.
        if iteration >= args.warm_after and not state.warm:
            state = dataclasses.replace(state, warm=True)
            if args.state_owner == "server":
                state = client.set_state(state).state
        batch_problems = problems[iteration * args.problems : (iteration + 1) * args.problems]
        prompt_ids = [encode(problem.prompt) for problem in batch_problems]
        request = dict(
            prompts=[
                {"token_ids": ids, "answer": problem.answer}
                for ids, problem in zip(prompt_ids, batch_problems, strict=True)
            ],
            n=args.n,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed + iteration * args.problems * args.n,
            stop_rule=args.stop_rule,
            rule_params=rule_params,
        )
        if args.state_owner == "learner":
            response = client.rollouts(**request, state=state)
            state = update_learner_state(state, response)
        else:
            batch_id = f"{run_name}-{iteration}"
            response = client.rollouts(**request, batch_id=batch_id)
            state = client.commit(batch_id).state
        trajectories, usage = response.trajectories, response.usage
        off_policy = sum(t.policy_version != version for t in trajectories)
        if off_policy:
            print(f"warning: {off_policy} trajectories sampled by another policy version than v{version}")
        t_rollout = time.perf_counter()

        # 2. Rewards: the verifier's for `eos` (when the server did not score it), r_fail for
        # `espo_stop` (the server's), none for `length` (bootstrapped below).
        rewards: list[float | None] = []
        correct = 0
        for trajectory in trajectories:
            reward = trajectory.reward
            if trajectory.end_reason == "eos" and reward is None:
                problem = batch_problems[trajectory.prompt_index]
                text, finished = decode(trajectory.token_ids)
                reward = verify(problem.prompt, text, problem.answer, finished=finished).reward
            rewards.append(reward)
            correct += trajectory.end_reason == "eos" and reward == 1.0

        # 3. Tensors, values, advantages.
        batch = trajectories_to_tensors(trajectories, prompt_ids, pad_id=pad_id, rewards=rewards)
        mask = batch["response_mask"]
        prompt_width = batch["input_ids"].shape[1] - batch["responses"].shape[1]
        with torch.no_grad():
            values_all = (
                critic_values(critic, batch) if trains_critic else torch.zeros(batch["input_ids"].shape)
            )
        values = values_all[:, prompt_width - 1 : -1]  # V(s_t) before each response token
        rows = torch.arange(len(trajectories))
        bootstrap = values_all[rows, prompt_width + batch["response_lengths"] - 1]  # V(s_L), for `length`
        advantages, returns = compute_gae(
            batch["token_level_rewards"],
            values,
            mask,
            batch["terminal"],
            bootstrap_values=bootstrap,
            gamma=args.gamma,
            lam=args.gae_lambda,
        )  # the critic regresses on these returns whichever advantage the policy takes
        if args.advantage == "group":
            advantages = group_advantages(trajectories, rewards, mask)
        elif args.norm_adv:
            adv_mean = masked_mean(advantages, mask)
            adv_std = masked_mean((advantages - adv_mean) ** 2, mask).sqrt()
            advantages = (advantages - adv_mean) / (adv_std + 1e-8) * mask

        # 4. PPO epochs over minibatches of trajectories; the policy stops stepping for this
        # iteration once it has moved too far from the sampling policy (target_kl), the critic not.
        pg_losses, v_losses, approx_kls, clipfracs = [], [], [], []
        policy_steps, kl_stop, logprob_gap = 0, False, float("nan")
        for _epoch in range(args.epochs):
            order = torch.randperm(len(trajectories))
            for start in range(0, len(trajectories), args.minibatch_size):
                mb = order[start : start + args.minibatch_size]
                mb_batch = {name: tensor[mb] for name, tensor in batch.items()}
                mb_mask = mask[mb]

                if not kl_stop:
                    newlogprob = response_logprobs(policy, mb_batch)
                    logratio = newlogprob - batch["old_logprobs"][mb]
                    if policy_steps == 0:  # before the first step the local policy is pi_old
                        # The server's logprobs are pi_old; how far this forward pass is from them
                        # says whether the server really serves this learner's weights (checked on
                        # the first minibatch: a pass of its own over the batch cost 8-18% of a cell's CPU).
                        logprob_gap = (logratio.detach().abs() * mb_mask).max().item()
                        if logprob_gap > 1e-3:
                            print(f"warning: local and server logprobs differ by up to {logprob_gap:.2e}")
                    ratio = logratio.exp()
                    with torch.no_grad():
                        approx_kls.append(masked_mean((ratio - 1) - logratio, mb_mask).item())
                        clipped = ((ratio - 1.0).abs() > args.clip_coef).float()
                        clipfracs.append(masked_mean(clipped, mb_mask).item())
                    kl_stop = args.target_kl is not None and approx_kls[-1] > 1.5 * args.target_kl
                if not kl_stop:
                    mb_advantages = advantages[mb]
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mb_mask)
                    policy_optimizer.zero_grad()
                    pg_loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    policy_optimizer.step()
                    pg_losses.append(pg_loss.item())
                    policy_steps += 1

                if trains_critic:
                    newvalue = critic_values(critic, mb_batch)[:, prompt_width - 1 : -1]
                    v_loss = 0.5 * masked_mean((newvalue - returns[mb]) ** 2, mb_mask)
                    critic_optimizer.zero_grad()
                    v_loss.backward()
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    critic_optimizer.step()
                    v_losses.append(v_loss.item())
        t_update = time.perf_counter()

        # 5. Push the policy (and save it, in a fresh directory): the next rollouts sample from it.
        checkpoint = saved(f"iter-{iteration + 1:04d}", args.save_policy)
        version = push_policy(client, policy, tokenizer, checkpoint, version + 1, args.push)
        critic_checkpoint = saved(f"critic-{iteration + 1:04d}", args.save_critic)
        if args.push_critic and trains_critic:
            critic_version = push_critic(
                client, critic, tokenizer, critic_checkpoint, critic_version + 1, args.push
            )
        elif args.save_critic:
            save_critic(critic, tokenizer, critic_checkpoint)
        t_end = time.perf_counter()

        # 7. Held-out accuracy of the new policy (not rollout tokens: counted apart).
        evaluation = {}
        if args.eval_every and ((iteration + 1) % args.eval_every == 0 or iteration + 1 == args.iterations):
            evaluation = evaluate_heldout(
                client, heldout, args.max_tokens, seed=HELDOUT_SEED, greedy=args.eval_greedy
            )
        engine_tokens = usage.generated_tokens + usage.discarded_tokens  # what the engine computed
        cumulative_tokens += engine_tokens
        cumulative_critic_tokens += usage.critic_tokens

        n_traj = max(usage.trajectories, 1)
        ends = [t.end_reason for t in trajectories]
        record = {
            "iteration": iteration + 1,
            "sampled_by_version": response.policy_version,
            "policy_version": version,
            "accuracy": correct / n_traj,
            "tokens_generated": usage.generated_tokens,
            "tokens_discarded": usage.discarded_tokens,
            "engine_tokens": engine_tokens,
            "tokens_saved_estimate": usage.tokens_saved_estimate,
            "tokens_saved_upper_bound": usage.tokens_saved_upper_bound,
            "stop_rate": usage.stopped / n_traj,
            "eos_rate": ends.count("eos") / n_traj,
            "length_rate": ends.count("length") / n_traj,
            "critic_calls": usage.critic_calls,
            "critic_tokens": usage.critic_tokens,
            "state": asdict(state),
            "pg_loss": float(np.mean(pg_losses)) if pg_losses else 0.0,
            "policy_steps": policy_steps,
            "v_loss": float(np.mean(v_losses)) if v_losses else 0.0,
            "approx_kl": float(np.mean(approx_kls)),
            "clipfrac": float(np.mean(clipfracs)),
            "logprob_gap": logprob_gap,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "critic_checkpoint": None if critic_checkpoint is None else str(critic_checkpoint),
            "critic_version": critic_version if args.push_critic else None,
            "cumulative_tokens": cumulative_tokens,
            "cumulative_critic_tokens": cumulative_critic_tokens,
            "elapsed_s": time.perf_counter() - started,
            **evaluation,
            "rollout_s": t_rollout - t_start,
            "update_s": t_update - t_rollout,
            "push_s": t_end - t_update,
            "wall_s": t_end - t_start,
        }
        records.append(record)
        with open(run_dir / "log.jsonl", "a") as log_file:
            log_file.write(json.dumps(record) + "\n")
        print(
            f"iter {iteration + 1}/{args.iterations} v{response.policy_version}->v{version}"
            f" | acc {record['accuracy']:.3f} stop {record['stop_rate']:.2f} eos {record['eos_rate']:.2f}"
            f" len {record['length_rate']:.2f}"
            f" | engine tokens {engine_tokens} (discarded {usage.discarded_tokens})"
            f" saved ~{usage.tokens_saved_estimate} (<={usage.tokens_saved_upper_bound})"
            f" | pg {record['pg_loss']:+.4f} v {record['v_loss']:.4f} kl {record['approx_kl']:.4f}"
            f" clip {record['clipfrac']:.2f} steps {policy_steps} gap {logprob_gap:.1e}"
            f" | beta {state.beta:.2f}{' warm' if state.warm else ''}"
            f" | {record['wall_s']:.1f}s (rollout {record['rollout_s']:.1f} update {record['update_s']:.1f}"
            f" push {record['push_s']:.1f})"
            + (
                f" | held-out T=1 {evaluation['heldout_acc_t1']:.3f}"
                + (f" greedy {evaluation['heldout_acc_greedy']:.3f}" if args.eval_greedy else "")
                if evaluation
                else ""
            ),
            flush=True,
        )
    client.close()
    return records


if __name__ == "__main__":
    main()
