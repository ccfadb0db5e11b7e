#!/usr/bin/env bash
# The acceptance run on a CUDA machine: one script, one JSON, at most GPU_CHECK_SECONDS (480).
#
# Runs with the project installed (.venv) or from the source tree with any Python that has
# torch, torchvision, pyyaml, safetensors, tensorboard, scikit-learn, tqdm and matplotlib
# (PYTHON=python3, a stock CUDA image: DALI, DeepSpeed and submitit missing are recorded, not
# fatal). Each part runs under its own time budget, so a slow part cannot starve the others:
#   stage1  ResNet-50 stage-1 step vs a bare loop (bf16, channels_last), loader-fed, host syncs, profile
#   cache   the feature cache vs a plain forward of both ResNet-50s
#   stage2  a classifier epoch on an ImageNet-LT-sized cache vs its matrix products, on the GPU
#   demo    `ffn run demo` end to end on this machine with dist.nproc=2 (wall time, accuracy table)
#   paper   `ffn bench accuracy --schedule paper` on CIFAR-10-LT, if CIFAR_ARCHIVE (or
#           ../shared/data/cifar10-jpeg.tar.gz) exists; it gets the time the others left
#
# Results (7 files) go to ${OUT:-runs/gpu_check}: gpu_check.json, one log per part, nvidia-smi.txt.
# Scratch (generated JPEGs, runs) goes to ${GPU_CHECK_WORK:-runs/gpu_check/work}.
# GPU_CHECK_PARTS picks parts; GPU_CHECK_ALLOW_CPU=1 runs the check's code on the CPU (tests only).
set -uo pipefail

cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
work=${GPU_CHECK_WORK:-runs/gpu_check/work}
budget=${GPU_CHECK_SECONDS:-480}
parts=${GPU_CHECK_PARTS:-stage1 cache stage2 demo paper}
archive=${CIFAR_ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}
images=${GPU_CHECK_IMAGES:-2048}
steps=${GPU_CHECK_STEPS:-30}
rounds=${GPU_CHECK_ROUNDS:-3}
batch=${GPU_CHECK_BATCH:-256}
stage2_rows=${GPU_CHECK_STAGE2_ROWS:-115846}
read -r -a demo_args <<< "${GPU_CHECK_DEMO_ARGS:-}"
declare -A seconds=([stage1]=120 [cache]=60 [stage2]=60 [demo]=90)
default_python=python3
[ -x .venv/bin/python ] && default_python=.venv/bin/python
python=${PYTHON:-$default_python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out" "$work"
start=$SECONDS

allow_cpu=()
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    allow_cpu=(--allow-cpu)
elif ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: $python has no torch that sees a CUDA device" >&2
    exit 2
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

statuses=()
run_part() {  # run_part NAME SECONDS COMMAND...: status and wall time go into the JSON
    local name=$1 limit=$2 began=$SECONDS code state
    shift 2
    echo "== $name (budget ${limit} s)"
    timeout --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
    code=$?
    case $code in 0) state=completed ;; 124 | 137) state=stopped_at_budget ;; *) state=failed ;; esac
    echo "   $state in $((SECONDS - began)) s (log: $out/$name.log)"
    statuses+=("$name=$state:$code:$((SECONDS - began))")
}

ffn=("$python" -m ffn_dist.cli)
for part in $parts; do
    left=$((budget - (SECONDS - start) - 10))
    case $part in
        stage1 | cache | stage2)
            run_part "$part" "$(( seconds[$part] < left ? seconds[$part] : left ))" "${ffn[@]}" bench gpu \
                --part "$part" --work-dir "$work" --json-out "$work/$part.json" --images "$images" \
                --batch-size "$batch" --steps "$steps" --rounds "$rounds" --stage2-rows "$stage2_rows" \
                "${allow_cpu[@]}" ;;
        demo)
            rm -rf "$work/demo"
            run_part demo "$(( seconds[demo] < left ? seconds[demo] : left ))" "${ffn[@]}" run demo \
                dist.nproc=2 "output_dir=$work/demo" "data.root=$work/demo_data" "${demo_args[@]}" ;;
        paper)
            if [ -f "$archive" ] && [ "$left" -gt 60 ]; then
                run_part paper "$left" "${ffn[@]}" bench accuracy --schedule paper --archive "$archive" \
                    --work-dir "$work/accuracy"
            else
                statuses+=("paper=skipped:-:0")
                echo "== paper: skipped (archive $archive present: $([ -f "$archive" ] && echo yes || echo no), $left s left)"
            fi ;;
        *) echo "gpu_check: unknown part $part" >&2 ;;
    esac
done

"$python" - "$out" "$work" "$((SECONDS - start))" "$budget" "${statuses[@]}" <<'PY'
import json, sys
from pathlib import Path

out, work, seconds, budget, statuses = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
result = {"seconds": seconds, "budget_s": budget, "parts": {}}
for entry in statuses:
    name, _, rest = entry.partition("=")
    state, code, took = rest.split(":")
    result["parts"][name] = {"status": state, "exit_status": None if code == "-" else int(code), "seconds": int(took)}
for name in ("stage1", "cache", "stage2"):
    path = work / f"{name}.json"
    if name in result["parts"] and path.is_file():
        figures = json.loads(path.read_text())
        result.setdefault("machine", figures["machine"])
        result.setdefault("versions", figures["versions"])
        result.setdefault("dali_missing", figures["dali_missing"])
        result[name] = figures[name]
report = work / "demo" / "report" / "report.json"
if "demo" in result["parts"] and report.is_file():
    methods = json.loads(report.read_text())["methods"]
    result["demo"] = {"wall_s": result["parts"]["demo"]["seconds"], "top1": {m: r["top1"] for m, r in methods.items()}}
    result["demo"]["table"] = (work / "demo" / "report" / "report.md").read_text()
accuracy = work / "accuracy" / "paper" / "accuracy.json"
if "paper" in result["parts"] and accuracy.is_file():
    result["paper"] = json.loads(accuracy.read_text())
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
summary = {name: part["status"] for name, part in result["parts"].items()}
print(json.dumps({"seconds": seconds, "parts": summary}))
print(f"written: {out / 'gpu_check.json'}")
sys.exit(0 if all(s in ("completed", "skipped") for s in summary.values()) else 1)
PY
