"""Classifier methods on the cache, against their formulas, chosen on val and never on test."""

import json
import math
import shutil
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffn_dist.cache.shards import write_shard
from ffn_dist.cache.store import open_cache, write_manifest
from ffn_dist.checkpoint import checkpoint_state, save_checkpoint
from ffn_dist.config import load_config, with_settings
from ffn_dist.data.sampling import epoch_order
from ffn_dist.drivers import compare_methods, parse_methods, run_methods, sources
from ffn_dist.errors import FFNError
from ffn_dist.fusion import simplex_grid
from ffn_dist.metrics import logits_report
from ffn_dist.models.heads import LinearForm
from ffn_dist.registry import METHODS
from ffn_dist.run.paths import branch_dir, cache_dir, classifier_dir, final_checkpoint
from ffn_dist.run.stages import begin_stage, finish_stage, stage_identity
from ffn_dist.stages.classifier import candidates, fit_classifier, load_form, selection_split
from ffn_dist.stages.epochs import evaluate_cached
from ffn_dist.stages.evaluate import collect_results
from ffn_dist.stages.methods import (
    Fitting,
    fit_balanced_softmax,
    fit_crt,
    fit_disalign,
    fit_erm,
    fit_ldam_drw,
    fit_lws,
    fit_mislas,
    fit_weight_balancing,
)
from tests.conftest import CONFIG, cache_overrides, run_ffn

COUNTS = [200, 120, 70, 40, 25, 15, 9, 5]
EQUAL = {"ce": 0.5, "kps": 0.5}  # the fusion of config(): a file without one weighs its branches equally
DIMS = 16


def write_cache(directory, val_per_class=20, shuffle_test=False, seed=0, store="normalized"):
    """Noisy class centres per branch: long-tailed train (2 views), balanced val and test;
    `store` fused keeps only z at weights 0.5 and 0.5, as cache.store=fused does."""
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
    fusion = dict(EQUAL) if store == "fused" else None
    write_manifest(
        directory, {"store": store, "dtype": "fp16", "dims": DIMS, "fusion": fusion, "splits": splits}
    )
    return open_cache(directory)


def config(tmp_path, *extra):
    return load_config(
        None, [f"output_dir={tmp_path}", "data.num_classes=8", "stage2.epochs=4", "seed=1", *extra]
    )


KPS_HEAD = F.normalize(torch.randn(len(COUNTS), DIMS, generator=torch.Generator().manual_seed(9)), dim=1)


def synthetic_run(directory, demo_root, *extra, **cache):
    """A run whose stage 1 (a random KPS head) and cache (write_cache) are complete, as their
    records say: what the classifier stage and the drivers read."""
    cfg = config(directory, f"data.root={demo_root}", *extra)
    begin_stage(cfg, "stage1")
    for branch in ("ce", "kps"):
        state = checkpoint_state({"head.weight": KPS_HEAD}, stage_identity(cfg, "stage1"))
        save_checkpoint(branch_dir(cfg, branch), cfg.stage1.epochs, state, keep=1)
    finish_stage(cfg, "stage1", [final_checkpoint(cfg, b) for b in ("ce", "kps")])
    begin_stage(cfg, "cache")
    write_cache(cache_dir(cfg), **cache)
    finish_stage(cfg, "cache", [cache_dir(cfg) / "manifest.json"])
    return cfg, open_cache(cache_dir(cfg))


def by_hand(logits_of, cache, fusion=None, split="test", temperature=None):
    rows = cache.splits[split].rows_of_view(0)
    features = cache.splits[split].fused(rows, fusion or EQUAL)
    return logits_report(
        logits_of(features), cache.splits[split].labels[rows], np.array(COUNTS), 1.0, temperature
    )


def same_report(got: dict, expected: dict) -> bool:
    """Equal accuracies; calibration equal to float rounding (logits computed in other chunks)."""
    soft = ("calibration", "calibrated")
    assert {k: v for k, v in got.items() if k not in soft} == {
        k: v for k, v in expected.items() if k not in soft
    }
    for key in soft:
        assert (key in got) == (key in expected)
        if key in got:
            assert {k: got[key][k] for k in ("ece", "nll")} == pytest.approx(
                {k: expected[key][k] for k in ("ece", "nll")}
            )
            assert got[key]["reliability"]["count"] == expected[key]["reliability"]["count"]
    return True


