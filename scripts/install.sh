#!/usr/bin/env bash
# Create .venv (if absent) and install ffn-dist with its test tools into it, at the exact
# versions of scripts/constraints.txt (setup.py declares the supported ranges). DALI is the
# CUDA-12 wheel, which also runs CPU-only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# FFN_SYSTEM_SITE_PACKAGES=1 lets the venv see an already installed torch (the container's
# base image), so pip keeps it when it matches the pin instead of downloading it again.
VENV_ARGS=()
[ "${FFN_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && VENV_ARGS+=(--system-site-packages)
[ -x .venv/bin/python ] || "$PYTHON" -m venv "${VENV_ARGS[@]}" .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[dev]"
.venv/bin/python -c "import torch, nvidia.dali, deepspeed, submitit; print('ffn-dist installed: torch', torch.__version__)"
