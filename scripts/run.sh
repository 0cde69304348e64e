#!/usr/bin/env bash
# The main job on the embedded default. Until the CPU toy RL run lands, this prints the method
# registry on the paper's 1.5B shape and builds every method on the tiny default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
mkdir -p outputs
perl methods --model deepseek-r1-distill-qwen-1.5b --output outputs/methods_1.5b.json
perl methods --model tiny-qwen2 --rank 8 --alpha 16
