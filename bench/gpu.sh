#!/usr/bin/env bash
# The GPU run: the benchmarks at a size where the critic's cost can be judged, in at most 8 minutes on
# one H100, with nothing downloaded.
#
#   bash bench/gpu.sh [--out DIR]            # a GPU (nvidia-smi works): Qwen2 1.5B policy, 0.5B critic
#   bash bench/gpu.sh --smoke [--out DIR]    # the same pipeline at the tests' size, on any machine
#
# 1. bench.gpu_models: random-weight Qwen2-shaped policy (1.5B) and critic (0.5B, one label), bfloat16,
#    made from configs (cached under $ESPO_CACHE_DIR, default ~/.cache/espo-server).
# 2. One espo-server on them (policy 0.2 and critic 0.1 of the card: the benches' own engines share it).
# 3. bench.overhead against it (--espo-url), beside stock vllm serve and AsyncLLM: 1, 64, 256 sequences.
# 4. bench.throughput against it: 128 toy prompts x n=4 = 512 trajectories of up to 512 tokens on 256
#    slots (random weights almost never sample EOS: every response runs long).
# 5. bench.critic_cost against it: critic queries, tokens and batches per call.
# 6. bench.gpu_table: one table of all three JSONs.
# Every step's JSON and the servers' logs go to DIR (default bench/results/gpu). A step still running
# when the time is up ($GPU_BENCH_SECONDS, default 450; the server's stop and the table take the rest
# of the 8 minutes) is interrupted (SIGINT) and listed as not run. With --smoke on CPU the three
# benches run side by side (it checks that the steps work, not their figures).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
OUT="$ROOT/bench/results/gpu"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (--smoke, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

if [ "$SMOKE" = 1 ]; then
    POLICY=tiny CRITIC_SIZE=tiny DTYPE=float32 MAX_LEN=512 SLOTS=4
    OVERHEAD=(--concurrency 1 --repeats 1 --max-tokens 16)
    THROUGHPUT=(--problems 4 --n 2 --max-tokens 16 --repeats 1)
    CRITIC=(--problems 4 --n 2 --max-tokens 16 --repeats 1)
    export ESPO_KV_CACHE_MEMORY_BYTES="${ESPO_KV_CACHE_MEMORY_BYTES:-268435456}" \
        ESPO_CRITIC_KV_CACHE_MEMORY_BYTES="${ESPO_CRITIC_KV_CACHE_MEMORY_BYTES:-268435456}" ESPO_ENFORCE_EAGER="${ESPO_ENFORCE_EAGER:-true}"
elif nvidia-smi -L >/dev/null 2>&1; then
    POLICY=1.5b CRITIC_SIZE=0.5b DTYPE=bfloat16 MAX_LEN=2048 SLOTS=256
    OVERHEAD=(--concurrency 1 64 256 --repeats 3 --max-tokens 128)
    THROUGHPUT=(--problems 128 --n 4 --max-tokens 512 --repeats 1)
    CRITIC=(--problems 64 --n 4 --max-tokens 512 --repeats 1)
else
    echo "gpu.sh: no GPU here (nvidia-smi -L fails). This run is sized for one; run it where a GPU is," \
        "or 'bash bench/gpu.sh --smoke' for the same pipeline at the tests' size." >&2
    exit 2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/logs"
rm -f "$OUT"/overhead.json "$OUT"/throughput.json "$OUT"/critic_cost.json
DEADLINE=$((SECONDS + ${GPU_BENCH_SECONDS:-450}))
FAILED=()

step() {  # NAME COMMAND...: run it in what is left of the time; a failure is noted, not fatal
    local name="$1"; shift
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -le 0 ]; then
        echo "== $name: skipped, no time left" >&2; FAILED+=("$name"); return 1
    fi
    echo "== $name ($((SECONDS))s in; ${left}s left): $*"
    # SIGINT first: a bench stops the servers it started on KeyboardInterrupt
    timeout -s INT -k 60 "$left" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then echo "== $name: exit status $rc" >&2; FAILED+=("$name"); fi
    return "$rc"
}

CACHE="${ESPO_CACHE_DIR:-$HOME/.cache/espo-server}"
MODELS="$CACHE/gpu-bench/qwen2-$POLICY-$CRITIC_SIZE-$DTYPE"
step models "$PY" -m bench.gpu_models --out "$MODELS" --policy-size "$POLICY" --critic-size "$CRITIC_SIZE" \
    --dtype "$DTYPE" || exit 1
