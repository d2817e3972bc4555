#!/usr/bin/env bash
# Download the crates Cargo.lock pins, once; afterwards test.sh builds offline.
# Idempotent, and quick when they are already in ~/.cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
cargo fetch --locked
