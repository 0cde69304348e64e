#!/usr/bin/env bash
# Long-horizon scaling run: DAPO + DoRA, 1.5B, 4096 steps, periodic evaluation, resumable.
# Recipe: recipes/yaml/dapo_dora_scaling_1.5b.yaml. Knobs and arguments: bash recipes/_run.sh --help
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run.sh" "$(basename "${BASH_SOURCE[0]}" .sh)" "$@"