@pytest.fixture
def fitted(tmp_path):
    """A Fitting on fused features at equal weights, and its erm classifier (what `point('erm')` gives)."""
    cache = write_cache(tmp_path / "cache")
    erm = {}
    f = Fitting(config(tmp_path), cache, lambda name: erm["form"], lambda: KPS_HEAD, verbose=False)
    erm["form"] = fit_erm(f)
    return cache, f, (erm["form"].weight, erm["form"].bias)


def hand_trained(f, parameters, loss, order, weight_decay=None, project=None):
    """The stage-2 recipe written out again, apart from the trainer: an epoch of as many draws
    as images, batches of stage2.batch_size, cosine decay, torch's SGD; `loss(z, y, epoch)`."""
    s2, train = f.cfg.stage2, f.cache.splits["train"]
    images = len(train.rows_of_view(0))
    steps = math.ceil(images / s2.batch_size)
    decay = s2.weight_decay if weight_decay is None else weight_decay
    optimizer = torch.optim.SGD(parameters, lr=s2.lr, momentum=s2.momentum, weight_decay=decay)
    for epoch in range(s2.epochs):
        draws = epoch_order(train.labels, order, f.cfg.seed, epoch)[:images]
        for step, begin in enumerate(range(0, images, s2.batch_size)):
            rows = draws[begin : begin + s2.batch_size]
            z, y = train.fused(rows, EQUAL), torch.from_numpy(train.labels[rows]).long()
            for group in optimizer.param_groups:
                group["lr"] = (
                    0.5 * s2.lr * (1 + math.cos(math.pi * (epoch * steps + step) / (s2.epochs * steps)))
                )
            optimizer.zero_grad()
            loss(z, y, epoch).backward()
            optimizer.step()
            if project is not None:
                with torch.no_grad():
                    project()


def picked(log_p, y):
    return log_p[torch.arange(len(y)), y]


