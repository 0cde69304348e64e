#!/usr/bin/env bash
# DAPO + LoRA, 1.5B, lr 5e-6: paper Table 5, learning-rate ablation, row 5e-6.
# Recipe: recipes/yaml/dapo_lora_lr5e-6_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
