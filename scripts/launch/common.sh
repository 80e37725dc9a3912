# Sourced by the launch scripts: settings from the environment, starting each role as its own
# process (as an operator would on separate hosts), readiness, and stopping everything on Ctrl-C.
#
# Environment (all optional except where a script says otherwise):
#   MODEL            Hugging Face id or local folder            (default: Qwen/Qwen3-0.6B)
#   SERVED_NAME      name clients use                           (default: MODEL)
#   HTTP_HOST        frontend address                           (default: 0.0.0.0)
#   HTTP_PORT        frontend port                              (default: 8000)
#   NATS_URL         an existing NATS server; when empty one is started here
#   NATS_PORT        port of the NATS server started here       (default: 4222)
#   NAMESPACE        isolates this service on a shared NATS     (default: dynvllm)
#   ROUTER           kv | kv-approx | least-loaded | round-robin | random   (default: kv)
#   ENGINE_ARGS      more vLLM engine arguments for every worker, e.g. "--max-model-len 8192"
#   FRONTEND_ARGS    more `dynvllm frontend` options
#   WORKER_ARGS      more `dynvllm serve <role>` options for every worker
#   GPUS             device ids handed out to workers in start order, e.g. "0 1 2 3"
#   GPUS_PER_WORKER  ids each worker takes from GPUS            (default: 1)
#   LOG_DIR          where each process writes its log          (default: a new temporary folder)
#   READY_TIMEOUT    seconds to wait for every worker           (default: 1800)
#   ONE_BY_ONE       1: start each worker once the previous one has registered, for engines that
#                    share a GPU (vLLM sizes its KV cache from the memory free while it profiles)
#   STOP_TIMEOUT     seconds each process gets to drain on stop (default: 60)
#   DYNVLLM, NATS_SERVER   the commands to run (default: found on PATH or beside this checkout)

set -uo pipefail
set -m

_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_repo=$(cd "$_here/../.." && pwd)

_find() { # command name -> path: PATH first, then this checkout's .venv
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"
  elif [ -x "$_repo/.venv/bin/$1" ]; then echo "$_repo/.venv/bin/$1"
  else echo "launch: $1 not found on PATH or in $_repo/.venv/bin (run ./scripts/install.sh)" >&2; exit 2
  fi
}

MODEL=${MODEL:-Qwen/Qwen3-0.6B}
SERVED_NAME=${SERVED_NAME:-$MODEL}
HTTP_HOST=${HTTP_HOST:-0.0.0.0}
HTTP_PORT=${HTTP_PORT:-8000}
NATS_URL=${NATS_URL:-}
NATS_PORT=${NATS_PORT:-4222}
NAMESPACE=${NAMESPACE:-dynvllm}
ROUTER=${ROUTER:-kv}
ENGINE_ARGS=${ENGINE_ARGS:-}
FRONTEND_ARGS=${FRONTEND_ARGS:-}
WORKER_ARGS=${WORKER_ARGS:-}
GPUS=${GPUS:-}
GPUS_PER_WORKER=${GPUS_PER_WORKER:-1}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t dynvllm-launch.XXXXXX)}
READY_TIMEOUT=${READY_TIMEOUT:-1800}
ONE_BY_ONE=${ONE_BY_ONE:-0}
STOP_TIMEOUT=${STOP_TIMEOUT:-60}
DYNVLLM=${DYNVLLM:-$(_find dynvllm)} || exit 2
NATS_SERVER=${NATS_SERVER:-$(_find nats-server)} || exit 2
# The venv's python reads /health; it is the interpreter dynvllm itself runs on.
_PY=$(head -1 "$DYNVLLM" | sed -n 's/^#!//p')
[ -x "${_PY%% *}" ] || _PY=python3
mkdir -p "$LOG_DIR"

_pids=()
_names=()
_workers=0
_stopping=0
_gpu_next=0
_ids=($GPUS)

_next_gpus() { # sets GPU_ENV to CUDA_VISIBLE_DEVICES=... for the next worker (empty without GPUS)
  GPU_ENV=
  [ "${#_ids[@]}" -gt 0 ] || return 0
  if [ $((_gpu_next + GPUS_PER_WORKER)) -gt "${#_ids[@]}" ]; then
    echo "launch: GPUS=\"$GPUS\" has too few devices for the workers asked for" >&2
    return 1
  fi
  local take=("${_ids[@]:_gpu_next:GPUS_PER_WORKER}")
  _gpu_next=$((_gpu_next + GPUS_PER_WORKER))
  local IFS=,
  GPU_ENV="CUDA_VISIBLE_DEVICES=${take[*]}"
}

# start NAME [VAR=value ...] -- COMMAND ARGS...: one process in its own process group (job
# control, `set -m`), so Ctrl-C in the terminal reaches only this script, which stops the
# processes in order; logs go to LOG_DIR.
start() {
  local name=$1
  shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" "$@" >"$LOG_DIR/$name.log" 2>&1 </dev/null &
  _pids+=($!)
  _names+=("$name")
  echo "started $name (pid $!, log $LOG_DIR/$name.log)"
}

