#!/usr/bin/env bash
# DAPO + LoRA, DeepSeek-R1-Distill-Qwen-7B: paper Table 6, row LoRA.
# Recipe: recipes/yaml/dapo_lora_7b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
