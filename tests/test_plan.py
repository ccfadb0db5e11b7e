"""`ffn plan`: real steps measured, the model's arithmetic, and what submit and status read of it."""

import json
import math

import pytest

from ffn_dist.config import load_config, with_settings
from ffn_dist.errors import FFNError
from ffn_dist.plan import RunShape, predict, read_plan, time_limits
from ffn_dist.probe import Probe
from ffn_dist.run.history import log_event, stage_seconds
from ffn_dist.run.stages import STAGES
from ffn_dist.run.status import run_status
from tests.conftest import CONFIG, cache_overrides, run_ffn


def probe(step_s=0.5, startup_s=10.0) -> Probe:
    return Probe(
        processes=2,
        device="cpu",
        steps=10,
        step_s={"ce": step_s, "kps": step_s},
        startup_s=startup_s,
        checkpoint_bytes={"ce": 1000, "kps": 1000},
        peak_memory_gb=1.0,
        data_s=1.0,
        classifier_epoch_s=0.1,
        classifier_memory_gb=0.5,
        notes=[],
    )


def training_seconds(cfg, sizes, efficiency=0.9) -> float:
    shape = RunShape({"train": 585, "test": 300}, 64, sizes["target"], sizes["probe"])  # the demo's
    return predict(cfg, probe(), shape, efficiency)["stages"]["stage1"]["seconds"] - 10.0


def test_the_model_scales_with_processes_and_trains_branches_in_turn_on_one(demo_root, tmp_path):
    cfg = load_config(CONFIG, [f"data.root={demo_root}", f"output_dir={tmp_path}"])
    measured = {"ce": 1, "kps": 1}  # one process a branch
    two = training_seconds(cfg, {"target": measured, "probe": measured})
    four = with_settings(cfg, {"dist.nproc": 4})
    assert training_seconds(four, {"target": {"ce": 2, "kps": 2}, "probe": measured}, 1.0) == pytest.approx(
        two / 2, rel=1e-3
    )
    at_half = training_seconds(four, {"target": {"ce": 2, "kps": 2}, "probe": measured}, 0.5)
    assert at_half == pytest.approx(two, rel=1e-3)  # twice the processes at half the speed each
    one = with_settings(cfg, {"dist.nproc": 1})
    assert training_seconds(one, {"target": measured, "probe": measured}) == pytest.approx(2 * two, rel=1e-3)
    # 20 epochs of ceil(585 / 64) steps at 0.5 s, plus 4 evaluations of 300 images at a third
    # of a training image's time (0.5 s / 64 images on one process)
    assert two == pytest.approx(20 * math.ceil(585 / 64) * 0.5 + 4 * 300 * 0.5 / 64 / 3, abs=0.1)


def test_time_limits_are_each_jobs_prediction_times_the_margin():
    saved = {
        "stages": {
            s.name: {"seconds": seconds} for s, seconds in zip(STAGES, [20, 600, 100, 50, 31], strict=True)
        }
    }
    limits = time_limits(saved, 1.5)  # each x 1.5, plus a minute for the job's start
    assert limits == [
        "launch.data_minutes=2",  # 30 s + 60 s
        "launch.stage1_minutes=16",
        "launch.cache_minutes=4",  # 150 s + 60 s
        "launch.classifier_minutes=4",  # the classifier and the report share a job: 81 s x 1.5 + 60 s
    ]
    # SLURM's warning (launch.signal_delay_s) comes on top: a job is not stopped before its end
    assert time_limits(saved, 1.5, 120)[1] == "launch.stage1_minutes=18"
    # a job of stages that take no time still starts before USR2 reaches it
    instant = {"stages": {s.name: {"seconds": 0.0} for s in STAGES}}
    assert all(limit.endswith("=3") for limit in time_limits(instant, 1.5, 120))
    with pytest.raises(FFNError, match="--plan-margin: 0.8; a time limit below the prediction"):
        time_limits(saved, 0.8)


def test_a_new_stage_is_planned_and_limited_from_the_stage_list_alone(demo_root, tmp_path, monkeypatch):
    """plan.py loops over run/stages.STAGES: a stage added there (here one of no cost model yet,
    in the classifier's job) gets a row, and a plan saved before it still gives limits."""
    import dataclasses

    import ffn_dist.plan

    extra = dataclasses.replace(STAGES[-1], name="calibrate")
    monkeypatch.setattr(ffn_dist.plan, "STAGES", (*STAGES, extra))
    cfg = load_config(CONFIG, [f"data.root={demo_root}", f"output_dir={tmp_path}"])
    measured = {"ce": 1, "kps": 1}
    shape = RunShape({"train": 585, "test": 300}, 64, measured, measured)
    planned = predict(cfg, probe(), shape, 0.9)["stages"]
    assert list(planned) == [s.name for s in STAGES] + ["calibrate"]
    assert planned["calibrate"]["seconds"] == 0.0 and "not modelled" in planned["calibrate"]["basis"]
    older = {"stages": {s.name: {"seconds": 60.0} for s in STAGES}}
    assert time_limits(older, 1.0)[-1] == "launch.classifier_minutes=3"  # 2 stages of 60 s, and the start


