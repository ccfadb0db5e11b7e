import numpy as np
import pytest
import torch

from ffn_dist.config import load_config
from ffn_dist.metrics import accuracy_report, gather_predictions, halves
from ffn_dist.stages.backbones import lr_factor


def test_gather_drops_padded_repeats():
    indices = torch.tensor([0, 1, 2, 0])  # 3 samples padded to 4
    labels = torch.tensor([1, 0, 1, 1])
    topk = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0]])
    idx, lab, top = gather_predictions(indices, labels, topk)
    assert idx.tolist() == [0, 1, 2] and lab.tolist() == [1, 0, 1] and len(top) == 3


def test_accuracy_report_per_class_and_shot_groups():
    counts = np.array([150, 50, 5])  # many, medium, few
    labels = np.array([0, 0, 1, 1, 2, 2])
    topk = np.array([[0, 1], [1, 0], [1, 2], [1, 0], [0, 2], [0, 1]])
    report = accuracy_report(labels, topk, counts)
    assert report["top1"] == pytest.approx(100 * 3 / 6)
    assert report["top5"] == pytest.approx(100 * 5 / 6)
    assert report["per_class"] == [50.0, 100.0, 0.0]
    assert (report["many"], report["medium"], report["few"]) == (50.0, 100.0, 0.0)
    assert accuracy_report(labels[:4], topk[:4], np.array([150, 150, 150]))["few"] is None
    # halves: class 0 is the head half, class 2 the tail half, the middle class in neither
    assert (report["head"], report["tail"]) == (50.0, 0.0)


def test_halves_follow_class_size_not_class_id():
    counts = np.array([3, 90, 7, 500, 40, 1])
    masks = halves(counts)
    assert np.flatnonzero(masks["head"]).tolist() == [1, 3, 4]
    assert np.flatnonzero(masks["tail"]).tolist() == [0, 2, 5]


def test_lr_schedule_warmup_then_steps():
    cfg = load_config(
        None, ["stage1.warmup_epochs=5", "stage1.lr_milestones=[160, 180]", "stage1.lr_factors=[0.1, 0.01]"]
    )
    assert lr_factor(cfg, 0.0) == pytest.approx(0.0, abs=1e-6)
    assert lr_factor(cfg, 2.5) == pytest.approx(0.5)
    assert lr_factor(cfg, 5.0) == 1.0 and lr_factor(cfg, 159.9) == 1.0
    assert lr_factor(cfg, 160.0) == 0.1 and lr_factor(cfg, 185) == 0.01
