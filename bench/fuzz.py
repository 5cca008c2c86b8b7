"""Fuzz: schemathesis against the server's own OpenAPI schema, then a normal call must still succeed.

Starts (unless given `--url`) `espo-server serve` on a seeded random tiny model, on loopback, with
tight limits so that every call the fuzzer makes stays cheap (n <= 4, <= 4 prompts, 16
trajectories, a 128-token model length, a 2 s deadline per call), a critic URL where nothing
listens (every critic query fails: the fallback path, flagged; so the critic's pushes,
`/v1/critic/weights` and its uploads, 503 there by design, are left out) and an empty --weights-dir.
The policy's upload routes (`/v1/weights/uploads` and its sub-routes) and the weight-file routes
(`/v1/weights/files`, `/v1/weights/files/{name}`) are fuzzed like every other operation, bounded:
uploads are staged in a temporary --upload-dir, each holds at most --upload-max-bytes (8 MiB), and
one left open is abandoned after 3 s (the server takes one at a time). Then `schemathesis run`
generates requests for every operation of `/openapi.json` in its phases coverage, fuzzing and
stateful (examples: the schema has none): valid ones and invalid ones (wrong types, out-of-range
numbers, missing fields, odd strings), and in the stateful phase chains that follow the schema's
links (an opened upload's id to its status, shards, commit and abandon; a run's id to its routes).
It checks each answer: no 5xx (`not_a_server_error`), the status is one the schema documents, the
body matches the documented model, invalid data is refused. Afterwards: every phase ran, /readyz
is 200, a normal rollout call succeeds, the server process still runs and its log holds no
traceback; from the uvicorn access log: the answers by status, both groups of weight routes
answered, and each of GET, DELETE and commit of `/v1/weights/uploads/{upload_id}` answered
something other than 404 for an id the server handed out (required of our own server; with
`--url`, reported). schemathesis runs with `bench/fuzz_hooks.py` loaded (its workers are threads;
the module makes them safe on Python 3.11.7).

    .venv/bin/python -m bench.fuzz                      # 300 cases per operation, fuzzing for 600 s
    .venv/bin/python -m bench.fuzz --max-time 60        # a quick look
    .venv/bin/python -m bench.fuzz --url URL --log LOG  # a running server (tests/test_soak.py)

`--max-time` bounds the generation: schemathesis' fuzzing phase repeats until it is spent (tens of
thousands of cases in 300 s on the 2-core box); `--max-time 0`: at most `--max-examples` cases per
operation and phase, however long they take.
    make fuzz
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench import harness
from espo_server.process import free_port

HOOKS = Path(__file__).with_name("fuzz_hooks.py")
"""Loaded by schemathesis: makes its threaded workers safe on Python 3.11.7 (see the module)."""
PHASES = "examples,coverage,fuzzing,stateful"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
PROBE = {"prompts": [{"token_ids": [5, 6, 7]}], "n": 2, "max_tokens": 8, "stop_rule": "espo", "seed": 1}


UPLOAD_MAX_BYTES = 8 * 2**20
"""The fuzzed server's --upload-max-bytes: what one upload the fuzzer opens may take of the disk."""
UPLOAD_IDLE_S = 3
"""The fuzzed server's --upload-idle-timeout-s. It takes one upload at a time (409 while one is open),
and the fuzzer leaves most of those it opens open: a short expiry frees the slot for the stateful
phase, whose chains open an upload and follow the links from its id at once."""
FUZZED_ROUTES = re.compile(r'"[A-Z]+ (/v1/weights/(?:uploads|files)[^ "]*) HTTP/1\.[01]" (\d{3})')
"""An access log line of the policy's upload routes or of the weight-file routes."""
UPLOAD_ID_ROUTES = re.compile(
    r'"(GET|DELETE|POST|PUT) (/v1/(?:critic/)?weights/uploads/)([^/ "?]+)'
    r'(/commit|/shards/[^/ "?]+|)(?:\?[^ "]*)? HTTP/1\.[01]" (\d{3})'
)
"""An access log line of a route that takes an `{upload_id}` (the policy's or the critic's)."""
SERVER_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
"""The form of the ids the server hands out (a uuid4's hex): the fuzzer does not draw one by
chance, it has it from an answer (an OpenAPI link of the stateful phase)."""
NEED_AN_UPLOAD = ("GET /v1/weights/uploads/{upload_id}", "DELETE /v1/weights/uploads/{upload_id}",
                  "POST /v1/weights/uploads/{upload_id}/commit")  # fmt: skip