def copies(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def close(a, b):
    return torch.allclose(a, b, atol=2e-4, rtol=1e-4)


N = torch.tensor(COUNTS, dtype=torch.float32)


def test_erm_and_balanced_softmax_are_their_losses_on_the_stage2_recipe(fitted):
    cache, f, erm = fitted
    w, b = copies(f.new_linear())
    hand_trained(f, [w, b], lambda z, y, _: -picked(torch.log_softmax(z @ w.t() + b, 1), y).mean(), "shuffle")
    assert close(erm[0], w) and close(erm[1], b)
    w, b = copies(f.new_linear())
    logits = lambda z: z @ w.t() + b  # noqa: E731
    hand_trained(
        f, [w, b], lambda z, y, _: -picked(torch.log_softmax(logits(z) + N.log(), 1), y).mean(), "shuffle"
    )
    form = fit_balanced_softmax(f)
    assert close(form.weight, w) and close(form.bias, b)
    scored = evaluate_cached(form, cache.splits["test"], EQUAL, COUNTS, f.device)
    assert same_report(
        scored, by_hand(lambda z: z @ form.weight.t() + form.bias, cache)
    )  # plain logits, no log n_y


def test_weight_balancing_is_the_class_balanced_loss_with_weight_decay_and_maxnorm(fitted):
    cache, f, erm = fitted
    cb = (1 - 0.9999) / (1 - 0.9999 ** N.double())
    cb = (cb * len(COUNTS) / cb.sum()).float()
    norms = erm[0].norm(dim=1)
    delta = norms.min() + 0.5 * (norms.max() - norms.min())
    w, b = copies(erm)

    def project():
        w.mul_(torch.clamp(delta / w.norm(dim=1), max=1.0)[:, None])

    loss = lambda z, y, _: (cb[y] * -picked(torch.log_softmax(z @ w.t() + b, 1), y)).mean()  # noqa: E731
    hand_trained(f, [w, b], loss, "shuffle", weight_decay=5e-3, project=project)
    form = fit_weight_balancing(f, weight_decay=5e-3, max_norm=0.5)
    assert close(form.weight, w) and close(form.bias, b)
    assert bool((form.weight.norm(dim=1) <= delta + 1e-5).all()) and bool((norms > delta).any())  # it bites


def test_mislas_smooths_each_class_by_its_count_with_class_balanced_sampling(fitted):
    cache, f, erm = fitted
    position = (N - N.min()) / (N.max() - N.min())
    epsilon = 0.0 + (0.4 - 0.0) * torch.sin(position * math.pi / 2)
    assert epsilon[0] == pytest.approx(0.4) and epsilon[-1] == 0.0  # the head's value, the tail's
    w, b = copies(erm)

    def loss(z, y, _):
        target = (1 - epsilon[y])[:, None] * F.one_hot(y, len(COUNTS)) + epsilon[y][:, None] / len(COUNTS)
        return -(target * torch.log_softmax(z @ w.t() + b, 1)).sum(1).mean()

    hand_trained(f, [w, b], loss, "balanced")
    form = fit_mislas(f, head=0.4, tail=0.0)
    assert close(form.weight, w) and close(form.bias, b)


def test_disalign_learns_magnitude_margin_and_gate_with_its_reweighting(fitted):
    cache, f, erm = fitted
    weight, bias = erm
    torch.manual_seed(f.cfg.seed)
    gate = torch.nn.Linear(DIMS, 1)
    g, g0 = copies([gate.weight.detach()[0], gate.bias.detach()[0]])
    scale, shift = copies([torch.ones(len(COUNTS)), torch.zeros(len(COUNTS))])
    share = N / N.sum()
    weights = share**-1.5
    weights = weights * len(COUNTS) / weights.sum()

    def logits(z):
        confidence = torch.sigmoid(z @ g + g0)[:, None]
        return (1 + confidence * scale) * (z @ weight.t() + bias) + confidence * shift

    def loss(z, y, _):
        ce = -picked(torch.log_softmax(logits(z), 1), y)
        return (weights[y] * ce).sum() / weights[y].sum()

    hand_trained(f, [g, g0, scale, shift], loss, "shuffle")
    form = fit_disalign(f, rho=1.5)
    assert close(form.gate_weight, g) and close(form.scale, scale) and close(form.shift, shift)
    assert torch.equal(form.weight, weight)  # erm stays frozen
    z = cache.splits["test"].fused(cache.splits["test"].rows_of_view(0), EQUAL)
    assert close(form(z), logits(z).detach())
    assert torch.equal(LinearForm.from_state(form.state())(z), form(z))  # what export saves and loads


def ffn_like(f, drw_from=None):
    """FFN's classifier written out: the KPS head, LDAM at s, optionally DRW from an epoch."""
    s2 = f.cfg.stage2
    w = KPS_HEAD.clone().requires_grad_()
    margins = N**-0.25
    margins = margins * 0.5 / margins.max()
    cb = (1 - 0.9999) / (1 - 0.9999 ** N.double())
    cb = (cb * len(COUNTS) / cb.sum()).float()

    def loss(z, y, epoch):
        cosine = z @ F.normalize(w, dim=1).t()
        ce = -picked(
            torch.log_softmax(s2.ldam_s * (cosine - margins[y][:, None] * F.one_hot(y, len(COUNTS))), 1), y
        )
        weights = cb[y] if drw_from is not None and epoch >= drw_from else torch.ones_like(ce)
        return (weights * ce).sum() / weights.sum()

    return w, loss


def test_ffn_is_ldam_on_the_cosine_head_from_the_kps_head_class_balanced(fitted):
    from ffn_dist.stages.methods import fit_ffn

    cache, f, _ = fitted
    w, loss = ffn_like(f)
    hand_trained(f, [w], loss, "balanced")
    form = fit_ffn(f)
    assert close(form.weight, F.normalize(w.detach(), dim=1)) and not close(form.weight, KPS_HEAD)


def test_ldam_drw_reweights_the_cosine_classifier_from_the_deferred_epoch(fitted):
    cache, f, _ = fitted
    deferred = int(0.8 * f.cfg.stage2.epochs)
    assert 0 < deferred < f.cfg.stage2.epochs
    w, loss = ffn_like(f, deferred)
    hand_trained(f, [w], loss, "shuffle")
    form = fit_ldam_drw(f)
    assert close(form.weight, F.normalize(w.detach(), dim=1))


def test_tau_norm_and_logit_adjustment_are_their_closed_forms_chosen_on_val(tmp_path, demo_root):
    cfg, cache = synthetic_run(tmp_path, demo_root)
    tau_cfg = with_settings(cfg, {"stage2.method": "tau_norm"})
    tau_norm = fit_classifier(tau_cfg, cache, freeze=False)
    erm = load_form(with_settings(cfg, {"stage2.method": "erm"}))  # the point tau_norm started from
    weight, bias = erm.weight, erm.bias

    def normed(tau):
        return weight / weight.norm(dim=1, keepdim=True) ** tau

    tau = tau_norm["chosen"]["tau"]
    assert tau in cfg.stage2.tau_norm.tau and tau_norm["chosen"]["selected_on"] == "val"
    fitted_t = tau_norm["temperature"]["value"]
    assert same_report(tau_norm["test"], by_hand(lambda z: z @ normed(tau).t(), cache, temperature=fitted_t))
    on_val = {c["tau"]: by_hand(lambda z, t=c["tau"]: z @ normed(t).t(), cache, split="val")["top1"]
              for c in candidates(tau_cfg, "val")}  # fmt: skip
    assert tau == min(t for t, score in on_val.items() if score == max(on_val.values()))  # first best
    adjusted = fit_classifier(with_settings(cfg, {"stage2.method": "logit_adjustment"}), cache, freeze=False)
    tau = adjusted["chosen"]["tau"]
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)).float()
    fitted_t = adjusted["temperature"]["value"]
    for split in ("test", "val"):
        expected = by_hand(
            lambda z: z @ weight.t() + bias - tau * log_prior, cache, split=split, temperature=fitted_t
        )
        assert same_report(adjusted[split], expected)


