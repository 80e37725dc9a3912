#!/usr/bin/env bash
# Runs the whole test suite (real vLLM, real nats-server, real HTTP) with the project's venv.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no .venv: run ./scripts/install.sh first" >&2; exit 2; }
# With no arguments the whole suite runs; arguments (paths, -k ...) replace the default selection.
[ "$#" -gt 0 ] || set -- tests
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the suite is broken or the selection is empty" >&2
fi
exit "$rc"
