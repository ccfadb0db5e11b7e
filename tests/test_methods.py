"""Classifier methods on the cache, against their formulas, chosen on val and never on test."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffn_dist.cache.shards import write_shard
from ffn_dist.cache.store import open_cache, write_manifest
from ffn_dist.checkpoint import save_checkpoint
from ffn_dist.config import load_config
from ffn_dist.errors import FFNError
from ffn_dist.metrics import accuracy_report, top_k
from ffn_dist.run import branch_dir, stage_identity
from ffn_dist.stages.evaluate import collect_results
from ffn_dist.stages.methods import METHODS, Methods, Source, compare_methods, parse_methods, selection_split
from tests.conftest import CONFIG, cache_overrides, run_ffn

COUNTS = [200, 120, 70, 40, 25, 15, 9, 5]
DIMS = 16
FINGERPRINT = {"identity": "test", "inputs": {"test": True}}


def write_cache(directory, val_per_class=20, shuffle_test=False, seed=0, store="normalized"):
    """Noisy class centres per branch: long-tailed train (2 views), balanced val and test;
    `store` fused keeps only z at w1 = 0.5, as cache.store=fused does."""
    gen = torch.Generator().manual_seed(seed)
    classes = len(COUNTS)
    centres = {b: F.normalize(torch.randn(classes, DIMS, generator=gen), dim=1) for b in ("kps", "ce")}
    sizes = {
        "train": COUNTS,
        "test": [30] * classes,
        **({"val": [val_per_class] * classes} if val_per_class else {}),
    }
    splits = {}
    for name, per_class in sizes.items():
        labels = torch.repeat_interleave(torch.arange(classes), torch.tensor(per_class))
        parts = []
        for view in range(2 if name == "train" else 1):
            noise = {b: 0.6 * torch.randn(len(labels), DIMS, generator=gen) for b in centres}
            tensors = {b: F.normalize(centres[b][labels] + noise[b], dim=1).half() for b in centres}
            if store == "fused":
                tensors = {"fused": (0.5 * tensors["kps"].float() + 0.5 * tensors["ce"].float()).half()}
            shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))
            stored = labels[shuffled] if name == "test" and shuffle_test else labels
            tensors.update(labels=stored, indices=torch.arange(len(labels)))
            file = f"{name}/view{view}/part00000.safetensors"
            info = write_shard(directory / file, tensors, {"split": name, "view": str(view), "part": "0"})
            parts.append({**info, "file": file, "view": view})
        splits[name] = {"rows": len(labels) * len(parts), "parts": parts}
    fusion = {"w1": 0.5, "w2": 0.5} if store == "fused" else None
    write_manifest(
        directory,
        {
            "store": store,
            "dtype": "fp16",
            "dims": DIMS,
            "fusion": fusion,
            "fingerprint": FINGERPRINT,
            "splits": splits,
        },
    )
    return open_cache(directory, FINGERPRINT)


def config(tmp_path, *extra):
    return load_config(
        None, [f"output_dir={tmp_path}", "data.num_classes=8", "stage2.epochs=4", "seed=1", *extra]
    )


def fake_kps_head(cfg):
    """The final stage-1 KPS checkpoint FFN's classifier starts from (a random head)."""
    weight = F.normalize(torch.randn(len(COUNTS), DIMS, generator=torch.Generator().manual_seed(9)), dim=1)
    state = {"model": {"head.weight": weight}, "config_hash": stage_identity(cfg, "stage1")}
    save_checkpoint(branch_dir(cfg, "kps"), cfg.stage1.epochs, state, keep=1)


def by_hand(logits_of, cache, source, split="test"):
    rows = cache.splits[split].rows_of_view(0)
    features = cache.splits[split].fused(rows, source.w1, 1 - source.w1)
    return accuracy_report(
        cache.splits[split].labels[rows], top_k(logits_of(features)).numpy(), np.array(COUNTS)
    )


