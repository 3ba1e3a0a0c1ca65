#!/usr/bin/env bash
# One-command set-up from a fresh clone: .venv, the project and its test dependencies, Toxiproxy (built with
# go install into .din/bin), Kafka's jars (from Maven Central) and the model zoo. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "setup: $*"; }
fail() { echo "setup: error: $*" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found: apt-get install python3 python3-venv"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "DIN needs Python 3.11 or newer, $PYTHON is $("$PYTHON" -V 2>&1): set PYTHON=/path/to/python3.11"
command -v java >/dev/null || fail "java not found: apt-get install openjdk-17-jre-headless"
command -v mvn >/dev/null || [ -f .din/kafka/libs/.complete ] || fail "mvn not found: apt-get install maven"

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv || { rm -rf .venv; fail "'$PYTHON -m venv' failed: apt-get install python3-venv"; }
fi

# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.din-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || [ ! -x .venv/bin/din ]; then
  say "installing the project with its test dependencies into .venv (pip install -e .[test])"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
else
  say "python dependencies up to date"
fi

# Toxiproxy gives `din up` real WAN links. Pinned; keep in step with TOXIPROXY_VERSION in din/stack/wan.py.
# From v2.6 the module's server command lives at cmd/server, so the binary is renamed after go install.
TOXIPROXY_VERSION=v2.12.0
toxiproxy=.din/bin/toxiproxy-server
if [ -x "$toxiproxy" ] && [ "$(cat "$toxiproxy.version" 2>/dev/null || true)" = "$TOXIPROXY_VERSION" ]; then
  say "toxiproxy-server $TOXIPROXY_VERSION present"
else
  command -v go >/dev/null || fail "go not found: install Go 1.22 or newer (apt-get install golang-go) to build Toxiproxy"
  say "building toxiproxy-server $TOXIPROXY_VERSION with go install"
  mkdir -p .din/bin
  gobin=$(mktemp -d)
  GOBIN="$gobin" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION" \
    || { rm -rf "$gobin"; fail "go install of Toxiproxy $TOXIPROXY_VERSION failed (see above): check access to the Go module proxy"; }
  mv "$gobin/server" "$toxiproxy"
  rm -rf "$gobin"
  echo "$TOXIPROXY_VERSION" > "$toxiproxy.version"
fi

.venv/bin/din setup
say "done"