"""The policy's routes that do something only for an upload that exists: each must have been
called with an id the server handed out and answered with something other than 404."""
UPLOAD_ROUTE_SHAPES = {("GET", ""), ("DELETE", ""), ("POST", "/commit"), ("PUT", "/shards/{shard}")}


def server_flags(model: str, weights_dir: str, upload_dir: str) -> list[str]:
    return [
        "--model", model, "--dtype", "float32", "--max-model-len", "128",
        "--critic", "remote", "--critic-url", f"http://127.0.0.1:{free_port()}", "--critic-timeout-s", "0.5",
        "--max-n", "4", "--max-prompts", "4", "--max-trajectories", "16", "--max-call-seconds", "2",
        "--max-inflight-trajectories", "64", "--weights-dir", weights_dir, "--run-idle-timeout-s", "60",
        "--idempotency-cache-mb", "16", "--upload-dir", upload_dir,
        "--upload-max-bytes", str(UPLOAD_MAX_BYTES), "--upload-idle-timeout-s", str(UPLOAD_IDLE_S),
    ]  # fmt: skip


def fuzz(url: str, args: argparse.Namespace, report_dir: Path) -> dict:
    before = httpx.post(url + "/v1/rollouts", json=PROBE, timeout=60)
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
        "--checks", args.checks, "--max-examples", str(args.max_examples), "--seed", str(args.seed),
        "--workers", str(args.workers), "--request-timeout", "60", "--phases", PHASES,
        "--report", "junit", "--report-dir", str(report_dir), "--suppress-health-check", "all",
        "--no-color",
    ]  # fmt: skip
    if args.max_time:
        argv += ["--max-time", str(args.max_time)]
    if not args.url:
        # our own server's critic is unreachable by design: a critic push (by path, or an upload
        # relayed to it) is rightly a 503 critic_unavailable there (pushes are fuzzed against a live
        # critic by tests/test_soak.py)
        argv += ["--exclude-path-regex", "^/v1/critic/weights"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    started = time.monotonic()
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=args.timeout, cwd=report_dir.parent, env=env
    )
    took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    ready = httpx.get(url + "/readyz", timeout=60)
    after = httpx.post(url + "/v1/rollouts", json=PROBE, timeout=60)
    return {
        "schemathesis_exit": proc.returncode,
        "schemathesis_s": round(took, 1),
        "cases": count_cases(report_dir, output),
        "phases": phase_outcomes(output),
        "probe_before": before.status_code,
        "readyz_after": ready.status_code,
        "probe_after": after.status_code,
        "output_tail": output[-6000:],
        "output": output,
    }


def count_cases(report_dir: Path, output: str) -> int | None:
    """Test cases generated, from schemathesis' summary ('N generated')."""
    found = re.findall(r"(\d+) generated", output)
    return int(found[-1]) if found else None


def phase_outcomes(output: str) -> dict[str, str]:
    """schemathesis' summary, 'Test Phases:' then a line per phase: 'passed', 'failed' (it found
    something), 'errored' (the phase itself broke off) or 'skipped'."""
    marks = {"✅": "passed", "❌": "failed", "🚫": "errored", "⏭": "skipped"}
    summary = output.rpartition("Test Phases:")[2]
    found = re.findall(r"^\s*(✅|❌|🚫|⏭)\s+(Examples|Coverage|Fuzzing|Stateful)\b", summary, re.MULTILINE)
    return {phase.lower(): marks[mark] for mark, phase in found}


def access_log_statuses(log: str) -> Counter:
    """uvicorn's access log lines: '... "POST /v1/rollouts HTTP/1.1" 400 Bad Request' -> status counts."""
    return Counter(m.group(1) for m in re.finditer(r'HTTP/1\.[01]" (\d{3})', log))


