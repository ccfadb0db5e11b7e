import numpy as np
import pytest
import torch

from ffn_dist.config import load_config
from ffn_dist.metrics import (
    accuracy_report,
    calibration,
    fit_temperature,
    gather_predictions,
    halves,
    logits_report,
    prediction_scores,
)
from ffn_dist.priors import PriorError, logit_adjustment, read_prior, shifted_priors
from ffn_dist.stages.backbones import lr_factor


def test_gather_drops_padded_repeats():
    indices = torch.tensor([0, 1, 2, 0])  # 3 samples padded to 4
    labels = torch.tensor([1, 0, 1, 1])
    topk = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0]])
    scores = torch.tensor([[0.5, -0.1], [0.25, -0.2], [0.125, -0.3], [0.5, -0.1]])  # exact in binary
    lab, top, kept = gather_predictions(indices, labels, topk, scores)
    assert lab.tolist() == [1, 0, 1] and len(top) == 3 and kept[:, 0].tolist() == [0.5, 0.25, 0.125]


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


def test_ece_on_a_hand_built_case():
    # bins of 1/15: 0.95 -> bin 14, 0.60 -> bin 8 (0.533, 0.6], 0.30 -> bin 4 (0.267, 0.333]
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.60, 0.60, 0.30, 0.30])
    correct = np.array([1, 1, 1, 0, 1, 0, 0, 0], dtype=bool)
    log_likelihood = np.log(np.array([0.95, 0.95, 0.95, 0.01, 0.60, 0.2, 0.1, 0.1]))
    result = calibration(confidence, correct, log_likelihood)
    # |0.75 - 0.95| * 4/8 + |0.5 - 0.6| * 2/8 + |0 - 0.3| * 2/8
    assert result["ece"] == pytest.approx(100 * (0.2 * 0.5 + 0.1 * 0.25 + 0.3 * 0.25))
    assert result["nll"] == pytest.approx(-np.mean(log_likelihood))
    bins = result["reliability"]
    assert (
        bins["count"][14] == 4 and bins["count"][8] == 2 and bins["count"][4] == 2 and sum(bins["count"]) == 8
    )
    assert bins["accuracy"][14] == pytest.approx(75.0) and bins["confidence"][8] == pytest.approx(60.0)
    assert bins["accuracy"][0] is None  # an empty bin


def test_prediction_scores_and_a_report_of_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 0, 2])
    scores = prediction_scores(logits, labels)
    p = torch.softmax(logits.double(), 1)
    assert torch.allclose(scores[:, 0], p.max(1).values) and torch.allclose(
        scores[:, 1], p[[0, 1, 2], [0, 0, 2]].log()
    )
    report = logits_report(logits, labels, np.array([5, 3, 1]), temperature=2.0)  # scale 1
    assert report["top1"] == pytest.approx(200 / 3) and report["calibration"]["nll"] == pytest.approx(
        -scores[:, 1].mean().item()
    )
    softer = prediction_scores(logits / 2.0, labels)
    assert report["calibrated"]["temperature"] == 2.0
    assert report["calibrated"]["nll"] == pytest.approx(-softer[:, 1].mean().item())


def test_shifted_prior_accuracy_is_the_mean_over_subsampled_test_sets():
    """The exact figure sum_c pi_c acc_c against SADE's way: test sets drawn under the prior."""
    rng = np.random.default_rng(0)
    counts = np.array([500, 20, 300, 5, 80, 2, 150, 40, 10, 1000])  # class ids not sorted by size
    labels = np.repeat(np.arange(10), 200)
    correct = rng.random(len(labels)) < np.linspace(0.2, 0.9, 10)[labels]
    topk = np.where(correct, labels, (labels + 1) % 10)[:, None]
    report = accuracy_report(labels, topk, counts)
    priors = shifted_priors(counts)
    assert list(priors)[:6] == ["forward_50", "forward_25", "forward_10", "forward_5", "forward_2", "uniform"]
    forward = priors["forward_50"]
    assert (
        forward.argmax() == 9 and forward.argmin() == 5 and forward.max() / forward.min() == pytest.approx(50)
    )
    assert priors["backward_50"].argmax() == 5 and report["shifted_prior"]["uniform"] == pytest.approx(
        report["top1"]
    )
    for name in ("forward_50", "backward_10"):
        draws = []
        for _ in range(200):  # a test set of 1,000 images drawn under the prior, as SADE does
            picked = rng.choice(len(labels), 1000, p=priors[name][labels] / priors[name][labels].sum())
            draws.append(100 * correct[picked].mean())
        # the exact figure is the draws' expectation: within 4 standard errors of their mean
        assert abs(np.mean(draws) - report["shifted_prior"][name]) < 4 * np.std(draws) / np.sqrt(len(draws))


def test_temperature_scaling_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = 3.0 * torch.randn(20000, 10, generator=generator)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator)[:, 0]
    # a model 2.5x over-confident: its logits are the true ones times 2.5
    assert fit_temperature(2.5 * true_logits, labels) == pytest.approx(2.5, rel=0.03)
    assert fit_temperature(true_logits / 4.0, labels) == pytest.approx(0.25, rel=0.03)


def test_the_prior_rule_and_prior_files(tmp_path):
    counts = np.array([90, 9, 1])
    uniform = read_prior("uniform", 3)
    assert uniform.tolist() == pytest.approx([1 / 3] * 3)
    assert logit_adjustment(uniform, counts) == pytest.approx(np.log(1 / 3) - np.log(counts / 100))
    good = tmp_path / "prior.txt"
    good.write_text("2\n1\n\n1\n")
    assert read_prior(str(good), 3).tolist() == [0.5, 0.25, 0.25]
    for text, said in [
        ("1\n2\n", f"{good}: 2 frequencies for a model of 3 classes (one line per class)"),
        ("1\n-2\n3\n", f"{good}:2: frequency -2 is not a finite non-negative number"),
        ("1\nmany\n3\n", f"{good}:2: 'many' is not a number"),
        ("0\n0\n0\n", f"{good}: the frequencies sum to 0"),
    ]:
        good.write_text(text)
        with pytest.raises(PriorError) as refused:
            read_prior(str(good), 3)
        assert said in str(refused.value) and "\n" not in str(refused.value)


def test_non_finite_scores_have_no_calibration():
    scores = np.array([[0.5, -0.7], [np.nan, np.nan]])
    assert (
        accuracy_report(np.array([0, 1]), np.array([[0], [0]]), np.array([5, 1]), scores)["calibration"]
        is None
    )
