"""Faults: what a rollout server does when its parts fail, measured on real processes (loopback).

Starts, on seeded random tiny models, an `espo-server critic` (C), a rollout server S1 that uses it
(`--critic remote`, `--weights-dir`, `--shutdown-grace-s`), and a rollout server S2 without a critic.
Then, in turn:

  critic    bench/soak.py's workload runs against S1 while C hangs (SIGSTOP to its process group,
            SIGCONT some seconds later: its queries time out), then is killed (SIGKILL) and, some
            seconds later, started again on the same port. Checks: trajectories flagged
            critic_error while it is down; timeouts counted while it hangs;
            espo_critic_calls_total{outcome=error|timeout} moved by exactly the clients'
            usage.critic_errors; S1 stayed ready (/readyz 200, the
            critic reported down); after the restart, espo calls get critic values again; and the
            soak's own checks (delivered exactly once, /metrics = the clients' sums, no 5xx).
  weights   broken weight pushes to S1: a directory outside --weights-dir (403), one without
            safetensors (400), a truncated safetensors file (400) and the critic's weights, another
            architecture (400). Checks: each is refused so, and S1 still serves the old version
            (same policy_version, same tokens for a seeded call). Before espo_server/weights.py the
            last two took vLLM's engine process down.
  sigterm   short calls and one long call run on S1; SIGTERM to S1's process alone (as an
            orchestrator sends it). Checks: a new call during the drain is a 503 shutting_down with
            Retry-After, /readyz is 503; the short calls are answered 200 in full; the long one,
            still running when --shutdown-grace-s ends, is a 503 shutting_down; S1 exits 0 within
            the grace plus `--exit-bound-s`.
  engine    calls (one streamed) run on S2; vLLM's engine process (VLLM::EngineCore, S2's child)
            gets SIGKILL. Checks: the running calls end with 503 engine_dead (the streamed one with
            an engine_dead error line), a new call and /readyz are 503 engine_dead, and S2 exits
            with status 3 within `--exit-bound-s`.

Prints what happened with the times measured, writes `--out` (JSON); exit status 1 if a check fails.

    .venv/bin/python -m bench.faults             # the full run: 6 clients, a 150 s soak around the outage
    .venv/bin/python -m bench.faults --quick     # 3 clients, a 75 s soak
    .venv/bin/python -m bench.faults --steps weights,engine

tests/test_soak.py calls the weights and engine steps on servers of its own.
    make faults
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import harness, soak
from espo_server.process import ServerProcess

EAGER = soak.EAGER
PROMPT = [5, 6, 14, 7, 17]


def post(url: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(url + "/v1/rollouts", json=body, timeout=timeout)


def error_type(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


def streamed(url: str, body: dict) -> dict:
    """A streamed call: its status, the types of its lines, the last error line."""
    out: dict[str, Any] = {"status": None, "lines": [], "error": None}
    try:
        with httpx.stream("POST", url + "/v1/rollouts?stream=true", json=body, timeout=300) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line:
                    event = json.loads(line)
                    out["lines"].append(event.get("type"))
                    if event.get("type") == "error":
                        out["error"] = event["error"]
    except httpx.HTTPError as exc:
        out["transport_error"] = repr(exc)
    return out


def background(fn, *args) -> concurrent.futures.Future:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


# --------------------------------------------------------------------------------------------- critic


def critic_outage(s1: ServerProcess, critic: dict, weights: list[str], args) -> dict:
    """The soak's workload on S1; C stopped (SIGSTOP: a hung critic) at `hang_at` s for `hang_s` s,
    killed at `kill_at` s and started again at `restart_at` s."""
    events: dict[str, Any] = {"readyz_during_outage": []}
    url = s1.url

    def kill() -> None:
        proc: ServerProcess = critic["proc"]
        os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        events["killed_at"] = time.monotonic()

    def restart() -> None:
        proc = harness.start_critic("critic", critic["model"], logs=critic["logs"], port=critic["port"])
        critic["proc"] = proc
        proc.wait_ready()
        events["back_at"] = time.monotonic()

    def hang(sig: signal.Signals) -> None:
        os.killpg(critic["proc"].proc.pid, sig)

    threads: list[threading.Thread] = []

    def on_tick(elapsed: float) -> None:
        if args.hang_s > 0 and elapsed >= args.hang_at and "hang" not in events:
            events["hang"] = elapsed
            hang(signal.SIGSTOP)
        elif "hang" in events and "resume" not in events and elapsed >= args.hang_at + args.hang_s:
            events["resume"] = elapsed
            hang(signal.SIGCONT)
        elif elapsed >= args.kill_at and "kill" not in events:
            events["kill"] = elapsed
            threads.append(threading.Thread(target=kill))
            threads[-1].start()
        elif elapsed >= args.restart_at and "restart" not in events:
            events["restart"] = elapsed
            threads.append(threading.Thread(target=restart))
            threads[-1].start()

    def watch_readiness() -> None:  # S1's /readyz while C is down
        while "back_at" not in events and not done.is_set():
            if "killed_at" in events:
                r = httpx.get(url + "/readyz", timeout=30)
                critic_detail = r.json().get("detail", {}).get("critic", "")
                events["readyz_during_outage"].append((r.status_code, critic_detail))
            time.sleep(2.0)

    done = threading.Event()
    threads.append(threading.Thread(target=watch_readiness))
    threads[-1].start()

    soak_args = argparse.Namespace(
        clients=args.clients, seconds=args.soak_seconds, push_every=args.push_every, seed=1,
        warmup=10.0, rss_budget_mb=args.rss_budget_mb, max_inflight=64,
    )  # fmt: skip
    before = harness.scrape(url)
    rss = soak.RssWatch(s1.proc.pid).start()
    workload = soak.Workload(url, args.clients, args.soak_seconds, weights, args.push_every, seed=1,
                             rules=("espo", "espo", "regret_only", "none"), on_tick=on_tick)  # fmt: skip
    started = time.monotonic()
    tally = asyncio.run(workload.run())
    duration = time.monotonic() - started
    done.set()
    for thread in threads:
        thread.join(timeout=600)
    rss.stop()
    after = harness.scrape(url)
    result = soak.check(tally, before, after, rss, duration, soak_args)
    moved = {
        o: after.sum("espo_critic_calls_total", outcome=o) - before.sum("espo_critic_calls_total", outcome=o)
        for o in ("ok", "error", "timeout", "cancelled")
    }
    failed = moved["error"] + moved["timeout"]
    # Recovery: once C is back, espo calls get values again (the first queries may still fail while
    # the server's connection pool notices the new process).
    recovered, probes = False, 0
    deadline = time.monotonic() + 60
    while "back_at" in events and time.monotonic() < deadline and not recovered:
        probes += 1
        out = post(url, {"prompts": [{"token_ids": PROMPT}], "n": 8, "max_tokens": 64, "seed": probes,
                         "stop_rule": "espo", "state": EAGER}).json()  # fmt: skip
        recovered = out["usage"]["critic_calls"] > 0 and out["usage"]["critic_errors"] == 0
        if not recovered:
            time.sleep(1)
    outage = events.get("back_at", time.monotonic()) - events.get("killed_at", time.monotonic())
    ready = events["readyz_during_outage"]
    checks = {
        "trajectories flagged critic_error during the outage": tally.flagged > 0,
        **({"the hung critic's queries timed out": moved["timeout"] > 0} if args.hang_s > 0 else {}),
        "espo_critic_calls_total{error|timeout} = clients' critic_errors": failed == tally.critic_errors,
        "S1 stayed ready, critic reported down": bool(ready)
        and all(c == 200 and "down" in d for c, d in ready),
        "critic values again after the restart": recovered,
        **{f"soak: {name}": ok for name, ok in result["checks"].items()},
    }
    return {
        "outage_s": round(outage, 1),
        "killed_at_s": events.get("kill"),
        "hung_s": [events.get("hang"), events.get("resume")],
        "critic_calls_by_outcome": moved,
        "soak": {
            k: result[k]
            for k in (
                "duration_s",
                "calls_answered",
                "trajectories",
                "tokens",
                "errors",
                "critic_calls",
                "critic_errors",
                "critic_error_trajectories",
                "weight_pushes",
                "rss_mb",
                "lost",
                "twice",
            )
        },
        "critic_failures_counted": failed,
        "readyz_during_outage": ready,
        "recovery_probes": probes,
        "checks": checks,
    }


# --------------------------------------------------------------------------------------------- weights


def broken_weights(s1: ServerProcess, work: Path, critic_dir: str, policy_dir: str) -> dict:
    """`work`: a fresh directory inside S1's --weights-dir."""
    url = s1.url
    probe = {"prompts": [{"token_ids": PROMPT}], "n": 2, "max_tokens": 24, "seed": 77, "ignore_eos": True}
    version = httpx.get(url + "/v1/info", timeout=30).json()["policy_version"]
    reference = [t["token_ids"] for t in post(url, probe).json()["trajectories"]]
    outside = Path(tempfile.mkdtemp(prefix="espo-outside-"))
    shutil.copy(Path(critic_dir) / "config.json", outside / "config.json")
    (outside / "model.safetensors").write_bytes(b"\0" * 64)
    empty = work / "weights" / "empty"
    empty.mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    truncated = work / "weights" / "truncated"
    shutil.copytree(policy_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 3])
    foreign = work / "weights" / "critic"
    shutil.copytree(critic_dir, foreign)
    cases = {
        "outside --weights-dir": (outside, 403),
        "no safetensors": (empty, 400),
        "truncated safetensors": (truncated, 400),
        "another architecture (the critic)": (foreign, 400),
    }
    rows, checks = {}, {}
    for name, (path, want) in cases.items():
        r = httpx.post(url + "/v1/weights", json={"path": str(path), "version": version + 1}, timeout=300)
        info = httpx.get(url + "/v1/info", timeout=30)
        now = post(url, probe)
        same = now.status_code == 200 and [t["token_ids"] for t in now.json()["trajectories"]] == reference
        served = info.status_code == 200 and info.json()["policy_version"] == version
        rows[name] = {"status": r.status_code, "type": error_type(r), "message": r.text[:300],
                      "still_old_version": served, "same_tokens": same}  # fmt: skip
        checks[f"{name}: {want}"] = r.status_code == want
        checks[f"{name}: the old version still served"] = served and same
    shutil.rmtree(outside, ignore_errors=True)
    return {"cases": rows, "checks": checks}


