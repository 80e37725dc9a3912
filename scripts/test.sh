#!/usr/bin/env bash
# Runs the whole test suite (real vLLM, real nats-server, real HTTP) with the project's venv.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no .venv: run ./scripts/install.sh first" >&2; exit 2; }
# With no arguments the whole suite runs in DYN_TEST_PROCESSES processes (default 2; most of a
# test's time is engines starting and requests in flight, so two processes fill two cores), each
# taking whole modules (tests/conftest.py says which run together). Arguments (paths, -k, -n ...)
# replace the default selection and run in one process unless they say otherwise.
[ "$#" -gt 0 ] || set -- -n "${DYN_TEST_PROCESSES:-2}" --dist loadscope tests
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the suite is broken or the selection is empty" >&2
fi
exit "$rc"
