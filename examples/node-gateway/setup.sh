#!/usr/bin/env bash
# Install the example's node modules, only when node_modules is missing or
# package-lock.json changed since the last install (stamp: .setup-stamp).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

command -v node >/dev/null || { echo "setup.sh: node (20+) is required" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || { echo "setup.sh: node 20+ is required (found $(node --version))" >&2; exit 1; }

want="$(sha256sum package-lock.json | cut -d' ' -f1) node$major"
if [ -d node_modules ] && [ -f .setup-stamp ] && [ "$(cat .setup-stamp)" = "$want" ]; then
  exit 0
fi
rm -f .setup-stamp
npm ci --no-audit --no-fund --loglevel=error
echo "$want" > .setup-stamp
