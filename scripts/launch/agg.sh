#!/usr/bin/env bash
# Aggregated serving from separate processes: NATS, `dynvllm frontend`, and WORKERS aggregated
# workers (`dynvllm serve agg --no-frontend`), each joining through NATS as on separate hosts.
#   MODEL=Qwen/Qwen3-0.6B ./scripts/launch/agg.sh
# WORKERS (default 1) and everything in common.sh are read from the environment.
WORKERS=${WORKERS:-1}
ROUTER=${ROUTER:-round-robin}
source "$(dirname "$0")/common.sh"

start_nats
start_frontend
for ((i = 0; i < WORKERS; i++)); do start_worker "agg-$i" agg; done
wait_ready "$WORKERS"
serve_until_stopped
