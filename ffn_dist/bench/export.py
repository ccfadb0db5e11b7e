"""`ffn bench export`: the size of an exported FFN classifier and its predict throughput on
this machine, ONNX Runtime and torch.export beside the eager model, interleaved rounds.

Random weights (throughput does not depend on them); the same export code as `ffn export`
(`stages.export.save_model`) and the same runtimes as `ffn predict` (`predict.ExportedModel`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ffn_dist.bench.timing import interleaved_medians
from ffn_dist.config import paper_branches
from ffn_dist.files import write_json
from ffn_dist.fusion import equal_weights
from ffn_dist.models.backbones import build_backbone
from ffn_dist.models.heads import FusedClassifier, LinearForm
from ffn_dist.predict import ExportedModel
from ffn_dist.run.paths import export_description
from ffn_dist.stages.export import save_model
from ffn_dist.tables import markdown_table

SHAPES = {"resnet32": (32, 10), "resnet50": (224, 1000)}  # (image size, classes): CIFAR, ImageNet-LT


def _timed(run, batch: np.ndarray):
    def once() -> float:
        start = time.perf_counter()
        run(batch)
        return len(batch) / (time.perf_counter() - start)

    return once


def bench_export(archs: list[str], batch_size: int, rounds: int, work_dir: str | None) -> dict:
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for arch in archs:
            size, classes = SHAPES[arch]
            backbones = {name: build_backbone(arch) for name in paper_branches()}  # the paper's pair's shape
            fusion = dict(zip(backbones, equal_weights(len(backbones)), strict=True))
            head = LinearForm.cosine(torch.randn(classes, next(iter(backbones.values())).embedding_dim))
            model = FusedClassifier(backbones, fusion, head).eval()
            out = Path(work_dir or scratch) / arch
            start = time.perf_counter()
            save_model(model, out, size)
            export_s = time.perf_counter() - start
            files = {"onnx": "model.onnx", "torch": "model.pt2"}
            write_json(export_description(out), {"files": files, "classes": list(map(str, range(classes)))})
            batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)

            def eager(images, model=model):
                with torch.no_grad():
                    return model(torch.from_numpy(images))

            runners = {
                "eager torch": eager,
                **{f"{runtime} (exported)": ExportedModel(out, runtime).logits for runtime in files},
            }
            timed = {name: _timed(run, batch) for name, run in runners.items()}
            rates = interleaved_medians(timed, rounds, warmup=1)  # first calls allocate and plan
            figures[arch] = {
                "image_size": size,
                "classes": classes,
                "onnx_mb": round((out / "model.onnx").stat().st_size / 1e6, 1),
                "pt2_mb": round((out / "model.pt2").stat().st_size / 1e6, 1),
                "export_s": round(export_s, 1),
                "img_s": {name: round(rate, 1) for name, rate in rates.items()},
            }
    rows = [
        [arch, f"{f['image_size']}x{f['image_size']}", f["onnx_mb"], f["pt2_mb"], f["export_s"]]
        + [f"{rate:,.0f}" for rate in f["img_s"].values()]
        for arch, f in figures.items()
    ]
    header = ["backbones", "input", "model.onnx MB", "model.pt2 MB", "export s"]
    header += [f"{name} img/s" for name in next(iter(figures.values()))["img_s"]]
    print(f"exported FFN classifier, batch {batch_size}, {torch.get_num_threads()} CPU thread(s):")
    print(markdown_table(header, rows), flush=True)
    return {"batch_size": batch_size, "threads": torch.get_num_threads(), "models": figures}
