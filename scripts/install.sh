#!/usr/bin/env bash
# Create .venv (if absent) and install ffn-dist with its test tools into it.
# torch/torchvision are pinned in setup.py; DALI is the CUDA-12 wheel, which also runs CPU-only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, nvidia.dali, deepspeed, submitit; print('ffn-dist installed: torch', torch.__version__)"
