"""What a weight push costs: an upload over HTTP against a push by path, for one checkpoint.

One rollout server (policy only, float32, `--critic none`) on a Qwen2.5-style model of about 100M
parameters made from a config (tied embeddings; `--hidden`, `--layers`, `--vocab` size it). This
process is the learner: it holds two policies of that architecture in memory (seeds 1 and 2) and
pushes them in turn, so that every push really changes the weights, `--repeats` times each way:

  path    the checkpoint saved once (beforehand, not timed) in a --weights-dir directory, then
          `POST /v1/weights`: the server's checks and vLLM's reload
  upload  `client.upload_weights(model)`: the tensors streamed from memory as safetensors shards
          over loopback HTTP into the server's staging directory, then the same checks and
          reload (`POST .../commit`)

The upload is also timed in its two halves: the shards' transfer (open + PUTs: the loopback
throughput, MB/s of safetensors bytes) and the commit (checks + reload, as for the path push).
Medians (and ranges) over the repeats; the ratio upload / path is the figure the target is about
(an upload push within 1.5x of a path push of the same checkpoint). `save_pretrained` of the
learner's model is timed too: a learner without a shared volume saves, copies and pushes; one
with a shared volume still saves before a path push.

    .venv/bin/python -m bench.push                       # ~100M parameters, 5 repeats
    .venv/bin/python -m bench.push --hidden 128 --layers 2 --vocab 64 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import harness
from espo_client import EspoClient
from espo_client._uploads import commit_upload_op, open_upload_op, put_shard_op
from espo_client.checkpoint import DEFAULT_SHARD_BYTES, shards
from espo_server.tiny_model import QWEN2, TinyConfig, build_tokenizer, make_arch_model, save_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 8/3 hidden)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (embeddings: tied)")
    parser.add_argument("--repeats", type=int, default=5, help="pushes each way")
    parser.add_argument(
        "--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20, help="upload shard size"
    )
    parser.add_argument("--out", default=str(harness.RESULTS / "push.json"), help="the JSON result")
    return parser.parse_args(argv)


def make_policy(args: argparse.Namespace, seed: int):
    """A Qwen2.5-style policy (tied embeddings) of the bench's size, random weights from `seed`."""
    cfg = TinyConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=args.intermediate or (8 * args.hidden // 3) // 64 * 64,
        max_position_embeddings=512,
    )
    model = make_arch_model(QWEN2, cfg, seed=seed, vocab_size=args.vocab)
    return model.eval()


def upload_in_halves(client: EspoClient, model, version: int, shard_bytes: int) -> tuple[float, float, int]:
    """An upload push timed in two halves: (transfer seconds, commit seconds, bytes sent)."""
    started = time.perf_counter()
    opened = client._run(open_upload_op(client, "policy", None))
    sent = 0
    for shard in shards(model, shard_bytes=shard_bytes):
        client._run(put_shard_op(client, "policy", opened.upload_id, shard))
        sent += shard.size
    transferred = time.perf_counter()
    answer = client._run(commit_upload_op(client, "policy", opened.upload_id, version))
    assert answer.policy_version == version
    return transferred - started, time.perf_counter() - transferred, sent


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} [{min(values):.2f}-{max(values):.2f}]"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="espo-push-bench-"))
    models = {seed: make_policy(args, seed) for seed in (1, 2)}
    params = sum(t.numel() for _, t in models[1].named_parameters())  # the tied weight counted once
    served = save_model(models[1], build_tokenizer(QWEN2), work / "served")
    # the path pushes' checkpoints, saved beforehand (save_pretrained timed once per model)
    saves, checkpoints = [], {}
    for seed, model in models.items():
        started = time.perf_counter()
        checkpoints[seed] = save_model(model, build_tokenizer(QWEN2), work / "weights" / f"seed{seed}")
        saves.append(time.perf_counter() - started)
    size = sum(f.stat().st_size for f in checkpoints[1].glob("*.safetensors"))
    print(f"model: {params / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB of float32 safetensors", flush=True)

    server = harness.start_espo(
        "push-bench", "serve", "--model", str(served), "--critic", "none", "--dtype", "float32",
        "--max-model-len", "256", "--weights-dir", str(work / "weights"),
        "--upload-dir", str(work / "staging"), logs=work,
    )  # fmt: skip
    print(f"starting the server (log {server.log_path}) ...", flush=True)
    shard_bytes = int(args.shard_mb * 2**20)
    times: dict[str, list[float]] = {
        "path": [],
        "upload": [],
        "transfer": [],
        "commit": [],
        "reload_path": [],
    }
    try:
        server.wait_ready()
        with EspoClient(base_url=server.url, timeout=1800) as client:
            version = client.info().policy_version
            for k in range(args.repeats):
                for how in ("path", "upload") if k % 2 == 0 else ("upload", "path"):
                    seed = 2 if version % 2 == 0 else 1  # never the weights that serve now
                    version += 1
                    started = time.perf_counter()
                    if how == "path":
                        answer = client.load_weights(str(checkpoints[seed]), version=version)
                        times["reload_path"].append(answer.load_time_s)
                    else:
                        transfer, commit, sent = upload_in_halves(client, models[seed], version, shard_bytes)
                        times["transfer"].append(transfer)
                        times["commit"].append(commit)
                    times[how].append(time.perf_counter() - started)
                    print(f"  {how:6s} push {k + 1}: {times[how][-1]:.2f}s", flush=True)
    finally:
        server.stop()
    throughput = [sent / t / 2**20 for t in times["transfer"]]
    ratio = statistics.median(times["upload"]) / statistics.median(times["path"])
    print(f"\npush of {params / 1e6:.0f}M parameters ({size / 2**20:.0f} MiB), {args.repeats} repeats, "
          "seconds: median [min-max]")  # fmt: skip
    print(f"  path push (POST /v1/weights: checks + reload)      {spread(times['path'])}")
    print(f"    of which the engine's reload (load_time_s)        {spread(times['reload_path'])}")
    print(f"  upload push (open + shards + commit)                {spread(times['upload'])}")
    print(f"    transfer (open + PUT shards)                      {spread(times['transfer'])}")
    print(f"    commit (checks + reload)                          {spread(times['commit'])}")
    print(f"  loopback upload throughput, MiB/s                   {spread(throughput)}")
    print(f"  learner's save_pretrained (a path push's first step) {spread(saves)}")
    print(f"  upload / path: {ratio:.2f}x (target: within 1.5x)")
    result = {
        "config": vars(args),
        "parameters": params,
        "checkpoint_bytes": size,
        "seconds": times,
        "save_pretrained_s": saves,
        "upload_mib_per_s": throughput,
        "upload_over_path": ratio,
    }
    harness.write_result(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
