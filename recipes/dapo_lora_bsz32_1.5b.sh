#!/usr/bin/env bash
# DAPO + LoRA, 1.5B, global batch 32: paper Table 5 / Figure 5, batch-size ablation, row 32 Bsz.
# Recipe: recipes/yaml/dapo_lora_bsz32_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
