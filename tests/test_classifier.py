"""Stage 2: the configured classifier on a cache, its record, the fusion sweep, the report."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffn_dist.config import with_settings
from ffn_dist.drivers import parse_sweep
from ffn_dist.errors import FFNError
from ffn_dist.fusion import weight_text
from ffn_dist.losses import LDAMLoss
from ffn_dist.models.heads import CosineHead
from ffn_dist.run.paths import classifier_dir
from ffn_dist.stages.classifier import fit_classifier, load_form
from ffn_dist.stages.epochs import CosineStep
from tests.conftest import CONFIG, cache_overrides, run_ffn
from tests.test_methods import KPS_HEAD, synthetic_run

PAIR = {"kps": 0.5, "ce": 0.5}


def test_parse_sweep_along_one_weight_over_a_grid_and_its_refusals():
    along = [{"kps": round(0.1 * i, 6), "ce": round(1 - 0.1 * i, 6)} for i in range(11)]
    assert parse_sweep("kps=0:1:0.1", PAIR) == along
    assert parse_sweep("ce=0.9,0.5", PAIR) == [{"kps": 0.5, "ce": 0.5}, {"kps": 0.1, "ce": 0.9}]
    # Python floats: a numpy scalar in a saved classifier once failed a weights-only load
    assert all(type(w) is float for point in parse_sweep("kps=0:1:0.1", PAIR) for w in point.values())
    assert parse_sweep("grid=0.5", PAIR) == along[::5]  # two branches: the grid is the line
    three = {"ce": 0.4, "kps": 0.4, "bs": 0.2}
    grid = parse_sweep("grid=0.25", three)
    assert len(grid) == 15 and len({tuple(p.values()) for p in grid}) == 15  # C(4 + 2, 2) points, each once
    assert all(list(p) == ["ce", "kps", "bs"] and abs(sum(p.values()) - 1) < 1e-9 for p in grid)
    assert {"ce": 0.25, "kps": 0.25, "bs": 0.5} in grid and {"ce": 0.0, "kps": 0.0, "bs": 1.0} in grid
    for bad, fusion, message in [
        ("w1=0:1:0.1", PAIR, r"expected grid=STEP or, for two branches, BRANCH=START:STOP:STEP .* kps, ce\)"),
        ("kps=1:0:0.1", PAIR, "STOP >= START"),
        ("kps=0:1:x", PAIR, "expected grid=STEP"),
        ("kps=0:2:0.5", PAIR, "every weight must be in"),
        ("grid=0.3", PAIR, "a simplex grid's step must divide 1"),
        ("kps=0:1:0.5", three, "a sweep along one weight needs two branches"),
    ]:
        with pytest.raises(FFNError, match=message):
            parse_sweep(bad, fusion)


def test_the_classifier_learns_the_cache_and_its_record_says_when_it_is_current(tmp_path, demo_root, capsys):
    cfg, cache = synthetic_run(tmp_path, demo_root, "stage2.epochs=6")
    rows = cache.splits["test"].rows_of_view(0)
    z = cache.splits["test"].fused(rows, PAIR)
    before = (
        100 * (F.normalize(z, dim=1) @ KPS_HEAD.t()).argmax(1).numpy() == cache.splits["test"].labels[rows]
    )
    result = fit_classifier(cfg, cache)
    assert result["test"]["samples"] == 8 * 30 and result["test"]["top1"] > 50 > 20 + before.mean()
    assert result["test"]["few"] > 40  # the 5- and 9-image classes are learned too
    form = load_form(cfg)
    assert form.weight.shape == (8, 16) and torch.allclose(form.weight.norm(dim=1), torch.ones(8))  # cosine
    predicted = form(z).argmax(1).numpy()
    assert 100 * (predicted == cache.splits["test"].labels[rows]).mean() == pytest.approx(
        result["test"]["top1"]
    )
    # a config file without a fusion weighs its branches equally, in their order
    record = json.loads((tmp_path / "stages" / "classifier" / "ffn" / "ce0.50_kps0.50.json").read_text())
    assert record["status"] == "complete" and set(record["outputs"]) == {
        "classifier/ffn/ce0.50_kps0.50/classifier.pt",
        "classifier/ffn/ce0.50_kps0.50/result.json",
    }
    capsys.readouterr()
    written = (classifier_dir(cfg) / "classifier.pt").stat().st_mtime_ns
    assert fit_classifier(cfg, cache) == result
    assert "classifier ffn/ce0.50_kps0.50: complete, skipped" in capsys.readouterr().out
    assert (classifier_dir(cfg) / "classifier.pt").stat().st_mtime_ns == written
    changed = with_settings(cfg, {"stage2.epochs": 2})
    assert fit_classifier(changed, cache)["epochs"] == 2  # other settings: trained again, saying why
    assert "runs again (stale: stage2.epochs: 6 when it ran, 2 now)" in capsys.readouterr().out
    # a record of a release whose result.json held no calibration: trained again, saying why
    path = tmp_path / "stages" / "classifier" / "ffn" / "ce0.50_kps0.50.json"
    older = json.loads(path.read_text())
    del older["inputs"]["outputs version"]
    path.write_text(json.dumps(older))
    assert "temperature" in fit_classifier(changed, cache)
    assert "runs again (stale: outputs version: None when it ran, 2 now)" in capsys.readouterr().out


def test_sweep_and_evaluate_on_a_real_cache(cached_run, tiny_root, tmp_path):
    cached_run = shutil.copytree(cached_run, tmp_path / "run")
    args = cache_overrides(tiny_root, cached_run, "stage2.epochs=2")
    result = run_ffn("train-classifier", CONFIG, *args, "--sweep", "kps=0:1:0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    out = cached_run / "classifier"
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].split("|")[1:3] == [" kps ", " ce "]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["0.00", "0.50", "1.00"]
    assert (out / "sweep.png").stat().st_size > 1000
    sweep = json.loads((out / "sweep.json").read_text())
    assert [s["fusion"]["kps"] for s in sweep] == [0.0, 0.5, 1.0]
    assert all(s["test"]["samples"] == 61 for s in sweep)
    records = sorted(p.name for p in (cached_run / "stages" / "classifier" / "ffn").iterdir())
    # the sweep's points are records
    assert records == ["kps0.00_ce1.00.json", "kps0.50_ce0.50.json", "kps1.00_ce0.00.json"]
    again = run_ffn("train-classifier", CONFIG, *args, "--sweep", "kps=0:1:0.5")
    assert again.stdout.count("complete, skipped") == 4  # the stage itself, then its 3 points
    evaluated = run_ffn("evaluate", CONFIG, *args, "--tsne")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((cached_run / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["CE", "KPS", "FFN (kps 0.5, ce 0.5)"]
    assert report["methods"]["FFN (kps 0.5, ce 0.5)"] == sweep[1]["test"]  # the configured one is the sweep's
    assert report["classifier"] == {
        "method": "ffn",
        "fusion": PAIR,
        "temperature": {
            "value": None,
            "fitted": "not fitted: the run has no val split (data.val_split is null)",
        },
    }
    assert len(report["sweep"]) == 3 and len(report["train_counts"]) == 10
    for png in ("per_class.png", "tsne.png"):
        assert (cached_run / "report" / png).stat().st_size > 1000
    assert "| FFN (kps 0.5, ce 0.5) |" in (cached_run / "report" / "report.md").read_text()


def test_a_sweep_finer_than_two_decimals_has_a_record_and_a_row_per_point(cached_run, tiny_root, tmp_path):
    """Weights that differ past the second decimal once shared one directory (kps0.50_ce0.50
    for 0.5, 0.505 and 0.51...), so the points shared records and results, and the table
    showed one point's figures under another's weights."""
    cached_run = shutil.copytree(cached_run, tmp_path / "run")
    args = cache_overrides(tiny_root, cached_run, "stage2.epochs=1")
    result = run_ffn("train-classifier", CONFIG, *args, "--sweep", "kps=0.5:0.52:0.005")
    assert result.returncode == 0, result.stderr[-3000:]
    records = sorted(p.stem for p in (cached_run / "stages" / "classifier" / "ffn").iterdir())
    kps = ["0.50", "0.505", "0.51", "0.515", "0.52"]
    ce = ["0.50", "0.495", "0.49", "0.485", "0.48"]
    assert records == sorted(f"kps{k}_ce{c}" for k, c in zip(kps, ce, strict=True))
    table = (cached_run / "classifier" / "sweep.md").read_text().splitlines()[2:]
    rows = [[f" {k} ", f" {c} "] for k, c in zip(kps, ce, strict=True)]
    assert [row.split("|")[1:3] for row in table] == rows
    for point in json.loads((cached_run / "classifier" / "sweep.json").read_text()):
        slug = f"kps{weight_text(point['fusion']['kps'])}_ce{weight_text(point['fusion']['ce'])}"
        own = json.loads((cached_run / "classifier" / "ffn" / slug / "result.json").read_text())
        assert own["fusion"] == point["fusion"] and own["test"] == point["test"]


def test_evaluate_before_stage_2_says_what_to_run(stage1_run, tiny_root, tmp_path):
    out = shutil.copytree(stage1_run, tmp_path / "run")
    result = run_ffn("evaluate", CONFIG, *cache_overrides(tiny_root, out))
    assert result.returncode == 2
    said = "stages/classifier/ffn/kps0.50_ce0.50.json: stage classifier ffn/kps0.50_ce0.50 has not completed;"
    said += " "
    assert said + "run `ffn train-classifier`" in result.stderr
    assert (
        not np.any([p.name == "report.json" for p in (out / "report").glob("*")])
        if (out / "report").exists()
        else True
    )


def test_the_classifier_trains_where_it_is_fastest():
    """auto: the CPU for CIFAR-sized classifiers (launch-bound on a GPU), a GPU for ImageNet-LT's."""
    from ffn_dist.stages.epochs import classifier_device

    assert classifier_device("auto", 10 * 64, cuda=True) == torch.device("cpu")
    assert classifier_device("auto", 1000 * 2048, cuda=True).type == "cuda"
    assert classifier_device("auto", 1000 * 2048, cuda=False) == torch.device("cpu")
    assert classifier_device("cpu", 1000 * 2048, cuda=True) == torch.device("cpu")
    assert classifier_device("cuda", 10, cuda=True).type == "cuda"
    with pytest.raises(FFNError, match="stage2.device=cuda: no CUDA device is visible"):
        classifier_device("cuda", 10, cuda=False)


def test_the_written_out_step_equals_autograd_and_torch_sgd():
    """CosineStep against CosineHead + LDAMLoss + torch.optim.SGD, five steps, float64."""
    counts, dims = [50, 20, 8, 3], 16
    gen = torch.Generator().manual_seed(0)
    initial = torch.randn(len(counts), dims, generator=gen, dtype=torch.float64)
    heads = [CosineHead(dims, len(counts)).double() for _ in range(2)]
    for head in heads:
        head.weight.data.copy_(initial)
    loss = LDAMLoss(counts).double()
    optimizer = torch.optim.SGD(heads[0].parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    step = CosineStep(heads[1], loss, momentum=0.9, weight_decay=2e-4)
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
