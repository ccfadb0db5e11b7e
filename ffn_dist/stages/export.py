"""`ffn export CONFIG`: the run's classifier (`stage2.method` at `stage2.fusion`) as one model
that runs outside this project.

Writes `output_dir/export/`:
  model.onnx  the whole classifier as one graph, from a normalised image batch (NCHW float32,
              any batch size) to logits: every branch's backbone, their unit embeddings,
              the fusion at stage2.fusion and the stage-2 classifier. Runs with ONNX Runtime alone.
  model.pt2   the same model as a `torch.export` program: `torch.export.load(path).module()`
              runs it with torch alone, without this package.
  model.json  class names in logit order, the eval preprocessing, the training class counts
              and shot groups, the method and its fusion weights, the run's config identity and the test
              accuracy the run reported for this classifier.
Another classifier of the run is exported by naming it: `ffn export CONFIG stage2.method=crt`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ffn_dist.config import Config
from ffn_dist.data.dataset import split_path
from ffn_dist.data.splits import shot_groups
from ffn_dist.errors import FFNError
from ffn_dist.files import write_json, writing
from ffn_dist.fusion import describe_fusion, weighed
from ffn_dist.models.heads import FusedClassifier
from ffn_dist.run.history import config_id
from ffn_dist.run.paths import export_description, export_dir
from ffn_dist.run.stages import stage_named, stage_state
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.cache import load_frozen
from ffn_dist.stages.classifier import load_form, read_result
from ffn_dist.stages.methods import probability_scale
from ffn_dist.tables import SHOT_COLUMNS

FORMAT = 2  # 2: `fusion`, a weight per branch, for 1's w1 and w2


class ExportRefused(FFNError):
    pass


def class_names(cfg: Config) -> list[str]:
    """`classes.txt` beside the training split (as `ffn splits make-lt` writes it), one name
    per line in label order; else the labels themselves."""
    path = split_path(cfg.data, "train").parent / "classes.txt"
    if not path.is_file():
        return [str(label) for label in range(cfg.data.num_classes)]
    names = path.read_text().splitlines()
    if len(names) != cfg.data.num_classes:
        raise ExportRefused(
            f"{path}: {len(names)} class names, expected data.num_classes={cfg.data.num_classes}"
        )
    return names


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


def reported_test(result: dict) -> dict:
    """The test figures model.json repeats from the classifier's result (which one it is)."""
    return {k: result["test"].get(k) for k in (*SHOT_COLUMNS, "samples")}


def export_is_current(cfg: Config) -> bool:
    """Whether `output_dir/export/` holds this config's classifier as its record now stands."""
    described = export_description(export_dir(cfg))
    if not described.is_file() or stage_state(cfg, "classifier")[0] != "complete":
        return False
    meta, result = json.loads(described.read_text()), read_result(cfg)
    return meta.get("config") == config_id(cfg) and meta.get("reported_test") == reported_test(result)


@holds_run_dir
def export_run(cfg: Config) -> Path:
    """Write `output_dir/export/` for the configured classifier; returns its path."""
    for name in ("stage1", "classifier"):
        state, detail = stage_state(cfg, name)
        if state != "complete":
            label = stage_named(name).label(cfg)
            raise ExportRefused(
                f"{label} is {state}{f' ({detail})' if detail else ''}; run `ffn run` "
                f"(or `ffn {stage_named(name).command}`) with this config first"
            )
    s2, result = cfg.stage2, read_result(cfg)
    cpu = torch.device("cpu")
    backbones = {branch: load_frozen(cfg, branch, cpu).backbone for branch in weighed(s2.fusion)}
    model = FusedClassifier(backbones, s2.fusion, load_form(cfg)).eval()
    _refuse_non_finite(model)
    out = export_dir(cfg)
    size = cfg.data.image_size
    shown = f"{s2.method} at {describe_fusion(s2.fusion)}"
    print(f"export: {shown}: tracing ({size}x{size} inputs, any batch size)", flush=True)
    save_model(model, out, size)
    counts = np.asarray(result["train_counts"])
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
        "method": s2.method,
        # probabilities = softmax((scale * logits + log(prior / train prior)) / temperature):
        # the temperature was fitted on val (null: not fitted, and why), the prior is
        # `ffn predict --prior`'s (none: the training prior, no adjustment)
        "probability_scale": probability_scale(cfg),
        "temperature": result["temperature"]["value"],
        "temperature_fitted": result["temperature"]["fitted"],
        "fusion": model.weights,
        "config": config_id(cfg),
        "reported_test": reported_test(result),
        "files": {"onnx": "model.onnx", "torch": "model.pt2"},
    }
    write_json(export_description(out), description)
    sizes = ", ".join(
        f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in (out / "model.onnx", out / "model.pt2")
    )
    print(f"export: {out} ({sizes}); reported test top-1 {result['test']['top1']:.2f}", flush=True)
    return out
