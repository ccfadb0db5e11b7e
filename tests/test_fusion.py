"""Fusion weights on the simplex: refused off it, swept over it, and a branch weighted 0 left
out exactly, so a fusion of some of a run's branches is the fusion of those branches alone."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffn_dist.cache.shards import write_shard
from ffn_dist.cache.store import open_cache, write_manifest
from ffn_dist.checkpoint import checkpoint_state, save_checkpoint
from ffn_dist.config import head_branch, load_config
from ffn_dist.errors import FFNError
from ffn_dist.fusion import DIGITS, along, check_weights, fusion_slug, simplex_grid, weighed
from ffn_dist.models.heads import FusedClassifier, LinearForm
from ffn_dist.run.paths import branch_dir, cache_dir, classifier_form, final_checkpoint
from ffn_dist.run.stages import begin_stage, finish_stage, stage_identity
from ffn_dist.stages.classifier import fit_classifier

COUNTS = [60, 40, 25, 15, 9, 6, 4, 3]
DIMS = 16
THREE = {"ce": {"loss": "ce", "head": "linear"}, "kps": {"loss": "kps", "head": "cosine"}}
THREE["bs"] = {"loss": "balanced_softmax", "head": "cosine"}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"kps": 0.7, "ce": 0.5}, r"must sum to 1, got 0.7 \+ 0.5 = 1.2 \(kps, ce\)"),
        ({"kps": 1.2, "ce": -0.2}, r"must be >= 0, got ce: -0.2"),
        ({}, "expected a weight per branch, got none"),
    ],
)
def test_weights_off_the_simplex_are_refused(weights, message):
    with pytest.raises(FFNError, match=message):
        check_weights(weights)


@pytest.mark.parametrize(("branches", "step"), [(2, 0.1), (3, 0.1), (3, 0.25), (4, 0.5)])
def test_the_simplex_grid_visits_each_point_once_on_the_simplex(branches, step):
    names = [f"b{i}" for i in range(branches)]
    grid = simplex_grid(names, step)
    parts = round(1 / step)
    assert len(grid) == math.comb(parts + branches - 1, branches - 1)  # stars and bars
    assert len({tuple(p.values()) for p in grid}) == len(grid)
    for point in grid:
        assert list(point) == names and min(point.values()) >= 0
        assert sum(point.values()) == pytest.approx(1.0, abs=1e-9)
        assert all(round(w / step, 6).is_integer() for w in point.values())
    assert [p["b0"] for p in grid] == sorted(p["b0"] for p in grid)  # the first weight rises slowest


def test_a_sweep_along_one_weight_and_the_branches_a_fusion_weighs():
    assert along({"kps": 0.5, "ce": 0.5}, "ce", [0.0, 0.3]) == [
        {"kps": 1.0, "ce": 0.0},
        {"kps": 0.7, "ce": 0.3},
    ]
    assert weighed({"ce": 0.4, "kps": 0.0, "bs": 0.6}) == {"ce": 0.4, "bs": 0.6}


def unit(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, DIMS, generator=torch.Generator().manual_seed(seed)), dim=1)


def embeddings() -> dict:
    """Each branch's embeddings of each split: noisy class centres, a branch apart from another."""
    out = {}
    for number, (split, per_class, views) in enumerate((("train", COUNTS, 2), ("test", [20] * 8, 1))):
        labels = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(per_class))
        out[split] = {"labels": labels, "views": views}
        for b, name in enumerate(THREE):
            centres = unit(len(COUNTS), 100 + b)
            noisy = [centres[labels] + 0.7 * unit(len(labels), 10 * number + 3 * b + v) for v in range(views)]
            out[split][name] = [F.normalize(x, dim=1).half() for x in noisy]
    return out


def write_run(directory, demo_root, names: list[str], fusion: dict):
    """A run of the branches `names` whose stage 1 (each branch its own random head) and cache
    (`embeddings`, those branches only) are complete, as their records say."""
    branches = {name: THREE[name] for name in names}
    cfg = load_config(
        None,
        [
            f"output_dir={directory}",
            f"data.root={demo_root}",
            "data.num_classes=8",
            "stage2.epochs=3",
            "seed=1",
            f"branches={branches}",
            f"stage2.fusion={fusion}",
        ],
    )
    begin_stage(cfg, "stage1")
    for name in names:
        head = unit(len(COUNTS), 200 + list(THREE).index(name))
        state = checkpoint_state({"head.weight": head}, stage_identity(cfg, "stage1"))
        save_checkpoint(branch_dir(cfg, name), cfg.stage1.epochs, state, keep=1)
    finish_stage(cfg, "stage1", [final_checkpoint(cfg, name) for name in names])
    begin_stage(cfg, "cache")
    splits = {}
    for split, data in embeddings().items():
        parts = []
        for view in range(data["views"]):
            tensors = {name: data[name][view] for name in names}
            tensors.update(labels=data["labels"], indices=torch.arange(len(data["labels"])))
            file = f"{split}/view{view}/part00000.safetensors"
            info = write_shard(
                cache_dir(cfg) / file, tensors, {"split": split, "view": str(view), "part": "0"}
            )
            parts.append({**info, "file": file, "view": view})
        splits[split] = {"rows": sum(len(data["labels"]) for _ in parts), "parts": parts}
    write_manifest(
        cache_dir(cfg),
        {"store": "normalized", "dtype": "fp16", "dims": DIMS, "fusion": None, "splits": splits},
    )
    finish_stage(cfg, "cache", [cache_dir(cfg) / "manifest.json"])
    return cfg, open_cache(cache_dir(cfg))


