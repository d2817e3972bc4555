#!/usr/bin/env bash
# Run the example's tests against a PostgreSQL 15 server with pg_billing installed.
# Each test file creates its own database (CREATE EXTENSION pg_billing) and drops it.
#   PG_BILLING_TEST_DSN="host=127.0.0.1 port=28842 user=postgres" ./test.sh
# No network: run ./setup.sh once first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

: "${PG_BILLING_TEST_DSN:?set PG_BILLING_TEST_DSN, e.g. \"host=127.0.0.1 port=28842 user=postgres\"}"
if [ ! -f .setup-stamp ] || [ ! -d node_modules ]; then
  echo "test.sh: run ./setup.sh first (installs node_modules)" >&2
  exit 1
fi
export PG_BILLING_TEST_DSN
export PGB_NODE_RUN="r$$$(date +%s)"
# whatever a failed or killed test file left behind
trap 'node test/cleanup.js "$PGB_NODE_RUN" || true' EXIT

node --test --test-reporter=spec --test-timeout=60000 "$@" test/*.test.js