def test_lws_learns_only_per_class_scales(fitted):
    cache, f, (weight, bias) = fitted
    before = weight.clone(), bias.clone()
    form = fit_lws(f)
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])  # the classifier is frozen
    scales = (form.weight * weight).sum(1) / (weight * weight).sum(1)  # signed: a scale may flip a row
    assert torch.allclose(form.weight, weight * scales[:, None], atol=1e-6)  # rows only rescaled
    assert torch.allclose(form.bias, bias * scales, atol=1e-6)
    assert scales.shape == (len(COUNTS),) and not torch.allclose(scales, torch.ones(len(COUNTS)))
    # class-balanced: the rarest classes gain against the most frequent
    assert scales[-1] > scales[0]


def test_crt_starts_from_a_fresh_random_classifier(fitted):
    cache, f, erm = fitted
    torch.manual_seed(1)  # the config's seed
    fresh = torch.nn.Linear(DIMS, len(COUNTS))
    initial = f.new_linear()
    assert torch.equal(initial[0], fresh.weight.detach()) and torch.equal(initial[1], fresh.bias.detach())
    crt = fit_crt(f).weight
    assert not torch.allclose(crt, initial[0]) and not torch.allclose(crt, erm[0])  # trained apart


def test_ncm_is_cosine_to_the_class_means(fitted):
    from ffn_dist.stages.methods import fit_ncm

    cache, f, _ = fitted
    train = cache.splits["train"]
    rows = train.rows_of_view(0)
    features, labels = train.fused(rows, EQUAL), torch.from_numpy(train.labels[rows])
    means = torch.stack([F.normalize(features[labels == c], dim=1).mean(0) for c in range(len(COUNTS))])
    expected = by_hand(lambda z: F.normalize(z, dim=1) @ F.normalize(means, dim=1).t(), cache)
    assert same_report(evaluate_cached(fit_ncm(f), cache.splits["test"], EQUAL, COUNTS, f.device), expected)


