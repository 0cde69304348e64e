#!/usr/bin/env bash
# The main job on the embedded default: the CPU toy run. A tiny Qwen2 is warm-started on 2-digit
# addition in the paper's format (cached after the first run), then trained with DAPO and LoRA in
# the single-machine engine: rollouts, math reward, verl's GRPO advantages and clipped policy loss,
# merged sync into the rollout model, held-out Avg@4 before and after.
# Extra arguments are config overrides, e.g.: bash scripts/run.sh method.name=dora rl.steps=60
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
perl train --config examples/toy.yaml "$@"
