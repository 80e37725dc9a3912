#!/usr/bin/env bash
# The worker process's CPU per generated token, two revisions side by side in one run: `serve agg`
# on a tiny real vLLM model (built here, `--enforce-eager`, one HTTP process) of BEFORE (a git
# revision, checked out to a scratch worktree and run through PYTHONPATH with this checkout's venv)
# and of this checkout, alternating ROUNDS rounds; each round streams N requests of ISL/OSL
# 128/256 at concurrency C and reads the worker's CPU over the level (scripts/gpu/loadgen.py).
# The worker runs vLLM's output processing and the streams to the frontends, one process per
# engine: at high concurrency on a GPU it is the busiest process (docs/benchmarks.md).
#
#   BEFORE=REV scripts/bench_worker_cpu.sh          # from the repo root; ROUNDS=3 C=128 N=2048
#
# Prints us of worker CPU per output token per run and the after/before ratio of the medians;
# JSON lines in OUT (default /tmp/worker-cpu.jsonl). Compare numbers from one run only.
set -uo pipefail
: "${BEFORE:?set BEFORE to the git revision to compare with}"
PROJECT=$(git rev-parse --show-toplevel); PY=$PROJECT/.venv/bin/python; ROUNDS=${ROUNDS:-3}
OUT=${OUT:-/tmp/worker-cpu.jsonl}; SCRATCH=$(mktemp -d /tmp/worker-cpu-XXXXXX); OLD=$SCRATCH/before
git -C "$PROJECT" worktree add -q --detach "$OLD" "$BEFORE" || exit 1
cleanup() { pkill -INT -f "[-]-namespace wcpu-$$-" 2>/dev/null; sleep 3; pkill -KILL -f "[-]-namespace wcpu-$$-" 2>/dev/null
  git -C "$PROJECT" worktree remove --force "$OLD"; rm -rf "$SCRATCH"; }
trap cleanup EXIT; trap 'exit 143' TERM INT
"$PY" -m dynvllm model tiny "$SCRATCH/model" > /dev/null || exit 1
PORT=$(cd "$PROJECT/scripts" && "$PY" -c "import benchkit; print(benchkit.free_port())")
rm -f "$OUT"

run_side() {  # $1 label, $2 source tree, $3 round
  local ns=wcpu-$$-$1-$3 serve worker
  PYTHONPATH="$2:$2/plugins" setsid "$PY" -m dynvllm serve agg --model "$SCRATCH/model" --served-model-name m \
    --http-host 127.0.0.1 --http-port "$PORT" --http-workers 1 --metrics-port 0 --enforce-eager \
    --kv-cache-memory-bytes 1000000000 --namespace "$ns" > "$SCRATCH/$ns.log" 2>&1 &
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/v1/models" | grep -q '"m"' && break; sleep 1; done
  serve=$(pgrep -f -- "--namespace $ns" | head -1); worker=$(pgrep -P "$serve" -f "dynvllm.child worker" | head -1)
  [ -n "$worker" ] || { echo "$1 did not come up"; tail -20 "$SCRATCH/$ns.log"; return 1; }
  "$PY" "$PROJECT/scripts/gpu/loadgen.py" --url "http://127.0.0.1:$PORT" --model m --tokenizer "$SCRATCH/model" \
    --input-tokens 128 --output-tokens 256 --ignore-eos --concurrency "${C:-128}" --requests "${N:-2048}" \
    --cpu-pid "worker=$worker" --label "$1-r$3" --out "$OUT" > /dev/null
  kill -INT "$serve"; for _ in $(seq 30); do kill -0 "$serve" 2>/dev/null || break; sleep 1; done
  pkill -KILL -f -- "--namespace $ns" 2>/dev/null; true
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, before $(git -C "$OLD" rev-parse --short HEAD), after $(git -C "$PROJECT" rev-parse --short HEAD) + working tree"
for r in $(seq "$ROUNDS"); do run_side before "$OLD" "$r"; run_side after "$PROJECT" "$r"; done
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
per = {"before": [], "after": []}
for r in rows:
    us = r["cpu"]["worker"]["cpu_pct"] / 100 / r["out_tok_per_s"] * 1e6
    per[r["label"].split("-")[0]].append(us)
    print(f"{r['label']:10} {r['out_tok_per_s']:9.0f} tok/s  worker {r['cpu']['worker']['cpu_pct']:5.1f}%  {us:6.2f} us/token")
if per["before"] and per["after"]:
    b, a = statistics.median(per["before"]), statistics.median(per["after"])
    print(f"median us/token: before {b:.2f}, after {a:.2f}, after/before {a / b:.3f}")
PY
