#!/usr/bin/env bash
# Create (or update) the project's virtual environment: CPU torch first, then the package with its extras.
#   VENV=.venv              where the environment goes
#   TRANSFORMERS=           a transformers version to pin (e.g. 4.57.6); empty lets pip resolve (5.2.x today)
# torch is pinned here because an unpinned torch pulls gigabytes of CUDA packages on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null \
  || "${PIP[@]}" "torch==$TORCH_VERSION"
PACKAGES=(-e ".[eval,test]")
[ -n "${TRANSFORMERS:-}" ] && PACKAGES+=("transformers==$TRANSFORMERS")
"${PIP[@]}" "torch==$TORCH_VERSION" "${PACKAGES[@]}"
