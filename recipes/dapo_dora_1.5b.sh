#!/usr/bin/env bash
# DAPO + DoRA, DeepSeek-R1-Distill-Qwen-1.5B: paper Table 3, row DoRA.
# Recipe: recipes/yaml/dapo_dora_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
