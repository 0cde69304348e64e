#!/usr/bin/env bash
# The main job on the embedded default: verl's trainer on a CPU, the same RL loop as a GPU node.
# A tiny Llama is warm-started on 2-digit addition in the paper's answer format (cached after the
# first run); verl's V1 trainer then runs DAPO + LoRA on it with PeRL's engine and vLLM's CPU build
# as the rollout engine, and `perl eval` scores the held-out set before and after (runs/toy-lora/).
# Extra arguments are verl/hydra overrides, e.g.: bash scripts/run.sh peft.name=dora trainer.total_training_steps=60
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
perl train --config examples/toy.yaml "$@"