start_nats() { # sets NATS_URL; starts a JetStream-enabled nats-server unless NATS_URL is given
  if [ -n "$NATS_URL" ]; then echo "using NATS at $NATS_URL"; return; fi
  start nats -- "$NATS_SERVER" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$LOG_DIR/jetstream"
  NATS_URL="nats://127.0.0.1:$NATS_PORT"
}

start_frontend() {
  start frontend -- "$DYNVLLM" frontend --nats-url "$NATS_URL" --namespace "$NAMESPACE" \
    --http-host "$HTTP_HOST" --http-port "$HTTP_PORT" --router "$ROUTER" $FRONTEND_ARGS
}

# start_worker NAME ROLE [more serve options]
start_worker() {
  local name=$1 role=$2
  shift 2
  _next_gpus || stop_all 2
  local extra=()
  [ "$role" = agg ] && extra=(--no-frontend)
  start "$name" $GPU_ENV -- "$DYNVLLM" serve "$role" "${extra[@]}" --nats-url "$NATS_URL" \
    --namespace "$NAMESPACE" --model "$MODEL" --served-model-name "$SERVED_NAME" "$@" $WORKER_ARGS $ENGINE_ARGS
  _workers=$((_workers + 1))
  # registered is enough here: a prefill worker alone does not make the service healthy
  [ "$ONE_BY_ONE" = 1 ] && wait_ready $_workers registered
  return 0
}

_report_dead() { # prints each started process that has exited, with its log's tail
  local i dead=1
  for i in "${!_pids[@]}"; do
    if ! kill -0 "${_pids[$i]}" 2>/dev/null; then
      dead=0
      echo "launch: ${_names[$i]} exited; last lines of $LOG_DIR/${_names[$i]}.log:" >&2
      tail -n 20 "$LOG_DIR/${_names[$i]}.log" >&2
    fi
  done
  return $dead
}

# stop_all [CODE]: SIGTERM to everything but NATS (workers drain), then NATS; stragglers' process
# groups get SIGKILL after STOP_TIMEOUT so nothing is left behind, engine processes included.
stop_all() {
  local code=${1:-0} i t
  [ "$_stopping" = 1 ] && return
  _stopping=1
  trap '' INT TERM
  echo "stopping (logs in $LOG_DIR)"
  for i in "${!_pids[@]}"; do
    [ "${_names[$i]}" = nats ] || kill -TERM "${_pids[$i]}" 2>/dev/null
  done
  for i in "${!_pids[@]}"; do
    [ "${_names[$i]}" = nats ] && continue
    for ((t = 0; t < STOP_TIMEOUT * 10; t++)); do kill -0 "${_pids[$i]}" 2>/dev/null || break; sleep 0.1; done
  done
  for i in "${!_pids[@]}"; do
    [ "${_names[$i]}" = nats ] && kill -TERM "${_pids[$i]}" 2>/dev/null
  done
  sleep 0.2
  for i in "${!_pids[@]}"; do kill -KILL -- "-${_pids[$i]}" 2>/dev/null; done
  wait 2>/dev/null
  exit "$code"
}

trap 'stop_all 130' INT
trap 'stop_all 143' TERM

# wait_ready WORKERS [registered]: until /health counts WORKERS registered workers and says healthy
# (with `registered`: whatever it says); fails if a process exits.
wait_ready() {
  local want=$1 need=${2:-healthy} deadline=$((SECONDS + READY_TIMEOUT)) host=$HTTP_HOST
  [ "$host" = 0.0.0.0 ] && host=127.0.0.1
  HEALTH_URL="http://$host:$HTTP_PORT/health"
  echo "waiting for $want worker(s) at $HEALTH_URL (up to ${READY_TIMEOUT}s)"
  while [ $SECONDS -lt $deadline ]; do
    if _report_dead; then stop_all 1; fi
    if "$_PY" - "$HEALTH_URL" "$want" "$need" <<'EOF' 2>/dev/null; then
import json, sys, urllib.error, urllib.request
try:
    body = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
except urllib.error.HTTPError as e:  # 503 while unhealthy still counts the workers
    body = json.load(e)
healthy = body["status"] == "healthy" or sys.argv[3] == "registered"
sys.exit(0 if healthy and body["workers"] >= int(sys.argv[2]) else 1)
EOF
      return 0
    fi
    sleep 1
  done
  echo "launch: not ready after ${READY_TIMEOUT}s" >&2
  stop_all 1
}

# serve_until_stopped: prints where to connect, then waits; a process that exits stops the rest.
serve_until_stopped() {
  local host=$HTTP_HOST
  [ "$host" = 0.0.0.0 ] && host=$(hostname -I 2>/dev/null | awk '{print $1}')
  echo "ready: http://${host:-127.0.0.1}:$HTTP_PORT/v1  model \"$SERVED_NAME\"  NATS $NATS_URL  namespace $NAMESPACE"
  echo "try:   curl -s http://${host:-127.0.0.1}:$HTTP_PORT/v1/chat/completions -H 'content-type: application/json' -d '{\"model\": \"$SERVED_NAME\", \"messages\": [{\"role\": \"user\", \"content\": \"hello\"}], \"max_tokens\": 32}'"
  echo "Ctrl-C stops everything"
  while :; do
    wait -n 2>/dev/null
    [ "$_stopping" = 1 ] && return
    if _report_dead; then stop_all 1; fi
  done
}
