#!/usr/bin/env bash
# DAPO + LoRA, 1.5B, lr 1e-6: paper Figure 4, learning-rate ablation grid (no Table 5 row).
# Recipe: recipes/yaml/dapo_lora_lr1e-6_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
