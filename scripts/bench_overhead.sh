#!/usr/bin/env bash
# Frontend + router overhead side by side in one run: dynvllm with 1 and 2 frontend processes
# (--http-workers) and NVIDIA Dynamo 1.6.1's Rust frontend + KV router, all in front of zero-cost
# simulated engines (dynvllm's sim engine, Dynamo's mocker), 2 workers each. ISL 128, OSL 16,
# streaming, c = 1, 8, 32, a new connection per request and keep-alive, ROUNDS alternating rounds.
#
#   PEERS=/tmp/peers KIT=../shared/peers scripts/bench_overhead.sh     # from the repository root
#
# KIT is the reference kit (dynamo_mocker.sh, loadgen.py, mkmodel.py; its README says how to
# install Dynamo and build the tiny model into $PEERS/model/tiny1.0). Results: one line per level
# on stdout and JSON lines in $PEERS/overhead.jsonl; compare numbers from one run only.
set -uo pipefail
PEERS=${PEERS:-/tmp/peers}; KIT=$(cd "${KIT:-../shared/peers}" && pwd); ROUNDS=${ROUNDS:-2}; N=${N:-300}
PROJECT=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
MODEL=$PEERS/model/tiny1.0; OUT=${OUT:-$PEERS/overhead.jsonl}; HTTP_WORKERS=${HTTP_WORKERS:-"1 2"}
LG=("$PEERS/dynamo-venv/bin/python" "$KIT/loadgen.py" --model tiny --tokenizer "$MODEL" --concurrency "${LEVELS:-1,8,32}"
    --requests "$N" --input-tokens 128 --output-tokens 16 --ignore-eos --out "$OUT")

wait_models() { for _ in $(seq 1 120); do curl -sf "$1/v1/models" | grep -q '"tiny"' && return 0; sleep 1; done; return 1; }

run_dynvllm() {  # $1 round, $2 frontend processes
  local log=$PEERS/logs/dynvllm_sim_$2.log; mkdir -p "$PEERS/logs"
  setsid "$PROJECT/.venv/bin/dynvllm" serve agg --engine sim --workers 2 --model "$MODEL" --served-model-name tiny \
    --http-host 127.0.0.1 --http-port 8200 --block-size 32 --router kv --http-workers "$2" \
    --sim-prefill-us-per-token 0 --sim-decode-ms-per-step 0 >"$log" 2>&1 &
  local pid=$!
  wait_models http://127.0.0.1:8200 || { echo "dynvllm did not come up"; tail -20 "$log"; kill -INT $pid; return 1; }
  sleep 2  # every frontend process accepting
  local fe; fe=$(pgrep -P $pid -f "dynvllm.child frontend" | head -1)
  "${LG[@]}" --url http://127.0.0.1:8200 --label "dynvllm-fe$2-newconn-r$1" --no-keepalive --cpu-pid serve=$pid ${fe:+--cpu-pid frontend=$fe}
  "${LG[@]}" --url http://127.0.0.1:8200 --label "dynvllm-fe$2-pooled-r$1" --cpu-pid serve=$pid ${fe:+--cpu-pid frontend=$fe}
  kill -INT $pid; for _ in $(seq 1 30); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -0 $pid 2>/dev/null && { echo "dynvllm still running after SIGINT; killing its group"; kill -KILL -- -$pid; }
}

run_dynamo() {
  SPEEDUP=1000000 DYN_PORT=8000 "$KIT/dynamo_mocker.sh" start >/dev/null || { echo "dynamo did not start"; return 1; }
  local fe mo; fe=$(cat "$PEERS/run/dyn_frontend.pid"); mo=$(cat "$PEERS/run/dyn_mocker.pid")
  local x='{"nvext":{"annotations":["output_replay_id:osl16"]}}'
  "${LG[@]}" --url http://127.0.0.1:8000 --label "dynamo-newconn-r$1" --no-keepalive --extra-json "$x" --cpu-pid frontend=$fe --cpu-pid mocker=$mo
  "${LG[@]}" --url http://127.0.0.1:8000 --label "dynamo-pooled-r$1" --extra-json "$x" --cpu-pid frontend=$fe --cpu-pid mocker=$mo
  "$KIT/dynamo_mocker.sh" stop >/dev/null
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, $(git -C "$PROJECT" rev-parse --short HEAD)"
for r in $(seq 1 "$ROUNDS"); do
  for n in $HTTP_WORKERS; do run_dynvllm "$r" "$n"; done
  [ -n "${NO_DYNAMO:-}" ] || run_dynamo "$r"
done
