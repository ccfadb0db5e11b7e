#!/usr/bin/env bash
# Create .venv (if absent) and install ffn-dist with its test tools into it, at the exact
# versions of scripts/constraints.txt (setup.py declares the supported ranges). DALI is the
# CUDA-12 wheel, which also runs CPU-only.
#   FFN_TORCH=lower   a second environment, .venv-lower, at the lowest torch and torchvision
#                     setup.py admits (scripts/constraints-lower.txt): what CI tests beside
#                     the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
CONSTRAINTS=scripts/constraints.txt
if [ "${FFN_TORCH:-pinned}" = lower ]; then
  VENV=.venv-lower
  CONSTRAINTS=$(mktemp)
  grep -v -E '^(torch|torchvision)==' scripts/constraints.txt > "$CONSTRAINTS"
  cat scripts/constraints-lower.txt >> "$CONSTRAINTS"
fi
# FFN_SYSTEM_SITE_PACKAGES=1 lets the venv see an already installed torch (the container's
# base image), so pip keeps it when it matches the pin instead of downloading it again.
VENV_ARGS=()
[ "${FFN_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && VENV_ARGS+=(--system-site-packages)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e ".[dev]"
"$VENV/bin/python" -c "import torch, nvidia.dali, deepspeed, submitit; print('ffn-dist installed: torch', torch.__version__)"
