#!/usr/bin/env bash
# Run the worker's tests against a PostgreSQL 15 with pg_billing installed.
#   PG_BILLING_TEST_DSN="host=127.0.0.1 port=28843 user=postgres" ./test.sh
# The role must be able to CREATE DATABASE and CREATE EXTENSION: each test makes its own
# database and drops it. Debug profile: on 2 cores a cold build is ~35 s against ~105 s for
# --release, and the tests' run time (~9 s, mostly leases and waits) does not depend on it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
: "${PG_BILLING_TEST_DSN:?set PG_BILLING_TEST_DSN, e.g. host=127.0.0.1 port=28843 user=postgres}"
export PG_BILLING_TEST_DSN
export CARGO_TARGET_DIR="$PWD/target"
cargo test --locked --offline "$@"
