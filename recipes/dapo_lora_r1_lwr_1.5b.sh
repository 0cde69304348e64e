#!/usr/bin/env bash
# DAPO + LoRA rank 1 at "LoRA Without Regret"'s settings (alpha 32, lr 10x full FT's), 1.5B: beyond the paper.
# Recipe: recipes/yaml/dapo_lora_r1_lwr_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
