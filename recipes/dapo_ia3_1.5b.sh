#!/usr/bin/env bash
# DAPO + IA3, DeepSeek-R1-Distill-Qwen-1.5B: paper Table 3, row IA3.
# Recipe: recipes/yaml/dapo_ia3_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
