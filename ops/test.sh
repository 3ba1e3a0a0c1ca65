#!/usr/bin/env bash
# Set up (idempotent), lint, then run the whole test suite; arguments go to pytest.
# Exits non-zero on any failure, including when no test was collected.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash ops/setup.sh

# The linter first (configuration in pyproject.toml): a finding fails the test command before any test runs.
.venv/bin/ruff check services shared din tests bench zoo ops setup.py

# The loss toxic's Go tests: offline, from the module cache set-up filled (a few seconds).
(cd ops/toxiproxy && GOPROXY=off GOFLAGS=-mod=readonly go test -count=1 ./)

set +e
.venv/bin/python -m pytest -q --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: error: pytest collected no tests, which counts as a failure" >&2
  exit 1
fi
exit "$rc"