@pytest.fixture
def fitted(tmp_path):
    cache = write_cache(tmp_path / "cache")
    runner = Methods(config(tmp_path), cache, "val")
    source = Source("fused", 0.5)
    return cache, runner, source, runner.linear(source, "shuffle")


def test_tau_norm_and_logit_adjustment_are_their_closed_forms(fitted):
    cache, runner, source, (weight, bias) = fitted
    tau_norm = runner.run("tau_norm", source, (weight, bias))
    tau = tau_norm["chosen"]["tau"]
    assert tau in [round(0.1 * i, 1) for i in range(11)]
    normed = weight / weight.norm(dim=1, keepdim=True) ** tau
    assert tau_norm["test"] == by_hand(lambda z: z @ normed.t(), cache, source)
    adjusted = runner.run("logit_adjustment", source, (weight, bias))
    tau = adjusted["chosen"]["tau"]
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)).float()
    assert adjusted["test"] == by_hand(lambda z: z @ weight.t() + bias - tau * log_prior, cache, source)
    assert adjusted["val"] == by_hand(lambda z: z @ weight.t() + bias - tau * log_prior, cache, source, "val")


def test_lws_learns_only_per_class_scales(fitted):
    cache, runner, source, (weight, bias) = fitted
    before = weight.clone(), bias.clone()
    scales = runner.lws_scales(source, weight, bias)
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])  # the classifier is frozen
    assert scales.shape == (len(COUNTS),) and not torch.allclose(scales, torch.ones(len(COUNTS)))
    # class-balanced: the rarest classes gain against the most frequent
    assert scales[-1] > scales[0]


def test_crt_starts_from_a_fresh_random_classifier(fitted):
    cache, runner, source, erm = fitted
    torch.manual_seed(1)  # the config's seed
    fresh = torch.nn.Linear(DIMS, len(COUNTS))
    initial = runner.new_linear()
    assert torch.equal(initial[0], fresh.weight.detach()) and torch.equal(initial[1], fresh.bias.detach())
    crt = runner.linear(source, "balanced")
    assert not torch.allclose(crt[0], initial[0]) and not torch.allclose(crt[0], erm[0])  # trained apart


def test_ncm_is_cosine_to_the_class_means(fitted):
    cache, runner, source, _ = fitted
    train = cache.splits["train"]
    rows = train.rows_of_view(0)
    features, labels = train.fused(rows, 0.5, 0.5), torch.from_numpy(train.labels[rows])
    means = torch.stack([F.normalize(features[labels == c], dim=1).mean(0) for c in range(len(COUNTS))])
    expected = by_hand(lambda z: F.normalize(z, dim=1) @ F.normalize(means, dim=1).t(), cache, source)
    assert runner.run("ncm", source, None)["test"] == expected


def test_choices_are_blind_to_the_test_labels(tmp_path):
    chosen = []
    for shuffled in (False, True):
        directory = tmp_path / f"shuffled_{shuffled}"
        cfg = config(directory)
        fake_kps_head(cfg)
        cache = write_cache(directory / "cache", shuffle_test=shuffled)
        body = compare_methods(cfg, cache, ["ffn", "tau_norm", "logit_adjustment"], "val")
        chosen.append({(r["method"], r["features"]): r["chosen"] for r in body["rows"]})
    assert chosen[0] == chosen[1]
    assert chosen[0][("ffn", "fused")]["w1"] in [round(0.1 * i, 1) for i in range(11)]


def test_without_a_val_split_the_published_defaults_are_used_or_val_is_refused(tmp_path):
    cache = write_cache(tmp_path / "cache", val_per_class=0)
    assert selection_split(cache, "auto") is None and selection_split(cache, "defaults") is None
    with pytest.raises(FFNError, match="--select val: this run has no val split.*--val-per-class N"):
        selection_split(cache, "val")
    runner = Methods(config(tmp_path), cache, None)
    source = Source("fused", 0.5)
    assert runner.run("tau_norm", source, runner.linear(source, "shuffle"))["chosen"]["tau"] == 1.0
    assert runner.fused_w1() == 0.5  # the config's w1


