#!/usr/bin/env bash
# Create (or reuse) ./.venv with the CPU stack: torch 2.13.0 CPU first, then PeRL and its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip -q still prints one warning per unreadable local index entry on some machines; drop those.
quiet_pip() { pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }; }
quiet_pip torch==2.13.0
quiet_pip -c constraints/cpu.txt -e ".[test]"
