#!/usr/bin/env bash
# Aggregated workers behind the KV-cache-aware router: each request goes to the worker that holds
# most of its prompt's prefix, balanced against load (vLLM's KV events feed the router).
#   MODEL=Qwen/Qwen3-0.6B GPUS="0 1" ./scripts/launch/agg_router.sh
# WORKERS (default 2), ROUTER (default kv) and everything in common.sh come from the environment.
WORKERS=${WORKERS:-2} ROUTER=${ROUTER:-kv} exec "$(dirname "$0")/agg.sh"
