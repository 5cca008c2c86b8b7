"""Would vLLM's flat logprobs save work in the server process, per sampled token?

The server asks vLLM for the raw log-probability of every sampled token and the top one
(`logprobs=1`). vLLM's output processor keeps them for the request's whole life, by default as one
dict and one `Logprob` object per entry per token (the server's choice, `flat_logprobs=False` in
espo_server/engine.py); with `SamplingParams(flat_logprobs=True)` as a few flat lists per request.
This bench runs vLLM's own `LogprobsProcessor` (the code the server's process runs for every engine
step) on the same random engine outputs both ways and slices each step's delta as vLLM's DELTA
output does; the dict form goes through the engine's own `PolicyEngine._chunk`, the flat form
through `flat_chunk` (the same chunk read from the flat lists). It prints CPU microseconds per
token, the bytes vLLM keeps per token for the request's life, and checks that both ways give the
same chunks.

    .venv/bin/python -m bench.logprobs_cost [--requests 256] [--tokens 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from types import SimpleNamespace

import numpy as np

from espo_server.engine import GenerationParams, PolicyEngine, TokenChunk

VOCAB = 50_000
Steps = list[list[tuple[int, int, float, float, int]]]
"""Per request, per step: (sampled id, top id, sampled logprob, top logprob, sampled rank)."""


def engine_steps(requests: int, tokens: int, seed: int) -> Steps:
    """About one step in three samples the top token itself (vLLM then lists it twice)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(requests):
        top = rng.integers(0, VOCAB, tokens)
        sampled = np.where(rng.random(tokens) < 0.35, top, rng.integers(0, VOCAB, tokens))
        top_lp = -rng.random(tokens)
        sampled_lp = np.where(sampled == top, top_lp, top_lp - rng.random(tokens) * 5)
        rank = np.where(sampled == top, 1, rng.integers(2, 100, tokens))
        out.append(
            list(
                zip(
                    sampled.tolist(),
                    top.tolist(),
                    sampled_lp.tolist(),
                    top_lp.tolist(),
                    rank.tolist(),
                    strict=True,
                )
            )
        )
    return out


def flat_chunk(out) -> TokenChunk:
    """`PolicyEngine._chunk` for a DELTA output whose logprobs are vLLM's FlatLogprobs: at each
    position the sampled token's entry comes first (vLLM's sampler), then the top one."""
    completion = out.outputs[0]
    chunk = TokenChunk([], [], [], finish_reason=completion.finish_reason if out.finished else None)
    steps = completion.logprobs
    ids, values = steps.token_ids, steps.logprobs
    bounds = zip(steps.start_indices, steps.end_indices, strict=True)
    for token_id, (start, end) in zip(completion.token_ids, bounds, strict=True):
        at = start if ids[start] == token_id else ids.index(token_id, start, end)
        chunk.token_ids.append(token_id)
        chunk.logprobs.append(values[at])
        chunk.top_logprobs.append(max(values[start:end]))
    return chunk


def _processors(count: int, flat: bool) -> list:
    from vllm.logprobs import create_sample_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    return [
        LogprobsProcessor(
            tokenizer=None,
            logprobs=create_sample_logprobs(flat),
            prompt_logprobs=None,
            cumulative_logprob=0.0,
            num_logprobs=1,
            num_prompt_logprobs=None,
        )
        for _ in range(count)
    ]


def _engine_lists(steps: Steps) -> list[list]:
    """What the engine core sends for each request and step: vLLM's LogprobsLists of one row."""
    from vllm.v1.outputs import LogprobsLists

    return [
        [
            LogprobsLists(
                np.array([[s, t]]), np.array([[slp, tlp]], dtype=np.float32), np.array([rank]), None
            )
            for s, t, slp, tlp, rank in request
        ]
        for request in steps
    ]


def run(steps: Steps, flat: bool) -> tuple[list[list[TokenChunk]], float]:
    """vLLM's logprobs processing and the server's chunking for every request, one token per step,
    requests interleaved as an engine step serves them. Returns the chunks and the CPU seconds."""
    params = GenerationParams(max_tokens=len(steps[0]))
    processors = _processors(len(steps), flat)
    lists = _engine_lists(steps)  # built before the clock starts: the engine core sends these
    chunks: list[list[TokenChunk]] = [[] for _ in steps]
    started = time.process_time()
    for position in range(len(steps[0])):
        for i, processor in enumerate(processors):
            processor._update_sample_logprobs(lists[i][position])
            delta = processor.logprobs[-1:]  # as vLLM's DELTA output slices the new tokens
            completion = SimpleNamespace(
                token_ids=[steps[i][position][0]], logprobs=delta, finish_reason=None
            )
            out = SimpleNamespace(outputs=[completion], finished=False)
            chunks[i].append(flat_chunk(out) if flat else PolicyEngine._chunk(out, params, False))
    return chunks, time.process_time() - started


def held_bytes(steps: Steps, flat: bool) -> int:
    """Bytes that the requests' logprobs hold once sampled, for as long as the requests live."""
    import tracemalloc

    lists = _engine_lists(steps)
    tracemalloc.start()
    processors = _processors(len(steps), flat)
    for request, processor in zip(lists, processors, strict=True):
        for step in request:
            processor._update_sample_logprobs(step)
    del lists
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del processors
    return held


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256, help="requests served side by side")
    parser.add_argument("--tokens", type=int, default=256, help="tokens sampled per request")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats (medians reported)")
    args = parser.parse_args(argv)
    steps = engine_steps(args.requests, args.tokens, seed=0)
    n = args.requests * args.tokens
    cpu: dict[str, list[float]] = {"dict": [], "flat": []}
    for _ in range(args.repeats):
        chunks = {}
        for mode in ("dict", "flat"):
            chunks[mode], seconds = run(steps, flat=mode == "flat")
            cpu[mode].append(seconds)
        if chunks["dict"] != chunks["flat"]:
            raise SystemExit("flat and dict logprobs gave different chunks")
    result = {"requests": args.requests, "tokens": args.tokens, "repeats": args.repeats}
    for mode in ("dict", "flat"):
        result[f"{mode}_us_per_token"] = statistics.median(cpu[mode]) / n * 1e6
        result[f"{mode}_bytes_per_token"] = held_bytes(steps, mode == "flat") / n
    result["flat_over_dict"] = result["flat_us_per_token"] / result["dict_us_per_token"]
    print(f"{n:,} tokens ({args.requests} requests x {args.tokens}), medians of {args.repeats}:")
    for mode in ("dict", "flat"):
        print(
            f"  {mode:4}: {result[f'{mode}_us_per_token']:.2f} CPU us per token, "
            f"{result[f'{mode}_bytes_per_token']:,.0f} bytes held per token while its request lives"
        )
    print(f"  flat / dict CPU: {result['flat_over_dict']:.2f}; the chunks are the same")
    return result


if __name__ == "__main__":
    main()
