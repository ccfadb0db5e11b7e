#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA device: the project installed (`bash scripts/install.sh`),
# or a Python that has torch, torchvision, pyyaml, safetensors and tensorboard (PYTHON=python3;
# the source tree is put on PYTHONPATH; without DALI its figures are recorded as missing).
# At most 8 minutes on one GPU. Writes one JSON of results:
#   ${OUT:-runs/gpu_check}/gpu_check.json
#
# 1. `ffn bench gpu`: DALI mixed decoding, a ResNet-50 stage-1 step in bf16 + channels_last
#    on synthetic batches and fed by DALI from JPEGs (img/s, ratio), the feature cache against
#    a plain forward of both backbones.
# 2. If time remains, the CIFAR-10-LT `paper` schedule (`ffn bench accuracy --schedule paper`),
#    stopped at the budget (it resumes from its checkpoints when run again).
set -uo pipefail

cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
budget=${GPU_CHECK_SECONDS:-480}
default_python=python3
[ -x .venv/bin/python ] && default_python=.venv/bin/python
python=${PYTHON:-$default_python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
start=$SECONDS

"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    || { echo "gpu_check: $python has no torch that sees a CUDA device" >&2; exit 2; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

timeout $((budget - 30)) "$python" -m ffn_dist.cli bench gpu --json-out "$out/gpu_bench.json" \
    2>&1 | tee "$out/gpu_bench.log"
bench_status=${PIPESTATUS[0]}

left=$((budget - (SECONDS - start) - 20))
accuracy_status=skipped
if [ "$left" -gt 120 ] && [ -f ../shared/data/cifar10-jpeg.tar.gz ]; then
    timeout "$left" "$python" -m ffn_dist.cli bench accuracy --schedule paper --work-dir "$out/accuracy" \
        > "$out/accuracy.log" 2>&1
    case $? in 0) accuracy_status=completed ;; 124) accuracy_status=stopped_at_budget ;; *) accuracy_status=failed ;; esac
fi

"$python" - "$out" "$bench_status" "$accuracy_status" "$((SECONDS - start))" <<'PY'
import json, sys
from pathlib import Path
out, bench_status, accuracy_status, seconds = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
result = {"seconds": seconds, "bench_exit_status": bench_status, "paper_schedule": accuracy_status}
bench = out / "gpu_bench.json"
if bench.is_file():
    result.update(json.loads(bench.read_text()))
accuracy = out / "accuracy" / "paper" / "accuracy.json"
if accuracy.is_file():
    result["accuracy"] = json.loads(accuracy.read_text())
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: result.get(k) for k in ("seconds", "bench_exit_status", "paper_schedule")}))
print(f"written: {out / 'gpu_check.json'}")
PY
exit "$bench_status"
