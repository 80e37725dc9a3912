#!/usr/bin/env bash
# The request path of two revisions side by side in one run: `serve agg --engine sim` (2 workers,
# KV router, zero-cost engines) of BEFORE (a git revision, checked out to a scratch worktree and
# run through PYTHONPATH with this checkout's venv) and of this checkout, alternating ROUNDS
# rounds at concurrency LEVELS, ISL 128 / OSL 16 streaming, a new connection per request and
# keep-alive. Every change to the request path is measured this way before it lands.
#
#   PEERS=/tmp/peers KIT=../shared/peers BEFORE=REV scripts/bench_path_ab.sh   # from the repo root
#
# KIT's loadgen.py and tiny model as in scripts/bench_overhead.sh. Results: one line per level on
# stdout, JSON lines in OUT (default $PEERS/path-ab.jsonl); compare numbers from one run only.
set -uo pipefail
: "${BEFORE:?set BEFORE to the git revision to compare with}"
PEERS=${PEERS:-/tmp/peers}; KIT=$(cd "${KIT:-../shared/peers}" && pwd); ROUNDS=${ROUNDS:-2}; N=${N:-600}
PROJECT=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
MODEL=$PEERS/model/tiny1.0; OUT=${OUT:-$PEERS/path-ab.jsonl}
LG=("$PEERS/dynamo-venv/bin/python" "$KIT/loadgen.py" --model tiny --tokenizer "$MODEL" --concurrency "${LEVELS:-32}"
    --requests "$N" --input-tokens 128 --output-tokens 16 --ignore-eos --out "$OUT")
OLD=$(mktemp -d /tmp/path-ab-XXXXXX)
git -C "$PROJECT" worktree add -q --detach "$OLD" "$BEFORE" || exit 1
# The worktree goes with the run; plugins come from each tree's own plugins/ folder.
trap 'git -C "$PROJECT" worktree remove --force "$OLD"' EXIT

wait_models() { for _ in $(seq 1 120); do curl -sf "$1/v1/models" | grep -q '"tiny"' && return 0; sleep 1; done; return 1; }

run_side() {  # $1 label, $2 source tree, $3 round
  local log=$PEERS/logs/path_ab_$1.log; mkdir -p "$PEERS/logs"
  PYTHONPATH="$2:$2/plugins" setsid "$PROJECT/.venv/bin/python" -m dynvllm serve agg --engine sim --workers 2 \
    --model "$MODEL" --served-model-name tiny --http-host 127.0.0.1 --http-port 8200 --block-size 32 --router kv \
    --sim-prefill-us-per-token 0 --sim-decode-ms-per-step 0 >"$log" 2>&1 &
  local pid=$!
  wait_models http://127.0.0.1:8200 || { echo "$1 did not come up"; tail -20 "$log"; kill -INT $pid; return 1; }
  sleep 2
  local fe; fe=$(pgrep -P $pid -f "dynvllm.child frontend" | head -1)
  "${LG[@]}" --url http://127.0.0.1:8200 --label "$1-newconn-r$3" --no-keepalive --cpu-pid serve=$pid ${fe:+--cpu-pid frontend=$fe}
  "${LG[@]}" --url http://127.0.0.1:8200 --label "$1-pooled-r$3" --cpu-pid serve=$pid ${fe:+--cpu-pid frontend=$fe}
  kill -INT $pid; for _ in $(seq 1 30); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -0 $pid 2>/dev/null && { echo "$1 still running after SIGINT; killing its group"; kill -KILL -- -$pid; }
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, before $(git -C "$OLD" rev-parse --short HEAD), after $(git -C "$PROJECT" rev-parse --short HEAD)"
for r in $(seq 1 "$ROUNDS"); do
  run_side before "$OLD" "$r"
  run_side after "$PROJECT" "$r"
done
