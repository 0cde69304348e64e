#!/usr/bin/env bash
# DAPO + TinyLoRA (13 trained parameters), 7B: beyond the paper (issue 29; arXiv 2602.04118).
# Recipe: recipes/yaml/dapo_tinylora_7b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
