#!/usr/bin/env bash
# Set up (idempotent), then run the demo; arguments go to `din demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash ops/setup.sh
exec .venv/bin/din demo "$@"