# --------------------------------------------------------------------------------------------- SIGTERM


def sigterm(s1: ServerProcess, grace_s: float, bound_s: float) -> dict:
    url = s1.url
    short = {"prompts": [{"token_ids": PROMPT}], "n": 2, "max_tokens": 100, "ignore_eos": True}
    long = {"prompts": [{"token_ids": PROMPT}] * 4, "n": 64, "max_tokens": 480, "ignore_eos": True}
    shorts = [background(post, url, {**short, "seed": i}) for i in range(3)]
    time.sleep(0.3)  # the short ones are scheduled first
    slow = background(post, url, long)
    time.sleep(1.0)
    sent = time.monotonic()
    s1.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    during = post(url, short, timeout=30)
    ready = httpx.get(url + "/readyz", timeout=30)
    answers = [f.result(timeout=grace_s + bound_s) for f in shorts]
    answered_at = time.monotonic()
    cut = slow.result(timeout=grace_s + bound_s)
    cut_at = time.monotonic()
    try:
        status = s1.proc.wait(timeout=grace_s + bound_s)
    except Exception:
        status = None
    exited_at = time.monotonic()
    full = [a.status_code == 200 and all(len(t["token_ids"]) == 100 for t in a.json()["trajectories"])
            for a in answers]  # fmt: skip
    checks = {
        "a new call during the drain: 503 shutting_down with Retry-After": during.status_code == 503
        and error_type(during) == "shutting_down"
        and "retry-after" in during.headers,
        "/readyz 503 while draining": ready.status_code == 503,
        "the running short calls answered 200 in full": all(full),
        "the long call, past the grace: 503 shutting_down": cut.status_code == 503
        and error_type(cut) == "shutting_down",
        "exit status 0": status == 0,
        f"exit within grace + {bound_s:g} s": exited_at - sent <= grace_s + bound_s,
    }
    return {
        "grace_s": grace_s,
        "short_calls_answered_after_s": round(answered_at - sent, 2),
        "long_call_cut_after_s": round(cut_at - sent, 2),
        "exit_after_s": round(exited_at - sent, 2),
        "exit_status": status,
        "during_drain": {
            "status": during.status_code,
            "type": error_type(during),
            "retry_after": during.headers.get("retry-after"),
        },
        "checks": checks,
    }


