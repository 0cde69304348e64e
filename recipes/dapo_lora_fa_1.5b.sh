#!/usr/bin/env bash
# DAPO + LoRA-FA, DeepSeek-R1-Distill-Qwen-1.5B: paper Table 3, row LoRA-FA.
# Recipe: recipes/yaml/dapo_lora_fa_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
