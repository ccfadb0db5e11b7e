"""Stage 2: the LDAM cosine classifier on a cache, the fusion sweep, and the evaluation report."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffn_dist.cache.shards import write_shard
from ffn_dist.cache.store import open_cache, write_manifest
from ffn_dist.config import load_config
from ffn_dist.errors import FFNError
from ffn_dist.losses import LDAMLoss
from ffn_dist.models import CosineHead
from ffn_dist.stages.classifier import ClassifierStep, ClassifierTrainer, parse_sweep
from tests.conftest import CONFIG, cache_overrides, run_ffn

FINGERPRINT = {"identity": "test", "inputs": {"test": True}}


def test_parse_sweep_ranges_lists_and_refusals():
    assert parse_sweep("w1=0:1:0.1") == [round(0.1 * i, 6) for i in range(11)]
    assert parse_sweep("w1=0.9,0.5") == [0.5, 0.9]
    # Python floats: a numpy scalar in classifier.pt made `--methods` fail to load it (weights_only)
    assert all(type(w1) is float for w1 in parse_sweep("w1=0:1:0.1"))
    for bad, message in [
        ("w2=0:1:0.1", "expected w1=START:STOP:STEP"),
        ("w1=1:0:0.1", "STOP >= START"),
        ("w1=0:1:x", "expected w1=START:STOP:STEP"),
        ("w1=0:2:0.5", "every w1 must be in"),
    ]:
        with pytest.raises(FFNError, match=message):
            parse_sweep(bad)


def write_clustered_cache(directory, counts, test_per_class, dims=16, seed=0):
    """Two noisy views of class centres per branch, long-tailed train, balanced test."""
    gen = torch.Generator().manual_seed(seed)
    centres = {b: F.normalize(torch.randn(len(counts), dims, generator=gen), dim=1) for b in ("kps", "ce")}
    splits = {}
    for name, per_class in (("train", counts), ("test", [test_per_class] * len(counts))):
        labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(per_class))
        tensors = {
            b: F.normalize(
                centres[b][labels] + 0.25 * torch.randn(len(labels), dims, generator=gen), dim=1
            ).half()
            for b in ("kps", "ce")
        }
        tensors.update(labels=labels, indices=torch.arange(len(labels)))
        file = f"{name}/view0/part00000.safetensors"
        info = write_shard(directory / file, tensors, {"split": name, "view": "0", "part": "0"})
        splits[name] = {"rows": len(labels), "parts": [{**info, "file": file, "view": 0}]}
    body = {
        "store": "normalized",
        "dtype": "fp16",
        "dims": dims,
        "fingerprint": FINGERPRINT,
        "splits": splits,
    }
    write_manifest(directory, body)
    return open_cache(directory, FINGERPRINT)


def test_classifier_learns_a_long_tailed_cache_and_reuses_finished_work(tmp_path, capsys):
    counts = [200, 120, 70, 40, 25, 15, 9, 5]
    cache = write_clustered_cache(tmp_path / "cache", counts, test_per_class=40)
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.num_classes=8", "stage2.epochs=6", "seed=1"])
    initial = F.normalize(torch.randn(8, 16), dim=1)  # a KPS head that knows nothing
    trainer = ClassifierTrainer(cfg, cache, initial)
    assert trainer.counts.tolist() == counts
    head, _ = trainer.new_classifier()
    rows = cache.splits["test"].rows_of_view(0)
    before = (
        head(cache.splits["test"].fused(rows, 0.5, 0.5), normalized=True).argmax(1).numpy()
        == cache.splits["test"].labels[rows]
    ).mean()
    report = trainer.fit(0.5)
    assert report["test"]["samples"] == 8 * 40 and report["test"]["top1"] > 90 > 100 * before
    assert report["test"]["few"] > 80  # the 5- and 9-image classes are learned too
    saved = torch.load(tmp_path / "classifier" / "w1_0.50" / "classifier.pt", weights_only=True)
    assert saved["weight"].shape == (8, 16) and saved["w1"] == 0.5
    capsys.readouterr()
    assert trainer.fit(0.5) == report
    assert "complete in" in capsys.readouterr().out
    changed = ClassifierTrainer(
        load_config(None, [f"output_dir={tmp_path}", "data.num_classes=8", "stage2.epochs=2", "seed=1"]),
        cache,
        initial,
    )
    assert changed.fit(0.5)["epochs"] == 2  # other settings: trained again, not reused


def test_sweep_and_evaluate_on_a_real_cache(cached_run, tiny_root, tmp_path):
    cached_run = shutil.copytree(cached_run, tmp_path / "run")
    args = cache_overrides(tiny_root, cached_run, "stage2.epochs=2")
    result = run_ffn("train-classifier", CONFIG, *args, "--sweep", "w1=0:1:0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    out = cached_run / "classifier"
    table = (out / "sweep.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["0.0", "0.5", "1.0"]
    assert (out / "sweep.png").stat().st_size > 1000
    sweep = json.loads((out / "sweep.json").read_text())
    assert [s["w1"] for s in sweep] == [0.0, 0.5, 1.0] and all(s["test"]["samples"] == 61 for s in sweep)
    again = run_ffn("train-classifier", CONFIG, *args, "--sweep", "w1=0:1:0.5")
    assert again.stdout.count("complete in") == 3
    evaluated = run_ffn("evaluate", CONFIG, *args, "--tsne")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((cached_run / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["CE", "KPS", "FFN (w1=0.5)"]
    assert report["methods"]["FFN (w1=0.5)"] == sweep[1]["test"]  # the configured w1 is the sweep's
    assert len(report["sweep"]) == 3 and len(report["train_counts"]) == 10
    for png in ("per_class.png", "tsne.png"):
        assert (cached_run / "report" / png).stat().st_size > 1000
    assert "| FFN (w1=0.5) |" in (cached_run / "report" / "report.md").read_text()


def test_evaluate_before_stage_2_says_what_to_run(stage1_run, tiny_root, tmp_path):
    out = shutil.copytree(stage1_run, tmp_path / "run")
    result = run_ffn("evaluate", CONFIG, *cache_overrides(tiny_root, out))
    assert result.returncode == 2
    said = "stages/classifier.json: stage classifier has not completed; run `ffn train-classifier`"
    assert said in result.stderr
    assert (
        not np.any([p.name == "report.json" for p in (out / "report").glob("*")])
        if (out / "report").exists()
        else True
    )


def test_the_written_out_step_equals_autograd_and_torch_sgd():
    """ClassifierStep against CosineHead + LDAMLoss + torch.optim.SGD, five steps, float64."""
    counts, dims = [50, 20, 8, 3], 16
    gen = torch.Generator().manual_seed(0)
    initial = torch.randn(len(counts), dims, generator=gen, dtype=torch.float64)
    heads = [CosineHead(dims, len(counts)).double() for _ in range(2)]
    for head in heads:
        head.weight.data.copy_(initial)
    loss = LDAMLoss(counts).double()
    optimizer = torch.optim.SGD(heads[0].parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    step = ClassifierStep(heads[1], loss, momentum=0.9, weight_decay=2e-4)
    for lr in (0.1, 0.08, 0.05, 0.02, 0.01):
        z = 0.5 * F.normalize(torch.randn(6, dims, generator=gen, dtype=torch.float64), dim=1)
        z = z + 0.5 * F.normalize(torch.randn(6, dims, generator=gen, dtype=torch.float64), dim=1)
        y = torch.randint(len(counts), (6,), generator=gen)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        expected = loss(heads[0](z, normalized=True), y)
        expected.backward()
        optimizer.step()
        assert float(step(z, y, lr)) == pytest.approx(expected.item(), rel=1e-12)
        assert torch.allclose(heads[1].weight, heads[0].weight, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(heads[1].weight, initial)  # the steps did move the weight


def test_the_classifier_trains_where_it_is_fastest():
    """auto: the CPU for CIFAR-sized classifiers (launch-bound on a GPU), a GPU for ImageNet-LT's."""
    from ffn_dist.stages.classifier import classifier_device

    assert classifier_device("auto", 10 * 64, cuda=True) == torch.device("cpu")
    assert classifier_device("auto", 1000 * 2048, cuda=True).type == "cuda"
    assert classifier_device("auto", 1000 * 2048, cuda=False) == torch.device("cpu")
    assert classifier_device("cpu", 1000 * 2048, cuda=True) == torch.device("cpu")
    assert classifier_device("cuda", 10, cuda=True).type == "cuda"
    with pytest.raises(FFNError, match="stage2.device=cuda: no CUDA device is visible"):
        classifier_device("cuda", 10, cuda=False)
