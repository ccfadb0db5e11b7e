"""`ffn export CONFIG [--method NAME] [--w1 X]`: the trained FFN classifier as one model that
runs outside this project.

Writes `output_dir/export/`:
  model.onnx  the whole classifier as one graph, from a normalised image batch (NCHW float32,
              any batch size) to logits: both backbones, their unit embeddings, the fusion at
              w1 and the stage-2 classifier (or a `--methods` classifier of fused features).
              Runs with ONNX Runtime alone.
  model.pt2   the same model as a `torch.export` program: `torch.export.load(path).module()`
              runs it with torch alone, without this package.
  model.json  class names in logit order, the eval preprocessing, the training class counts
              and shot groups, the method and w1, the run's config identity and the test
              accuracy the run reported for this classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ffn_dist.config import Config
from ffn_dist.data.splits import shot_groups
from ffn_dist.errors import FFNError
from ffn_dist.models import FusedClassifier, LinearForm
from ffn_dist.run import (
    classifier_dir,
    config_id,
    methods_dir,
    run_dir,
    split_file,
    stage_identity,
    stage_inputs,
    stage_state,
    write_json,
    writing,
)
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.cache import load_frozen, open_run_cache
from ffn_dist.stages.classifier import at_w1
from ffn_dist.stages.methods import METHODS, Source, method_identity

FORMAT = 1


class ExportRefused(FFNError):
    pass


def export_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "export"


def class_names(cfg: Config) -> list[str]:
    """`classes.txt` beside the training split (as `ffn splits make-lt` writes it), one name
    per line in label order; else the labels themselves."""
    path = split_file(cfg, "train").parent / "classes.txt"
    if not path.is_file():
        return [str(label) for label in range(cfg.data.num_classes)]
    names = path.read_text().splitlines()
    if len(names) != cfg.data.num_classes:
        raise ExportRefused(
            f"{path}: {len(names)} class names, expected data.num_classes={cfg.data.num_classes}"
        )
    return names


def ffn_classifier(cfg: Config, w1: float) -> tuple[LinearForm, dict]:
    """FFN's stage-2 classifier at w1, refused unless it was trained on this run's cache."""
    directory = classifier_dir(cfg, w1)
    if not (directory / "report.json").is_file():
        raise ExportRefused(
            f"{directory}: no complete classifier for w1={w1:g}; run `ffn train-classifier` "
            f"(with --sweep w1={w1:g} for another w1) first"
        )
    report = json.loads((directory / "report.json").read_text())
    cache = open_run_cache(cfg)
    inputs = stage_inputs(at_w1(cfg, w1), "classifier", upstream={"cache": cache.cache_id})
    if report.get("identity") != stage_identity(cfg, "classifier", inputs):
        raise ExportRefused(
            f"{directory}: trained from other settings or another cache; run `ffn train-classifier` again"
        )
    weight = torch.load(directory / "classifier.pt", weights_only=True)["weight"]
    return LinearForm.cosine(weight), report["test"]


def method_classifier(cfg: Config, method: str, w1: float | None) -> tuple[LinearForm, dict, float]:
    """A classifier `ffn train-classifier --methods` fitted on fused features."""
    row_path = methods_dir(cfg) / f"{method}_fused.json"
    if not row_path.is_file():
        raise ExportRefused(
            f"{row_path}: no {method} classifier of fused features; run "
            f"`ffn train-classifier CONFIG --methods {method}` first"
        )
    row = json.loads(row_path.read_text())
    selected_on = row["chosen"].get("selected_on")
    source = Source("fused", row["w1"])
    identity = method_identity(
        cfg, open_run_cache(cfg), method, source, None if selected_on == "published defaults" else selected_on
    )
    if row.get("identity") != identity:
        raise ExportRefused(
            f"{row_path}: fitted from other settings or another cache; rerun `--methods {method}`"
        )
    form_path = row_path.with_suffix(".pt")
    if not form_path.is_file():
        raise ExportRefused(f"{form_path}: missing (fitted by an older version); rerun --methods {method}")
    if w1 is not None and abs(w1 - row["w1"]) > 1e-6:
        raise ExportRefused(
            f"--method {method} was fitted on fused features at w1={row['w1']:g}, not --w1 {w1:g}"
        )
    return LinearForm.from_state(torch.load(form_path, weights_only=True)), row["test"], row["w1"]


def _refuse_non_finite(model: torch.nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportRefused(f"{name}: weights that are not finite; nothing was exported")


def save_model(model: torch.nn.Module, out: Path, image_size: int) -> None:
    """`model.pt2` and `model.onnx` of a model of N x 3 x S x S images, N free."""
    example = (torch.zeros(2, 3, image_size, image_size),)
    batch = {"images": {0: torch.export.Dim("batch")}}
    with torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes=batch)
        with writing(out / "model.pt2") as tmp, open(tmp, "wb") as handle:
            torch.export.save(program, handle)
        with writing(out / "model.onnx") as tmp:  # one self-contained file (the weights inside)
            torch.onnx.export(
                model, example, tmp, dynamo=True, external_data=False, input_names=["images"],
                output_names=["logits"], dynamic_shapes=batch, verbose=False,
            )  # fmt: skip


@holds_run_dir
def export_run(cfg: Config, method: str = "ffn", w1: float | None = None) -> Path:
    """Write `output_dir/export/`; returns its path."""
    if method not in METHODS:
        raise ExportRefused(f"--method {method}: expected one of {', '.join(METHODS)}")
    if method == "joint":
        raise ExportRefused("--method joint: the branches' own stage-1 heads have no form on fused features")
    state, detail = stage_state(cfg, "stage1")
    if state != "complete":
        raise ExportRefused(f"stage 1 is {state}{f' ({detail})' if detail else ''}; run `ffn run` first")
    if method == "ffn":
        w1 = cfg.stage2.w1 if w1 is None else w1
        head, reported = ffn_classifier(cfg, w1)
    else:
        head, reported, w1 = method_classifier(cfg, method, w1)
    cpu = torch.device("cpu")
    ce, kps = (load_frozen(cfg, branch, cpu).backbone for branch in ("ce", "kps"))
    model = FusedClassifier(ce, kps, w1, head).eval()
    _refuse_non_finite(model)
    out = export_dir(cfg)
    size = cfg.data.image_size
    print(f"export: {method} at w1={w1:g}: tracing ({size}x{size} inputs, any batch size)", flush=True)
    save_model(model, out, size)
    train = open_run_cache(cfg).splits["train"]
    counts = np.bincount(train.labels[train.rows_of_view(0)], minlength=cfg.data.num_classes)
    groups = shot_groups(counts)
    description = {
        "format": FORMAT,
        "classes": class_names(cfg),
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "image_size": size},
        "output": {"name": "logits"},
        "preprocess": {
            "color": "RGB",
            "resize_shorter_side": cfg.data.resize_size,
            "center_crop": size,
            "scale": 255.0,
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        },
        "train_counts": counts.tolist(),
        "shot_groups": {name: np.flatnonzero(mask).tolist() for name, mask in groups.items()},
        "method": method,
        # probabilities = softmax(scale * logits): FFN's cosine logits were trained at LDAM's s
        "probability_scale": cfg.stage2.ldam_s if method == "ffn" else 1.0,
        "w1": w1,
        "w2": round(1.0 - w1, 6),
        "config": config_id(cfg),
        "reported_test": {k: reported.get(k) for k in ("top1", "top5", "many", "medium", "few", "samples")},
        "files": {"onnx": "model.onnx", "torch": "model.pt2"},
    }
    write_json(out / "model.json", description)
    sizes = ", ".join(
        f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in (out / "model.onnx", out / "model.pt2")
    )
    print(f"export: {out} ({sizes}); reported test top-1 {reported['top1']:.2f}", flush=True)
    return out