# --------------------------------------------------------------------------------------------- engine


def engine_kill(s2: ServerProcess, bound_s: float) -> dict:
    """S2 is started with `--engine-dead-linger-s` well above the time a client needs to see its 503s.
    The engine process is stopped (SIGSTOP) before the two calls are sent, so neither can end before
    it is killed however slow the machine; each step waits for the state it needs (both calls'
    samples in flight, the death noticed), bounded by `bound_s`, never for a fixed time."""
    url = s2.url
    long = {"prompts": [{"token_ids": PROMPT}] * 2, "n": 32, "max_tokens": 480, "ignore_eos": True}
    core = policy_engine_core(s2.proc.pid)
    core.suspend()
    try:
        plain = background(post, url, long)
        stream = background(streamed, url, long)
        # every sample of a call counts as in flight from its start to its end; with the engine
        # stopped none can end
        inflight = lambda: harness.scrape(url).sum("espo_inflight_trajectories")  # noqa: E731
        seen: list[float] = []
        until(lambda: seen.append(inflight()) or seen[-1] >= 128, bound_s, "both calls in flight", seen)
    finally:
        killed = time.monotonic()
        core.kill()  # SIGKILL ends a stopped process too (and one left stopped by a failed wait)
    until(lambda: httpx.get(url + "/readyz", timeout=30).status_code == 503, bound_s, "the death noticed")
    after = post(url, long, timeout=30)
    ready = httpx.get(url + "/readyz", timeout=30)
    running = plain.result(timeout=bound_s)
    streamed_out = stream.result(timeout=bound_s)
    try:
        status = s2.proc.wait(timeout=bound_s)
    except Exception:
        status = None
    exited = time.monotonic()
    checks = {
        "the running call: 503 engine_dead": running.status_code == 503
        and error_type(running) == "engine_dead",
        "the streamed call: an engine_dead error line": (streamed_out.get("error") or {}).get("type")
        == "engine_dead",
        "a new call: 503 engine_dead": after.status_code == 503 and error_type(after) == "engine_dead",
        "/readyz 503": ready.status_code == 503,
        "exit status 3": status == 3,
        f"exit within {bound_s:g} s": exited - killed <= bound_s,
    }
    return {
        "exit_after_s": round(exited - killed, 2),
        "exit_status": status,
        "running_call": {"status": running.status_code, "message": running.text[:300]},
        "new_call": {"status": after.status_code, "message": after.text[:300]},
        "readyz": ready.text[:300],
        "streamed": streamed_out,
        "checks": checks,
    }