def test_stage_seconds_add_a_stopped_stages_parts_and_count_a_running_one(demo_root, tmp_path):
    cfg = load_config(CONFIG, [f"data.root={demo_root}", f"output_dir={tmp_path}"])
    lines = [
        ("00:00:00", "started"),
        ("00:00:30", "complete"),  # an earlier run of the stage: not this outcome's
        ("01:00:00", "started"),
        ("01:00:10", "stopped"),
        ("01:05:00", "started"),
        ("01:05:50", "complete"),
    ]
    history = tmp_path / "history.jsonl"
    history.write_text(
        "".join(
            json.dumps({"time": f"2026-01-01T{t}+00:00", "stage": "stage1", "event": e, "config": "x"}) + "\n"
            for t, e in lines
        )
    )
    assert stage_seconds(cfg, "stage1") == (60.0, False)
    assert stage_seconds(cfg, "cache") is None
    log_event(cfg, "stage1", "started")
    seconds, running = stage_seconds(cfg, "stage1")
    assert running and 0 <= seconds < 60


def test_plan_measures_real_steps_predicts_what_a_run_writes_and_feeds_submit_and_status(
    cached_run, tiny_root, tmp_path
):
    out = tmp_path / "planned"
    args = cache_overrides(tiny_root, out)
    result = run_ffn("plan", CONFIG, *args, "--steps", "5", "--json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    plan = json.loads(result.stdout)  # the probe's output went to stderr
    assert "probe: stage 1, 5 steps a branch on 2 process(es)" in result.stderr
    assert plan == json.loads((out / "plan.json").read_text())
    stages = plan["stages"]
    assert list(stages) == [s.name for s in STAGES]
    assert plan["total_seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()), abs=0.5)
    assert plan["measured_on"] == {"processes": 2, "device": "cpu", "steps": 5}
    assert stages["stage1"]["seconds"] > 0 and 0.1 < stages["stage1"]["peak_memory_gb"] < 24
    # on disk: what the cached run (the same settings) wrote
    checkpoints = sum(p.stat().st_size for p in (cached_run / "stage1").rglob("epoch_*.pt"))
    assert stages["stage1"]["disk_bytes"] == pytest.approx(checkpoints, rel=0.02)
    shards = sum(p.stat().st_size for p in (cached_run / "cache").rglob("*.safetensors"))
    assert stages["cache"]["disk_bytes"] == pytest.approx(shards, rel=0.1)

    cfg = load_config(CONFIG, args)
    assert read_plan(cfg) == plan
    dry = run_ffn("submit", CONFIG, *args, "--plan", "--plan-margin", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    limits = time_limits(plan, 2, cfg.launch.signal_delay_s)
    assert all(limit in dry.stdout for limit in limits), dry.stdout[:2000]
    assert f"#SBATCH --time={limits[1].split('=')[1]}" in dry.stdout  # stage 1's job
    lines, _ = run_status(cfg)
    assert lines[1] == "branches: ce (ce loss, linear head); kps (kps loss, cosine head)"
    assert all("planned" in line for line in lines[2:]), lines

    other = run_ffn("submit", CONFIG, *args, "stage1.epochs=3", "--plan", "--dry-run")
    assert other.returncode == 2
    assert f"{out / 'plan.json'}: made for another config (stage1.epochs: 2 planned, 3 now)" in other.stderr
    with pytest.raises(FFNError, match="no plan; run `ffn plan` with the same config first"):
        read_plan(with_settings(cfg, {"output_dir": str(tmp_path / "elsewhere")}))


def test_on_gpus_the_probe_takes_the_gpus_there_are_and_memory_is_the_gpus(demo_root, tmp_path, monkeypatch):
    import torch

    import ffn_dist.plan as plan_module
    from ffn_dist.distributed import peak_memory_gb

    cfg = load_config(CONFIG, [f"data.root={demo_root}", f"output_dir={tmp_path}", "dist.nproc=8"])
    monkeypatch.setattr(plan_module, "visible_gpus", lambda: 0)
    assert plan_module.probe_processes(cfg, 8) == 8  # a CPU runs them all
    monkeypatch.setattr(plan_module, "visible_gpus", lambda: 6)
    assert plan_module.probe_processes(cfg, 8) == 4  # 6 and 5 give a branch 3 processes: 64 does not split
    monkeypatch.setattr(plan_module, "visible_gpus", lambda: 1)
    assert plan_module.probe_processes(cfg, 8) == 1
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    assert peak_memory_gb(torch.device("cuda", 0)) == 3.0
