#!/usr/bin/env bash
# DAPO + LoRA-FA, DeepSeek-R1-Distill-Qwen-7B (beyond the paper: its Table 6 has LoRA, DoRA, MiSS, LoRA+).
# Recipe: recipes/yaml/dapo_lora_fa_7b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
