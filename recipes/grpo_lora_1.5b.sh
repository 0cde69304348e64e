#!/usr/bin/env bash
# GRPO + LoRA, 1.5B: paper Table 5, algorithm ablation, row GRPO.
# Recipe: recipes/yaml/grpo_lora_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
