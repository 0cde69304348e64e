#!/usr/bin/env bash
# The one driver behind every recipes/<recipe>.sh (each is a single line calling this).
#
#   bash recipes/<recipe>.sh [--dry-run] [--format yaml|json] [key=value | +key=value ...]
#   bash recipes/_run.sh <recipe name | path/to/recipe.yaml> [same arguments]
#
# Runs `python -m perl.verl_glue --config recipes/yaml/<recipe>.yaml <knobs> <arguments>`: the
# recipe YAML (with its `defaults:` chain, over the entry point's DAPO base) on verl's Ray PPO
# trainer with PeRL's engine. The recipe name is the script's file name, so a renamed copy of a
# script needs its own YAML and cannot silently train another recipe.
#
# Environment knobs (all optional; unset = the recipe's value):
#   MODEL_PATH  local HF model directory (or hdfs://...)   -> actor_rollout_ref.model.path
#   DATA_DIR    directory of the `perl prepare` parquets   -> perl.data_dir (recipes: ./data)
#   OUTPUT_DIR  checkpoint root (default ./checkpoints); the run writes OUTPUT_DIR/<recipe>
#               -> trainer.default_local_dir; rerunning a recipe resumes there (resume_mode=auto)
#   N_GPUS      GPUs per node                              -> trainer.n_gpus_per_node (base: 8)
#   N_NODES     nodes                                      -> trainer.nnodes (1); more than 1 needs
#               a running Ray cluster (ray start, see recipes/README.md)
#   LOGGER      console | wandb | tensorboard | mlflow | swanlab | clearml | trackio | file, or a
#               comma list such as console,wandb            -> trainer.logger (default console);
#               tensorboard writes to TENSORBOARD_DIR (default OUTPUT_DIR/<recipe>/tensorboard)
#   DRY_RUN=1   same as --dry-run: print the resolved config and the adapted model's trainable
#               parameters, start nothing (no GPU, Ray, vLLM or data files needed; the model
#               directory's config.json is read)
#   PYTHON      the interpreter (default: python, else python3)
# Arguments other than the options above are hydra overrides, applied after the knobs (they win).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
is_true() { case "${1:-0}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in
  -h | --help) usage; exit 0 ;;
  *.yaml | *.yml) yaml=$1; name=$(basename "$1"); name=${name%.*} ;;
  *) name=$1; yaml=$HERE/yaml/$1.yaml ;;
esac
shift
[ -f "$yaml" ] || die "recipe $name: $yaml does not exist"

dry_run=0
if is_true "${DRY_RUN:-0}"; then dry_run=1; fi
entry_opts=()
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-path-checks | --format=*) entry_opts+=("$1") ;;
    --format) [ $# -ge 2 ] || die "--format needs a value (yaml or json)"; entry_opts+=("$1" "$2"); shift ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option $1 (overrides are key=value; see --help)" ;;
    *) overrides+=("$1") ;;
  esac
  shift
done

# --- environment knobs -> overrides ------------------------------------------------------------
out=$(abspath "${OUTPUT_DIR:-checkpoints}")/$name
knobs=("trainer.experiment_name=$name" "trainer.default_local_dir=$out")
if [ -n "${MODEL_PATH:-}" ]; then
  model=$MODEL_PATH
  if [ -d "$model" ]; then model=$(cd "$model" && pwd); fi
  knobs+=("actor_rollout_ref.model.path=$model")
fi
if [ -n "${DATA_DIR:-}" ]; then
  knobs+=("perl.data_dir=$(abspath "$DATA_DIR")")
fi
for knob in N_GPUS N_NODES; do
  value=${!knob:-}
  case "$value" in
    '') ;;
    *[!0-9]* | 0) die "$knob=$value: expected a positive integer" ;;
  esac
done
if [ -n "${N_GPUS:-}" ]; then knobs+=("trainer.n_gpus_per_node=$N_GPUS"); fi
if [ -n "${N_NODES:-}" ]; then knobs+=("trainer.nnodes=$N_NODES"); fi
loggers=()
IFS=', ' read -r -a requested <<< "${LOGGER:-console}"
for logger in "${requested[@]}"; do
  case "$logger" in
    console | wandb | tensorboard | mlflow | swanlab | clearml | trackio | file | vemlp_wandb) loggers+=("$logger") ;;
    *) die "LOGGER: unknown logger '$logger' (console, wandb, tensorboard, mlflow, swanlab, clearml, trackio, file)" ;;
  esac
done
[ ${#loggers[@]} -gt 0 ] || die "LOGGER is empty (console, wandb, tensorboard, ...)"
knobs+=("trainer.logger=[$(IFS=,; echo "${loggers[*]}")]")
case ",${loggers[*]}," in
  *tensorboard*)  # verl reads TENSORBOARD_DIR in the Ray TaskRunner: pass it through Ray's runtime env
    knobs+=("+ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR=$(abspath "${TENSORBOARD_DIR:-$out/tensorboard}")") ;;
esac

# --- launch --------------------------------------------------------------------------------------
if [ -z "${PYTHON:-}" ]; then
  if command -v python > /dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # PeRL importable without an install (local Ray workers inherit it)
cmd=("$PYTHON" -m perl.verl_glue --config "$yaml")
if [ "$dry_run" = 1 ]; then cmd+=(--dry-run --no-path-checks); fi
cmd+=(${entry_opts[@]+"${entry_opts[@]}"} "${knobs[@]}" ${overrides[@]+"${overrides[@]}"})

if [ "$dry_run" != 1 ]; then
  if [ "${N_NODES:-1}" -gt 1 ] && [ -z "${RAY_ADDRESS:-}" ] && [ ! -s "${RAY_TMPDIR:-/tmp/ray}/ray_current_cluster" ]; then
    die "N_NODES=$N_NODES needs a running Ray cluster: 'ray start --head --port=6379' on this node and " \
        "'ray start --address=<this node>:6379' on the others (or set RAY_ADDRESS); see recipes/README.md"
  fi
  mkdir -p "$out"
  { printf '%s ' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"; printf '%q ' "${cmd[@]}"; echo; } >> "$out/launches.log"
fi
{ printf '+ '; printf '%q ' "${cmd[@]}"; echo; } >&2
exec "${cmd[@]}"
