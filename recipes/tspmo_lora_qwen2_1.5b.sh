#!/usr/bin/env bash
# T-SPMO + LoRA on Qwen2-1.5B / SVAMP (arXiv 2504.20834; settings chosen, see the YAML).
# Recipe: recipes/yaml/tspmo_lora_qwen2_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
