#!/usr/bin/env bash
# One-command set-up from a fresh clone: .venv, the project and its test dependencies, Toxiproxy (built from
# ops/toxiproxy into .din/bin), the nats CLI (into .din/bin), promtool (Debian's prometheus package), Kafka's jars
# (from Maven Central) and the model zoo. Idempotent: a second run only checks.
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

# Toxiproxy gives `din up` real WAN links: ops/toxiproxy is its server (the Go module github.com/Shopify/toxiproxy/v2,
# pinned in ops/toxiproxy/go.mod; keep in step with TOXIPROXY_VERSION in din/stack/wan.py) with DIN's loss toxic.
# The marker names the release and a hash of the module's sources, so a changed toxic is rebuilt.
TOXIPROXY_VERSION=v2.12.0
toxiproxy=.din/bin/toxiproxy-server
toxiproxy_src=$(cd ops/toxiproxy && cat go.mod go.sum $(ls *.go | grep -v _test.go) | sha256sum | cut -c1-12)
toxiproxy_build="$TOXIPROXY_VERSION+din-loss.$toxiproxy_src"
if [ -x "$toxiproxy" ] && [ "$(cat "$toxiproxy.version" 2>/dev/null || true)" = "$toxiproxy_build" ]; then
  say "toxiproxy-server $toxiproxy_build present"
else
  command -v go >/dev/null || fail "go not found: install Go 1.23 or newer (apt-get install golang-go) to build Toxiproxy"
  say "building toxiproxy-server $toxiproxy_build (ops/toxiproxy) with go build"
  mkdir -p .din/bin
  (cd ops/toxiproxy && go build -trimpath -o "../../$toxiproxy.new" \
      -ldflags "-X github.com/Shopify/toxiproxy/v2.Version=$toxiproxy_build" .) \
    || { rm -f "$toxiproxy.new"; fail "building Toxiproxy $TOXIPROXY_VERSION failed (see above): check access to the Go module proxy"; }
  mv "$toxiproxy.new" "$toxiproxy"
  echo "$toxiproxy_build" > "$toxiproxy.version"
fi

# The nats CLI (the Go module github.com/nats-io/natscli/nats) for operators and the tests that use it as a third
# party would: `nats micro ls`, `nats server report` (README, "Looking at the bus"). Keep in step with NATS_CLI_VERSION in
# din/commands/nats_env.py.
NATS_CLI_VERSION=v0.5.0
nats_cli=.din/bin/nats
if [ -x "$nats_cli" ] && [ "$(cat "$nats_cli.version" 2>/dev/null || true)" = "$NATS_CLI_VERSION" ]; then
  say "nats CLI $NATS_CLI_VERSION present"
else
  command -v go >/dev/null || fail "go not found: install Go 1.23 or newer (apt-get install golang-go) to build the nats CLI"
  say "building the nats CLI $NATS_CLI_VERSION with go install"
  mkdir -p .din/bin
  GOBIN="$PWD/.din/bin" go install "github.com/nats-io/natscli/nats@$NATS_CLI_VERSION" \
    || fail "building the nats CLI $NATS_CLI_VERSION failed (see above): check access to the Go module proxy"
  echo "$NATS_CLI_VERSION" > "$nats_cli.version"
fi

# Debian's prometheus package ships promtool and prometheus, with which the tests check DIN's metrics, rules and
# dashboard (they are skipped without them). Installed only as root where apt-get is; a failure is a warning.
if command -v promtool >/dev/null; then
  say "promtool $(promtool --version 2>&1 | head -1 | cut -d' ' -f3) present"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  say "installing Debian's prometheus package (promtool, prometheus) with apt-get"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }; then
    say "warning: installing prometheus failed (see above): the Prometheus tests will be skipped"
  fi
else
  say "warning: promtool not found (apt-get install prometheus as root): the Prometheus tests will be skipped"
fi

.venv/bin/din setup
say "done"