def test_choices_are_blind_to_the_test_labels(tmp_path, demo_root):
    chosen = []
    for shuffled in (False, True):
        cfg, cache = synthetic_run(tmp_path / f"shuffled_{shuffled}", demo_root, shuffle_test=shuffled)
        body = compare_methods(cfg, cache, ["ffn", "tau_norm", "logit_adjustment"])
        chosen.append({(r["method"], r["features"]): (r["fusion"], r["chosen"]) for r in body["rows"]})
    assert chosen[0] == chosen[1]
    assert chosen[0][("ffn", "fused")][0] in simplex_grid(["ce", "kps"], 0.1)
    assert chosen[0][("tau_norm", "kps")][0] == {"ce": 0.0, "kps": 1.0}  # a branch alone


def test_without_a_val_split_the_published_defaults_are_used_or_val_is_refused(tmp_path, demo_root):
    cfg, cache = synthetic_run(tmp_path, demo_root, val_per_class=0)
    has_val = "val" in cache.splits
    assert not has_val and selection_split(cfg, has_val) is None
    assert selection_split(with_settings(cfg, {"stage2.select": "defaults"}), has_val) is None
    with pytest.raises(FFNError, match="stage2.select=val: this run has no val split.*--val-per-class N"):
        selection_split(with_settings(cfg, {"stage2.select": "val"}), has_val)
    result = fit_classifier(with_settings(cfg, {"stage2.method": "tau_norm"}), cache, freeze=False)
    assert result["chosen"] == {"tau": 1.0, "selected_on": "published defaults"} and result["val"] is None
    wb = candidates(with_settings(cfg, {"stage2.method": "weight_balancing"}), None)
    assert wb == [{"weight_decay": 0.1, "max_norm": 0.1}]
    one = with_settings(cfg, {"stage2.method": "tau_norm", "stage2.tau_norm.tau": [0.5]})
    assert candidates(one, None) == [{"tau": 0.5}]  # a grid of one value is used as it is
    assert sources(cfg, cache) == [  # each branch alone, then the config's fusion
        ("ce", {"ce": 1.0, "kps": 0.0}),
        ("kps", {"ce": 0.0, "kps": 1.0}),
        ("fused", EQUAL),
    ]


def test_one_job_compares_every_method_on_every_source_and_reuses_finished_work(tmp_path, demo_root, capsys):
    cfg, cache = synthetic_run(tmp_path, demo_root)
    body = compare_methods(cfg, cache, list(METHODS))
    assert {(r["method"], r["features"]) for r in body["rows"]} == {
        (m, s) for m in METHODS for s in ("ce", "kps", "fused")
    }
    assert all(r["chosen"]["selected_on"] == "val" and r["val"]["samples"] == 160 for r in body["rows"])
    best = body["best_on_val"]
    top = max(body["rows"], key=lambda r: r["val"]["top1"])
    assert (best["method"], best["features"]) == (top["method"], top["features"])
    out = tmp_path / "classifier" / "methods"
    assert "(best on val)" in (out / "methods.md").read_text() and (out / "methods.png").stat().st_size > 1000
    records = sorted((tmp_path / "stages" / "classifier").rglob("*.json"))
    points = {(r["method"], tuple(r["fusion"].items())) for r in body["rows"]}
    points |= {("ffn", tuple(p.items())) for p in simplex_grid(list(EQUAL), 0.1)}  # FFN's sweep
    assert len(records) == len(points)  # a record per point (val may choose a corner: one point)
    written = {p: p.stat().st_mtime_ns for p in records}
    capsys.readouterr()
    assert compare_methods(cfg, cache, list(METHODS))["rows"] == body["rows"]
    assert {p: p.stat().st_mtime_ns for p in records} == written  # reused, not refit
    assert "runs again" not in capsys.readouterr().out
    changed = with_settings(cfg, {"stage2.tau_norm.tau": [0.0, 1.0]})
    compare_methods(changed, cache, ["tau_norm"])
    said = capsys.readouterr().out
    assert "classifier tau_norm/ce1.00_kps0.00: runs again (stale: stage2.tau_norm.tau:" in said
    with pytest.raises(FFNError, match="--methods 'svm': expected all or a comma list"):
        parse_methods("svm")
    assert parse_methods("ncm,crt") == ["crt", "ncm"]


