#!/usr/bin/env bash
# DAPO + LoRA rank 8, 1.5B: paper Table 5 / Figure 4, rank ablation, row 8.
# Recipe: recipes/yaml/dapo_lora_r8_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