def until(condition, bound_s: float, what: str, seen: list | None = None) -> None:
    """Poll `condition()` until it holds; AssertionError naming `what` (and the last values `seen`)
    after `bound_s` seconds."""
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound_s:g} s: {what} (last seen: {(seen or [])[-20:]})")
        time.sleep(0.1)


def policy_engine_core(pid: int) -> psutil.Process:
    """The policy engine's process of the server `pid`: its oldest VLLM::EngineCore child (the
    server starts the policy engine before an in-process critic's)."""
    cores = harness.engine_cores(psutil.Process(pid))
    assert cores, "no VLLM::EngineCore child found"
    return cores[0]


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="3 clients, a 75 s soak")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--soak-seconds", type=float, default=150.0)
    parser.add_argument("--hang-at", type=float, default=8.0, help="seconds into the soak the critic hangs")
    parser.add_argument("--hang-s", type=float, default=6.0, help="for how long (SIGSTOP, SIGCONT; 0: never)")
    parser.add_argument("--kill-at", type=float, default=20.0, help="seconds into the soak the critic dies")
    parser.add_argument("--restart-at", type=float, default=35.0, help="seconds into the soak it restarts")
    parser.add_argument("--push-every", type=float, default=25.0)
    parser.add_argument("--grace", type=float, default=10.0, help="S1's --shutdown-grace-s")
    parser.add_argument("--exit-bound-s", type=float, default=30.0)
    parser.add_argument("--rss-budget-mb", type=float, default=200.0)
    parser.add_argument("--steps", default="critic,weights,sigterm,engine", help="which, in this order")
    parser.add_argument("--out", default=str(harness.RESULTS / "faults.json"))
    args = parser.parse_args()
    if args.quick:
        args.clients, args.soak_seconds, args.hang_at, args.hang_s = 3, 75.0, 3.0, 5.0
        args.kill_at, args.restart_at = 12.0, 20.0

    from espo_server.tiny_model import make_tiny_models

    started = time.monotonic()
    results: dict[str, Any] = {"config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="espo-faults-") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        policy, critic_model = make_tiny_models(work / "a", seed=0)
        policy_b, _ = make_tiny_models(work / "b", seed=7)
        critic = {"model": str(critic_model), "logs": logs}
        critic["proc"] = harness.start_critic("critic", critic["model"], logs=logs)
        critic["port"] = critic["proc"].port  # restarted on the same port
        common = (
            "--model",
            str(policy),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "64",
        )
        s1 = harness.start_espo(
            "s1", "serve", *common, "--critic", "remote", "--critic-url", critic["proc"].url,
            "--critic-timeout-s", "2", "--weights-dir", str(work), "--shutdown-grace-s", str(args.grace),
            logs=logs,
        )  # fmt: skip
        wanted = args.steps.split(",")
        s2 = None
        if "engine" in wanted:  # S2 only serves the engine step
            linger = ("--engine-dead-linger-s", str(args.exit_bound_s / 2))
            s2 = harness.start_espo("s2", "serve", *common, "--critic", "none", *linger, logs=logs)
        try:
            critic["proc"].wait_ready()
            s1.wait_ready()
            if s2 is not None:
                s2.wait_ready()
            print(f"servers up after {time.monotonic() - started:.0f} s (logs in {logs})", flush=True)
            steps = [
                ("critic", lambda: critic_outage(s1, critic, [str(policy), str(policy_b)], args)),
                ("weights", lambda: broken_weights(s1, work / "broken", str(critic_model), str(policy))),
                ("sigterm", lambda: sigterm(s1, args.grace, args.exit_bound_s)),
                ("engine", lambda: engine_kill(s2, args.exit_bound_s)),
            ]
            for name, step in [(name, step) for name, step in steps if name in wanted]:
                t = time.monotonic()
                print(f"-- {name} ...", flush=True)
                try:
                    results[name] = step()
                except Exception as exc:  # a step that breaks is a failed check, the others still run
                    results[name] = {"checks": {f"{name} ran": False}, "exception": repr(exc)}
                results[name]["took_s"] = round(time.monotonic() - t, 1)
                report(name, results[name])
        finally:
            for proc in (s1, s2, critic["proc"]):
                if proc is not None:
                    proc.stop(timeout=30)
            for proc in (s1, s2):
                if proc is not None:
                    results.setdefault("logs", {})[proc.name] = proc.log_tail(15)
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["ok"] = all(
        ok for r in results.values() if isinstance(r, dict) for ok in r.get("checks", {}).values()
    )
    harness.write_result(args.out, results)
    print(f"faults: {'passed' if results['ok'] else 'FAILED'} in {results['wall_s']} s; wrote {args.out}")
    sys.exit(0 if results["ok"] else 1)


def report(name: str, result: dict) -> None:
    shown = {k: v for k, v in result.items() if k not in ("checks", "streamed", "soak", "cases")}
    print(f"   {json.dumps(shown, default=str)[:600]}")
    if "soak" in result:
        print(f"   soak: {json.dumps(result['soak'], default=str)[:800]}")
    for case, row in result.get("cases", {}).items():
        print(f"   {case}: {row['status']} {row['type']}, old version still served: "
              f"{row['still_old_version'] and row['same_tokens']}")  # fmt: skip
    for check, ok in result["checks"].items():
        print(f"   [{'ok' if ok else 'FAILED'}] {check}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the servers this script started are stopped too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