def test_methods_on_a_fused_cache_run_on_what_it_holds(tmp_path, demo_root, capsys):
    cfg, cache = synthetic_run(tmp_path, demo_root, store="fused")  # with a val split: once refused
    body = compare_methods(cfg, cache, list(METHODS))
    assert {(r["method"], r["features"]) for r in body["rows"]} == {(m, "fused") for m in METHODS}
    assert all(r["fusion"] == EQUAL for r in body["rows"])  # the cached fusion, not a sweep
    assert body["best_on_val"]["features"] == "fused"
    said = capsys.readouterr().out
    assert "only the fused embedding at ce 0.5, kps 0.5" in said and "need cache.store: normalized" in said


def test_the_report_names_the_method_chosen_on_val(cached_run, tiny_root, tmp_path):
    run = shutil.copytree(cached_run, tmp_path / "run")
    args = cache_overrides(tiny_root, run, "stage2.epochs=1")
    compared = run_ffn("train-classifier", CONFIG, *args, "--methods", "all")
    assert compared.returncode == 0, compared.stderr[-3000:]
    body = json.loads((run / "classifier" / "methods" / "methods.json").read_text())
    assert body["selected_on"] is None and body["best_on_val"] is None  # the tiny run has no val split
    assert {r["method"] for r in body["rows"]} == set(METHODS)
    # with a choice made on val, `ffn evaluate` puts it beside CE, KPS and FFN
    body["best_on_val"] = {"method": "crt", "features": "fused"}
    (run / "classifier" / "methods" / "methods.json").write_text(json.dumps(body))
    results = collect_results(load_config(CONFIG, args))
    crt = next(r for r in body["rows"] if (r["method"], r["features"]) == ("crt", "fused"))
    assert results["methods"]["crt on fused features (best on val)"] == crt["test"]
    seeds = run_ffn("train-classifier", CONFIG, *args, "--methods", "ncm,crt", "--seeds", "2")
    assert seeds.returncode == 0, seeds.stderr[-3000:]
    summary = json.loads((run / "classifier" / "methods" / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and all(len(r["test"]["top1"]["values"]) == 2 for r in summary["rows"])
    assert (run / "stages" / "classifier" / "crt" / "kps0.50_ce0.50_seed1.json").is_file()  # a point's record
    alone = run_ffn("train-classifier", CONFIG, *args, "--seeds", "2")
    assert alone.returncode != 0 and "error: --seeds: repeats --methods" in alone.stderr


def test_methods_over_seeds_give_mean_std_and_leave_the_stage_alone(tmp_path, demo_root):
    cfg, cache = synthetic_run(tmp_path, demo_root)
    wanted = ["ffn", "crt", "ncm"]
    fit_classifier(cfg, cache)  # the stage: FFN at the configured fusion
    stage = {p: p.stat().st_mtime_ns for p in classifier_dir(cfg).iterdir()}
    single = compare_methods(cfg, cache, wanted)
    summary = run_methods(cfg, wanted, 3)
    assert summary["seeds"] == [1, 2, 3]
    rows = {(r["method"], r["features"]): r for r in summary["rows"]}
    crt = rows[("crt", "fused")]["test"]["top1"]
    first = next(r for r in single["rows"] if (r["method"], r["features"]) == ("crt", "fused"))
    assert crt["values"][0] == first["test"]["top1"]  # the run's own seed: reused
    assert crt["mean"] == pytest.approx(statistics.fmean(crt["values"]))
    assert crt["std"] == pytest.approx(statistics.stdev(crt["values"]))
    ncm = rows[("ncm", "ce")]["test"]["top1"]  # on one branch's features: the same on every seed
    assert ncm["std"] == 0 and len(set(ncm["values"])) == 1  # no seed in class means
    ffn = rows[("ffn", "fused")]["test"]["top1"]["values"]
    assert rows[("crt", "fused")]["vs_ffn"]["values"] == [
        c - f for c, f in zip(crt["values"], ffn, strict=True)
    ]
    out = tmp_path / "classifier" / "methods"
    assert (out / "seed3" / "methods.json").is_file() and list(
        (tmp_path / "classifier" / "crt").glob("*_seed3")
    )
    assert {p: p.stat().st_mtime_ns for p in stage} == stage  # the classifier stage's own files
    table = (out / "seeds.md").read_text()
    assert "±" in table and "top-1 per seed" in table and "against FFN" in table