def test_a_slug_names_every_weight_that_digits_keeps_and_the_old_names_stay():
    assert fusion_slug({"kps": 0.5, "ce": 0.5}) == "kps0.50_ce0.50"  # the name records already have
    assert fusion_slug({"kps": 1.0, "ce": 0.0}) == "kps1.00_ce0.00"
    assert fusion_slug({"kps": 0.505, "ce": 0.495}) == "kps0.505_ce0.495"
    assert fusion_slug({"a": 0.7000000000000001, "b": 0.3}) == "a0.70_b0.30"
    smallest = 10.0**-DIGITS
    points = [round(0.5 + i * smallest, DIGITS) for i in range(50)]
    assert len({fusion_slug({"a": w, "b": round(1 - w, DIGITS)}) for w in points}) == 50


def test_a_branch_weighted_zero_is_left_out_of_z_exactly(tmp_path, demo_root):
    _, cache = write_run(tmp_path, demo_root, list(THREE), {"ce": 0.3, "kps": 0.0, "bs": 0.7})
    train = cache.splits["train"]
    rows = torch.arange(len(train)).numpy()
    assert train.needed({"ce": 0.3, "kps": 0.0, "bs": 0.7}) == ("ce", "bs")  # kps is not even read
    stored = train.gather(rows)
    # the same operations with the term of weight 0 in them: it adds exactly nothing
    every_term = stored["ce"].float().mul_(0.3).add_(stored["kps"], alpha=0.0).add_(stored["bs"], alpha=0.7)
    assert torch.equal(train.fused(rows, {"ce": 0.3, "kps": 0.0, "bs": 0.7}), every_term)


def test_a_fusion_that_weighs_a_branch_zero_trains_the_classifier_of_the_others_alone(tmp_path, demo_root):
    three, cache3 = write_run(tmp_path / "three", demo_root, list(THREE), {"ce": 0.4, "kps": 0.0, "bs": 0.6})
    pair, cache2 = write_run(tmp_path / "pair", demo_root, ["ce", "bs"], {"ce": 0.4, "bs": 0.6})
    # the classifier starts from a cosine head the fusion weighs: bs's, not kps's, which comes first
    assert head_branch(three) == head_branch(pair) == "bs"
    fitted3, fitted2 = fit_classifier(three, cache3), fit_classifier(pair, cache2)
    assert fitted3["test"] == fitted2["test"] and fitted3["temperature"] == fitted2["temperature"]
    weights = [torch.load(classifier_form(cfg))["weight"] for cfg in (three, pair)]
    assert torch.equal(*weights)


def test_the_classifier_starts_from_a_cosine_head_a_weighed_branch_has(tmp_path):
    def cfg(fusion):
        return load_config(None, [f"branches={THREE}", f"stage2.fusion={fusion}"])

    assert head_branch(cfg({"ce": 0.5, "kps": 0.5, "bs": 0.0})) == "kps"
    assert head_branch(cfg({"ce": 0.5, "kps": 0.0, "bs": 0.5})) == "bs"
    assert head_branch(cfg({"ce": 1.0, "kps": 0.0, "bs": 0.0})) == "kps"  # none weighed: the first cosine
    linear = load_config(None, ["branches={ce: {}, lt: {loss: logit_adjusted}}"])
    assert head_branch(linear) == "ce"  # no cosine head at all: the first branch's


def test_the_fused_classifier_holds_only_the_backbones_it_weighs():
    torch.manual_seed(0)
    backbones = {name: nn.Sequential(nn.Flatten(), nn.Linear(12, DIMS)) for name in THREE}
    head = LinearForm.cosine(unit(len(COUNTS), 5))
    three = FusedClassifier(backbones, {"ce": 0.4, "kps": 0.0, "bs": 0.6}, head)
    pair = FusedClassifier({n: backbones[n] for n in ("ce", "bs")}, {"ce": 0.4, "bs": 0.6}, head)
    assert list(three.backbones) == ["ce", "bs"]  # kps's backbone is not in the model
    images = torch.randn(5, 3, 2, 2)
    assert torch.equal(three(images), pair(images))
    with pytest.raises(FFNError, match="must sum to 1"):
        FusedClassifier(backbones, {"ce": 0.4, "kps": 0.4, "bs": 0.4}, head)