cp "$MODELS/models.json" "$OUT/models.json"

PORT="$("$PY" -c 'from espo_server.process import free_port; print(free_port())')"
URL="http://127.0.0.1:$PORT"
echo "== espo-server on $URL (log $OUT/logs/espo-server.log)"
setsid "$PY" -m espo_server.cli serve --model "$MODELS/policy" --critic-model "$MODELS/critic" \
    --dtype "$DTYPE" --max-model-len "$MAX_LEN" --max-num-seqs "$SLOTS" --max-n 512 --verifier none \
    --gpu-memory-utilization 0.2 --critic-gpu-memory-utilization 0.1 --port "$PORT" \
    >"$OUT/logs/espo-server.log" 2>&1 &
SERVER=$!
SERVER_STATUS=
stop_server() {  # SIGTERM (it drains and stops its engines), SIGKILL to its group after 60 s
    [ -n "$SERVER_STATUS" ] && return
    kill -TERM "$SERVER" 2>/dev/null
    for _ in $(seq 120); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$SERVER" 2>/dev/null
    wait "$SERVER"
    SERVER_STATUS=$?
}
trap stop_server EXIT

server_ready() {  # until the server answers /readyz (fails if it exits first)
    step server-ready "$PY" -c 'import sys; from bench.harness import wait_ready
wait_ready(sys.argv[1], timeout=float("inf"), pid=int(sys.argv[2]))' "$URL" "$SERVER"
    local rc=$?
    [ "$rc" = 0 ] || tail -n 40 "$OUT/logs/espo-server.log" >&2
    return "$rc"
}

OVERHEAD_RUN=("$PY" -m bench.overhead --espo-url "$URL" --policy "$MODELS/policy" --critic "$MODELS/critic"
    --dtype "$DTYPE" --max-model-len "$MAX_LEN" --mem 0.2 --settle 0 "${OVERHEAD[@]}" --out "$OUT/overhead.json")
THROUGHPUT_RUN=("$PY" -m bench.throughput --url "$URL" "${THROUGHPUT[@]}" --out "$OUT/throughput.json")
CRITIC_RUN=("$PY" -m bench.critic_cost --url "$URL" --settle 0 "${CRITIC[@]}" --out "$OUT/critic_cost.json")
if [ "$SMOKE" = 0 ] || nvidia-smi -L >/dev/null 2>&1; then
    # On a GPU, one engine starts at a time (vLLM sizes each KV cache from the card's free memory
    # before and after its profile run, so engines starting side by side count each other's
    # allocations), and one bench runs at a time (what it measures is its own).
    server_ready || exit 1
    step overhead "${OVERHEAD_RUN[@]}"
    step throughput "${THROUGHPUT_RUN[@]}"
    step critic-cost "${CRITIC_RUN[@]}"
else
    # The CPU smoke run checks that every step works, not what it measures: the benches run side by
    # side (bench.overhead starts its engines while the server starts, and waits for it), each one's
    # output in logs/NAME.log, printed when all are done.
    declare -A RUNNING=()
    step overhead "${OVERHEAD_RUN[@]}" >"$OUT/logs/overhead.log" 2>&1 &
    RUNNING[overhead]=$!
    if server_ready; then
        step throughput "${THROUGHPUT_RUN[@]}" >"$OUT/logs/throughput.log" 2>&1 &
        RUNNING[throughput]=$!
        step critic-cost "${CRITIC_RUN[@]}" >"$OUT/logs/critic-cost.log" 2>&1 &
        RUNNING[critic-cost]=$!
    else
        FAILED+=(throughput critic-cost)
    fi
    for name in overhead throughput critic-cost; do
        [ -n "${RUNNING[$name]:-}" ] || continue
        wait "${RUNNING[$name]}" || FAILED+=("$name")
        cat "$OUT/logs/$name.log"
    done
fi

stop_server
trap - EXIT
echo "== espo-server stopped: exit status $SERVER_STATUS"
[ "$SERVER_STATUS" = 0 ] || FAILED+=(espo-server-exit)
echo
"$PY" -m bench.gpu_table "$OUT" || FAILED+=(table)
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu.sh: failed or not run: ${FAILED[*]}" >&2
    exit 1
fi
echo "gpu.sh: done in ${SECONDS}s; JSON and logs in $OUT"
