"""A branch is a config: each stage-1 branch's loss, head, sampler, mixup, re-weighting and
share of the processes come from `branches.NAME`, and reach the trainer, the identity and the
run."""

import json

import numpy as np
import pytest
import torch

from ffn_dist.cache.shards import MappedShard
from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import make_branches
from ffn_dist.losses import LDAMLoss, LogitAdjustedLoss, class_balanced_weights
from ffn_dist.models.heads import CosineHead, LinearHead
from ffn_dist.run.stages import stage_inputs
from ffn_dist.stages.backbones import BranchTrainer, branch_probability_scale
from tests.conftest import CONFIG, run_ffn, tiny_overrides
from tests.test_export import assert_the_export_equals_the_report

OTHER_PAIR = [
    "branches.ce.loss=ldam",
    "branches.ce.head=cosine",
    "branches.ce.drw=true",
    "branches.ce.mixup=false",
    "branches.kps.loss=balanced_softmax",
    "branches.kps.head=linear",
    "branches.kps.sampler=class_balanced",
]


def test_a_branchs_settings_choose_its_head_loss_sampler_mixup_and_reweighting(world, tiny_root, tmp_path):
    overrides = tiny_overrides(
        tiny_root, tmp_path / "run", *OTHER_PAIR, "stage1.epochs=4", "stage1.drw_from=0.5"
    )
    cfg = load_config(CONFIG, overrides)
    dataset = open_dataset(cfg.data)
    trainers = {b.name: BranchTrainer(cfg, world, b, dataset) for b in make_branches(world, cfg)}
    ce, kps = trainers["ce"], trainers["kps"]
    assert isinstance(ce.engine.module.head, CosineHead) and isinstance(ce.loss, LDAMLoss)
    assert isinstance(kps.engine.module.head, LinearHead) and isinstance(kps.loss, LogitAdjustedLoss)
    assert (ce.train_loader.sampler.order, kps.train_loader.sampler.order) == ("shuffle", "balanced")
    assert (branch_probability_scale(cfg, "ce"), branch_probability_scale(cfg, "kps")) == (30.0, 1.0)
    ce._epoch_rules(1)  # deferred re-weighting from epoch 2 (0.5 x 4 epochs)
    assert ce.loss.weight is None
    ce._epoch_rules(2)
    assert torch.allclose(ce.loss.weight, class_balanced_weights(ce.counts))
    batch = next(iter(ce.train_loader))
    for trainer, mixes in ((ce, False), (kps, True)):  # mixup draws lambda and a permutation
        rng = np.random.default_rng(0)
        before = rng.bit_generator.state
        trainer.train_step(batch.images, batch.labels, rng, 0.01)
        assert (rng.bit_generator.state != before) == mixes


def test_a_branchs_training_settings_are_stage_1_inputs_and_its_processes_are_not(tiny_root, tmp_path):
    inputs = stage_inputs(load_config(CONFIG, tiny_overrides(tiny_root, tmp_path)), "stage1")
    assert inputs["branches.kps.loss"] == "kps" and inputs["branches.ce.head"] == "linear"
    assert {"branches.ce.sampler", "branches.kps.mixup", "branches.kps.drw"} <= set(inputs)
    assert not any(key.endswith(".processes") for key in inputs)


# A third branch beside OTHER_PAIR, and the fusion of the three.
THIRD = [
    "branches.lt.loss=logit_adjusted",
    "branches.lt.sampler=sqrt",
    "stage2.fusion={kps: 0.4, ce: 0.3, lt: 0.3}",
]


def test_ffn_run_trains_three_branches_end_to_end_and_exports_their_fusion(tmp_path):
    short = ["stage1.epochs=2", "stage1.eval_every=2", "data.batch_size=32", "cache.train_views=1"]
    three = [*short, "stage2.epochs=2", *OTHER_PAIR, *THIRD]
    refused = run_ffn("run", "demo", *three, "dist.nproc=2", cwd=tmp_path)  # a process a branch, or one
    assert (
        refused.returncode == 2 and "dist.nproc: 2 processes for 3 branches (ce, kps, lt)" in refused.stderr
    )
    assert not (tmp_path / "runs").exists()  # refused before anything is written
    for command in ("run", "export"):
        result = run_ffn(command, "demo", *three, "dist.nproc=3", cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo"
    reports = {
        b: json.loads((run_dir / "stage1" / b / "report.json").read_text()) for b in ("ce", "kps", "lt")
    }
    assert (reports["ce"]["settings"]["loss"], reports["ce"]["settings"]["drw"]) == ("ldam", True)
    assert reports["kps"]["settings"]["sampler"] == "class_balanced"
    assert (reports["lt"]["settings"]["loss"], reports["lt"]["settings"]["sampler"]) == (
        "logit_adjusted",
        "sqrt",
    )
    shard = next((run_dir / "cache" / "test").rglob("*.safetensors"))
    assert set(MappedShard(shard).arrays) == {"ce", "kps", "lt", "labels", "indices"}  # each branch's
    final = json.loads((run_dir / "report" / "report.json").read_text())
    ffn = "FFN (kps 0.4, ce 0.3, lt 0.3)"
    assert list(final["methods"]) == ["CE", "KPS", "LT", ffn]  # a row per branch, then the fusion
    assert all(np.isfinite(m["top1"]) and m["samples"] == 300 for m in final["methods"].values())
    meta = json.loads((run_dir / "export" / "model.json").read_text())
    assert meta["fusion"] == {"kps": 0.4, "ce": 0.3, "lt": 0.3}
    # one ONNX graph of the three backbones, scored as the report scored it (test_export: both runtimes)
    assert_the_export_equals_the_report(tmp_path, "onnx", final["methods"][ffn])
    status = run_ffn("status", "demo", *three, "dist.nproc=3", cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-3000:]
    assert "branches: ce (ldam loss, cosine head, DRW, no mixup); kps (" in status.stdout
    assert "; lt (logit_adjusted loss, linear head, sqrt sampler)" in status.stdout


def test_training_one_branch_alone_names_the_branches_when_it_is_not_one(tiny_root, tmp_path):
    from ffn_dist.errors import FFNError
    from ffn_dist.stages.backbones import train_backbones

    cfg = load_config(CONFIG, tiny_overrides(tiny_root, tmp_path / "run"))
    with pytest.raises(FFNError, match=r"--branch bs: not a branch of this config \(branches: ce, kps\)"):
        train_backbones(cfg, only="bs")
    assert not (tmp_path / "run").exists()  # refused before anything is written