def test_one_job_compares_every_method_on_every_source_and_reuses_finished_work(tmp_path, capsys):
    cfg = config(tmp_path)
    fake_kps_head(cfg)
    cache = write_cache(tmp_path / "cache")
    wanted = [m for m in METHODS if m != "joint"]  # joint reads stage 1's own reports
    body = compare_methods(cfg, cache, wanted, "auto")
    assert {(r["method"], r["features"]) for r in body["rows"]} == {
        (m, s) for m in wanted for s in ("ce", "kps", "fused")
    }
    assert all(r["chosen"]["selected_on"] == "val" and r["val"]["samples"] == 160 for r in body["rows"])
    best = body["best_on_val"]
    top = max(body["rows"], key=lambda r: r["val"]["top1"])
    assert (best["method"], best["features"]) == (top["method"], top["features"])
    out = tmp_path / "classifier" / "methods"
    assert "(best on val)" in (out / "methods.md").read_text() and (out / "methods.png").stat().st_size > 1000
    written = {p: p.stat().st_mtime_ns for p in out.glob("*_*.json")}
    capsys.readouterr()
    assert compare_methods(cfg, cache, wanted, "auto")["rows"] == body["rows"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*_*.json")} == written  # reused, not refit
    with pytest.raises(FFNError, match="--methods 'svm': expected all or a comma list"):
        parse_methods("svm")
    assert parse_methods("ncm,crt") == ["crt", "ncm"]


def test_methods_on_a_fused_cache_run_on_what_it_holds(tmp_path, capsys):
    cfg = config(tmp_path)
    fake_kps_head(cfg)
    cache = write_cache(tmp_path / "cache", store="fused")  # with a val split: once refused
    body = compare_methods(cfg, cache, list(METHODS), "auto")
    rows = {(r["method"], r["features"]) for r in body["rows"]}
    assert rows == {(m, "fused") for m in METHODS if m != "joint"}  # joint has no fused form
    assert all(r["chosen"].get("w1", 0.5) == 0.5 for r in body["rows"])  # the cached w1, not a sweep
    assert body["best_on_val"]["features"] == "fused"
    said = capsys.readouterr().out
    assert "only the fused embedding at w1=0.5" in said and "need cache.store: normalized" in said


def test_the_report_names_the_method_chosen_on_val(cached_run, tiny_root, tmp_path):
    run = shutil.copytree(cached_run, tmp_path / "run")
    args = cache_overrides(tiny_root, run, "stage2.epochs=1")
    compared = run_ffn("train-classifier", CONFIG, *args, "--methods", "all")
    assert compared.returncode == 0, compared.stderr[-3000:]
    body = json.loads((run / "classifier" / "methods" / "methods.json").read_text())
    assert body["selected_on"] is None and body["best_on_val"] is None  # the tiny run has no val split
    joint = {r["features"]: r for r in body["rows"] if r["method"] == "joint"}
    stage1 = json.loads((run / "stage1" / "kps" / "report.json").read_text())["test"]
    assert joint["kps"]["test"]["top1"] == pytest.approx(
        stage1["top1"], abs=1.7
    )  # the cosine head, fp16 cache
    assert joint["ce"]["note"] == "stage 1's own evaluation" and "fused" not in joint
    # with a choice made on val, `ffn evaluate` puts it beside CE, KPS and FFN
    body["best_on_val"] = {"method": "crt", "features": "fused"}
    (run / "classifier" / "methods" / "methods.json").write_text(json.dumps(body))
    assert run_ffn("train-classifier", CONFIG, *args).returncode == 0
    results = collect_results(load_config(CONFIG, args))
    crt = next(r for r in body["rows"] if (r["method"], r["features"]) == ("crt", "fused"))
    assert results["methods"]["crt on fused features (best on val)"] == crt["test"]
