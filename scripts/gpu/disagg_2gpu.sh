#!/usr/bin/env bash
# disagg_2gpu.sh -- device side on a 2-GPU host, after assemble.sh + env.sh, /tmp/m built and
# NIXL installed: the launch scripts' topologies with one engine per GPU, side by side
# (on one GPU: GPUS="0 0" MEM=0.40 ONE_BY_ONE=1, both engines share it, each with 40% of its memory)
#   agg2:   two aggregated workers (GPU 0, GPU 1) behind the KV router   (scripts/launch/agg.sh)
#   disagg: prefill on GPU 0, decode on GPU 1, KV over NIXL              (scripts/launch/disagg.sh)
#   push:   the same with `--connector nixl-push`: prefill WRITEs into decode's blocks (cuda_ipc
#           serves remote writes at device speed where reads fall back to TCP: one GPU, no NVLink)
# Each: greedy texts of 8 prompts, then loadgen at two shapes (ISL/OSL 1000/200 c=16 and
# 3000/100 c=8, 64 requests each); disagg and push also read NIXL's transfer counters (kv_probe.py:
# pull counts on the decode worker, push on the prefill worker).
# JSON lines in $OUT/disagg_2gpu.jsonl, texts in $OUT/texts_CASE.json, logs in $OUT/CASE/.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd); OUT=${OUT:-/tmp}; CASES=${CASES:-"agg2 disagg"}
export PATH=/tmp/site/bin:$PATH MODEL=/tmp/m SERVED_NAME=m HTTP_HOST=127.0.0.1 HTTP_PORT=8300 GPUS=${GPUS:-"0 1"} ROUTER=kv
export ENGINE_ARGS="--max-model-len 4096 --gpu-memory-utilization ${MEM:-0.80} ${EXTRA:-}" READY_TIMEOUT=600 ONE_BY_ONE=${ONE_BY_ONE:-0}
# The launch runs in a session of its own: stop it here when this script is stopped (a `timeout`
# around it once left both engines holding 80% of the GPU for the next script).
pid=
stop_launch() { [ -n "$pid" ] || return 0; kill -TERM $pid 2>/dev/null
  for i in $(seq 90); do kill -0 $pid 2>/dev/null || break; sleep 1; done; kill -KILL -- -$pid 2>/dev/null; pid=; }
trap stop_launch EXIT; trap 'exit 143' TERM INT
for c in $CASES; do
  export NAMESPACE=$c LOG_DIR=$OUT/$c NATS_PORT=$((14000 + RANDOM % 1000))
  case $c in
    agg2) WORKERS=2 setsid bash "$REPO/scripts/launch/agg.sh" > $OUT/launch_$c.txt 2>&1 & ;;
    disagg|push) [ $c = push ] && conn=nixl-push || conn=nixl
      CONNECTOR=$conn FRONTEND_ARGS="--disagg-min-prompt-tokens 256" PREFILL_WORKERS=1 DECODE_WORKERS=1 \
        setsid bash "$REPO/scripts/launch/disagg.sh" > $OUT/launch_$c.txt 2>&1 & ;;
  esac
  pid=$!; t0=$(date +%s)
  for i in $(seq 600); do grep -q "^ready:\|exited" $OUT/launch_$c.txt && break; sleep 1; done
  if ! grep -q "^ready:" $OUT/launch_$c.txt; then echo "[$c] not ready"; grep -h -E "Error|rror:|Exception" $LOG_DIR/*.log | grep -v "^ *File" | head -20 | cut -c1-300; stop_launch; continue; fi
  echo "[$c] ready after $(( $(date +%s) - t0 )) s"
  python3 - "$c" "$OUT" <<'PY'
import json, sys, urllib.request
c, out = sys.argv[1], sys.argv[2]
words = "alpha beta gamma delta river mountain city road tree house cat dog bird fish".split()
import random
rngs = [random.Random(i) for i in range(8)]  # distinct from the first word: no shared prefix
prompts = [" ".join(r.choice(words) for _ in range(300 + 40 * i)) for i, r in enumerate(rngs)]
texts = []
for p in prompts:
    body = json.dumps({"model": "m", "prompt": p, "max_tokens": 64, "temperature": 0}).encode()
    req = urllib.request.Request("http://127.0.0.1:8300/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        texts.append([json.load(r)["choices"][0]["text"], r.headers.get("x-dynvllm-prefill")])
json.dump(texts, open(f"{out}/texts_{c}.json", "w"))
print(f"[{c}] greedy: {len(texts)} texts, prefill outcomes {sorted(set(str(t[1]) for t in texts))}")
PY
  [ "$c" != agg2 ] && python3 "$HERE/kv_probe.py" nats://127.0.0.1:$NATS_PORT $NAMESPACE /tmp/m > /tmp/kv_before.json
  python3 "$HERE/loadgen.py" --url http://127.0.0.1:8300 --model m --tokenizer /tmp/m --concurrency 16 --requests 64 \
    --input-tokens 1000 --output-tokens 200 --ignore-eos --label "$c-1000-200" --out $OUT/disagg_2gpu.jsonl | tail -3
  python3 "$HERE/loadgen.py" --url http://127.0.0.1:8300 --model m --tokenizer /tmp/m --concurrency 8 --requests 64 \
    --input-tokens 3000 --output-tokens 100 --ignore-eos --label "$c-3000-100" --out $OUT/disagg_2gpu.jsonl | tail -3
  [ "$c" != agg2 ] && python3 "$HERE/kv_probe.py" nats://127.0.0.1:$NATS_PORT $NAMESPACE /tmp/m /tmp/kv_before.json
  stop_launch
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
try:
    a = json.load(open(f"{out}/texts_agg2.json"))
except FileNotFoundError:
    a = None
for c in ("disagg", "push"):
    try:
        d = json.load(open(f"{out}/texts_{c}.json"))
    except FileNotFoundError:
        continue
    if a:
        print(f"greedy {c} == agg: {sum(x[0] == y[0] for x, y in zip(a, d))}/{len(a)}")
PY
