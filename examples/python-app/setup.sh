#!/usr/bin/env bash
# Creates .venv and installs requirements.txt into it, only when the venv is
# missing or was built from another requirements.txt (or another python3).
# Idempotent; on a warm machine it returns at once without touching the network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

venv=.venv
stamp=.requirements.stamp
want=$({ cat requirements.txt; python3 -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c '' 2>/dev/null \
   && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

rm -f "$stamp"
if ! "$venv/bin/python" -c '' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --disable-pip-version-check --quiet -r requirements.txt
echo "$want" > "$stamp"
echo "setup.sh: $venv ready"
