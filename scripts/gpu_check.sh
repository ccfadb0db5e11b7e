#!/usr/bin/env bash
# The acceptance run on a CUDA machine, in two calls (a device call is at most 10 minutes, and
# a session's GPU time is short): each writes one JSON.
#
#   bash scripts/gpu_check.sh acceptance   # at most GPU_CHECK_SECONDS (360): the parts below
#   bash scripts/gpu_check.sh paper        # at most GPU_CHECK_SECONDS (300): the paper schedule
#
# acceptance, each part under its own time budget, so a slow part cannot starve the others:
#   jpegs   generate the ImageNet-sized JPEGs the next two parts read (all cores, untimed for them)
#   stage1  ResNet-50 stage-1 step vs a bare loop (bf16, channels_last), loader-fed, host syncs, profile
#   cache   the feature cache vs a plain forward of both ResNet-50s (both warmed, median of rounds)
#   stage2  a classifier epoch on an ImageNet-LT-sized cache vs its matrix products, on the GPU
#   demo    `ffn run demo` end to end on this machine with dist.nproc=2 (wall time, accuracy table)
# paper: `ffn bench accuracy --schedule paper` on CIFAR-10-LT from CIFAR_ARCHIVE, by default
#   .data/cifar10-jpeg.tar.gz inside the tree (a device call carries the tree, not ../shared;
#   copy the archive there first), else ../shared/data/cifar10-jpeg.tar.gz; none is an error.
#
# Runs with the project installed (.venv) or from the source tree with any Python that has
# torch, torchvision, pyyaml, safetensors, tensorboard, scikit-learn, tqdm and matplotlib
# (PYTHON=python3, a stock CUDA image: DALI, DeepSpeed and submitit missing are recorded, not
# fatal). Results go to ${OUT:-runs/gpu_check}: gpu_check_CALL.json, one log per part,
# nvidia-smi.txt; scratch (JPEGs, runs) to ${GPU_CHECK_WORK:-runs/gpu_check/work}, and every
# part removes its previous results there first, so a JSON never reports an older run.
# GPU_CHECK_ALLOW_CPU=1 runs the check's code on the CPU (tests only).
set -uo pipefail

cd "$(dirname "$0")/.."
call=${1:-acceptance}
case $call in
    acceptance) default_budget=360; default_parts="jpegs stage1 cache stage2 demo" ;;
    paper) default_budget=300; default_parts="paper" ;;
    *) echo "usage: scripts/gpu_check.sh [acceptance|paper]" >&2; exit 2 ;;
esac
out=${OUT:-runs/gpu_check}
work=${GPU_CHECK_WORK:-runs/gpu_check/work}
budget=${GPU_CHECK_SECONDS:-$default_budget}
parts=${GPU_CHECK_PARTS:-$default_parts}
archive=${CIFAR_ARCHIVE:-.data/cifar10-jpeg.tar.gz}
[ -z "${CIFAR_ARCHIVE:-}" ] && [ ! -f "$archive" ] && archive=../shared/data/cifar10-jpeg.tar.gz
images=${GPU_CHECK_IMAGES:-2048}
steps=${GPU_CHECK_STEPS:-30}
rounds=${GPU_CHECK_ROUNDS:-3}
batch=${GPU_CHECK_BATCH:-256}
stage2_rows=${GPU_CHECK_STAGE2_ROWS:-115846}
read -r -a demo_args <<< "${GPU_CHECK_DEMO_ARGS:-}"
declare -A seconds=([jpegs]=25 [stage1]=110 [cache]=75 [stage2]=50 [demo]=90)
default_python=python3
[ -x .venv/bin/python ] && default_python=.venv/bin/python
python=${PYTHON:-$default_python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out" "$work"
start=$SECONDS

allow_cpu=()
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    allow_cpu=(--allow-cpu)
    # the budgets are a GPU's: the same code on a (shared, 2-core) CPU gets three times as long
    budget=$((budget * 3))
    for part in "${!seconds[@]}"; do seconds[$part]=$((seconds[$part] * 3)); done
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
    # --kill-after beyond the 30 s `ffn run` gives its workers to stop after a SIGTERM
    timeout --kill-after=45 "$limit" "$@" > "$out/$name.log" 2>&1
    code=$?
    case $code in 0) state=completed ;; 124 | 137) state=stopped_at_budget ;; *) state=failed ;; esac
    echo "   $state in $((SECONDS - began)) s (log: $out/$name.log)"
    statuses+=("$name=$state:$code:$((SECONDS - began))")
}
budget_of() {  # the part's own budget, or what is left of the call's if that is less
    local left=$((budget - (SECONDS - start) - 10))
    echo $(( $1 < left ? $1 : left ))
}

ffn=("$python" -m ffn_dist.cli)
for part in $parts; do
    case $part in
        jpegs | stage1 | cache | stage2)
            rm -f "$work/$part.json"
            run_part "$part" "$(budget_of "${seconds[$part]}")" "${ffn[@]}" bench gpu \
                --part "$part" --work-dir "$work" --json-out "$work/$part.json" --images "$images" \
                --batch-size "$batch" --steps "$steps" --rounds "$rounds" --stage2-rows "$stage2_rows" \
                "${allow_cpu[@]}" ;;
        demo)
            rm -rf "$work/demo"
            run_part demo "$(budget_of "${seconds[demo]}")" "${ffn[@]}" run demo \
                dist.nproc=2 "output_dir=$work/demo" "data.root=$work/demo_data" "${demo_args[@]}" ;;
        paper)
            rm -rf "$work/accuracy/paper"
            if [ -f "$archive" ]; then
                run_part paper "$(budget_of "$budget")" "${ffn[@]}" bench accuracy --schedule paper \
                    --archive "$archive" --work-dir "$work/accuracy"
            else
                statuses+=("paper=no_archive:-:0")
                echo "== paper: no CIFAR-10 archive at $archive: copy cifar10-jpeg.tar.gz to .data/ in the tree (or set CIFAR_ARCHIVE)" >&2
            fi ;;
        *) echo "gpu_check: unknown part $part" >&2; statuses+=("$part=unknown:-:0") ;;
    esac
done

"$python" - "$out/gpu_check_$call.json" "$work" "$((SECONDS - start))" "$budget" "${statuses[@]}" <<'PY'
import json, sys
from pathlib import Path

target, work, seconds, budget, statuses = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
result = {"seconds": seconds, "budget_s": budget, "parts": {}}
for entry in statuses:
    name, _, rest = entry.partition("=")
    state, code, took = rest.split(":")
    result["parts"][name] = {"status": state, "exit_status": None if code == "-" else int(code), "seconds": int(took)}
for name in ("jpegs", "stage1", "cache", "stage2"):
    path = work / f"{name}.json"  # removed before the part ran: this run's, or none
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
    result["paper"]["wall_s"] = result["parts"]["paper"]["seconds"]
target.write_text(json.dumps(result, indent=2))
summary = {name: part["status"] for name, part in result["parts"].items()}
print(json.dumps({"seconds": seconds, "parts": summary}))
print(f"written: {target}")
sys.exit(0 if all(s == "completed" for s in summary.values()) else 1)
PY