def read_log(result: dict, log: str) -> None:
    """The answers by status and the tracebacks of the server's log (what it wrote while fuzzed)."""
    result["answers_by_status"] = dict(sorted(access_log_statuses(log).items()))
    routes = Counter(m.group(1).split("/")[3] for m in FUZZED_ROUTES.finditer(log))
    result["weight_upload_and_file_answers"] = dict(sorted(routes.items()))  # uploads / files -> answers
    answers: dict[str, dict[str, Counter]] = {}  # route -> "handed_out" / "other" ids -> statuses
    for m in UPLOAD_ID_ROUTES.finditer(log):
        method, prefix, upload_id, rest, status = m.groups()
        rest = "/shards/{shard}" if rest.startswith("/shards/") else rest
        if (method, rest) not in UPLOAD_ROUTE_SHAPES:
            continue  # a method the route does not take (405)
        kind = "handed_out" if SERVER_UPLOAD_ID.fullmatch(upload_id) else "other"
        route = answers.setdefault(f"{method} {prefix}{{upload_id}}{rest}", {})
        route.setdefault(kind, Counter())[status] += 1
    result["upload_id_answers"] = {
        route: {kind: dict(sorted(c.items())) for kind, c in sorted(kinds.items())}
        for route, kinds in sorted(answers.items())
    }
    serving = log.split("INFO:     Shutting down")[0]  # vLLM's __del__ at exit prints one after
    result["tracebacks_in_log"] = serving.count("Traceback (most recent call last)")
    where = serving.find("Traceback")
    result["first_traceback"] = serving[max(0, where - 2000) :][:6000] if where >= 0 else None


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--max-examples", type=int, default=300, help="cases per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checks", default=CHECKS)
    parser.add_argument("--timeout", type=float, default=3600.0, help="for the whole schemathesis run")
    harness.add_common_args(parser, "fuzz", url_help="a running server (default: start one on a tiny model)")
    parser.add_argument("--log", default=None, help="with --url: its log (what it writes meanwhile is read)")
    parser.add_argument("--max-time", type=int, default=600, help="seconds of generation (0: none)")
    args = parser.parse_args()
    result: dict = {"config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="espo-fuzz-") as tmp:
        work = Path(tmp)
        if args.url is not None:
            offset = Path(args.log).stat().st_size if args.log else 0
            result |= fuzz(args.url, args, work / "report")
            if args.log:
                with open(args.log, errors="replace") as f:
                    f.seek(offset)
                    read_log(result, f.read())
        else:
            from espo_server.tiny_model import make_tiny_models

            policy, _ = make_tiny_models(work / "tiny", seed=0)
            (work / "weights").mkdir()
            (work / "uploads").mkdir()
            flags = server_flags(str(policy), str(work / "weights"), str(work / "uploads"))
            server = harness.start_espo("fuzzed", "serve", *flags, logs=work)
            with server:
                server.wait_ready()
                result |= fuzz(server.url, args, work / "report")
                result["server_running_after"] = server.proc is not None and server.proc.poll() is None
                result["server_exit_status_after"] = None if server.proc is None else server.proc.poll()
            log = server.log_path.read_text(errors="replace")
            read_log(result, log)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).with_suffix(".server.log").write_text(log)  # kept: the work dir goes
    ran = ("coverage", "fuzzing", "stateful")  # examples: the schema has none, so it is skipped
    checks = {
        "schemathesis found nothing": result["schemathesis_exit"] == 0,
        "the coverage, fuzzing and stateful phases ran": all(
            result["phases"].get(phase) in ("passed", "failed") for phase in ran
        ),
        "a normal call succeeded before and after": result["probe_before"] == result["probe_after"] == 200,
        "/readyz 200 after": result["readyz_after"] == 200,
    }
    if "answers_by_status" in result:
        checks["no 5xx in the access log"] = not any(s.startswith("5") for s in result["answers_by_status"])
        checks["no traceback in the server log"] = result["tracebacks_in_log"] == 0
        fuzzed = result["weight_upload_and_file_answers"]
        both = bool(fuzzed.get("uploads") and fuzzed.get("files"))
        checks["the upload and weight-file routes were fuzzed"] = both
    if "server_running_after" in result:  # our own server (its short upload expiry lets chains open one)
        checks["the server still runs"] = result["server_running_after"]
        answered = result["upload_id_answers"]
        checks["the upload-id routes met an existing upload (an answer other than 404)"] = all(
            any(status != "404" for status in answered.get(route, {}).get("handed_out", {}))
            for route in NEED_AN_UPLOAD
        )
    result["checks"] = checks
    result["ok"] = all(checks.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".log").write_text(result.pop("output"))
    harness.write_result(args.out, result)
    print(result["output_tail"][-3000:])
    print(f"\nFuzz: {result['cases']} cases in {result['schemathesis_s']} s; answers by status "
          f"{result.get('answers_by_status')}")  # fmt: skip
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(f"fuzz: {'passed' if result['ok'] else 'FAILED'}; wrote {args.out}")
    sys.exit(0 if result["ok"] else 1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the server this script started is stopped too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
