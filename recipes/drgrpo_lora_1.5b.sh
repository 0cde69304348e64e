#!/usr/bin/env bash
# Dr. GRPO + LoRA, 1.5B: paper Table 5, algorithm ablation, row Dr. GRPO.
# Recipe: recipes/yaml/drgrpo_lora_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
