#!/usr/bin/env bash
# Set up (idempotent), lint, then run the whole test suite; arguments go to pytest.
# Exits non-zero on any failure, including when no test was collected.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash ops/setup.sh

# The linter first (configuration in pyproject.toml): a finding fails the test command before any test runs.
lint_paths=(
  tests/support.py tests/conftest.py
  tests/integration/network.py tests/integration/fake_service.py tests/integration/test_brokers.py
  tests/integration/test_cascade.py tests/integration/test_distributed_mode.py
  tests/integration/test_inference_path.py tests/integration/test_launcher.py tests/integration/test_multistage.py
  tests/unit/test_classifier.py tests/unit/test_compose.py tests/unit/test_naming.py tests/unit/test_stack_plan.py
  tests/unit/test_topology.py
)
.venv/bin/ruff check "${lint_paths[@]}"

set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: error: pytest collected no tests, which counts as a failure" >&2
  exit 1
fi
exit "$rc"
