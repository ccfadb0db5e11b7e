"""`ffn predict EXPORT_DIR IMAGE...` and `ffn predict EXPORT_DIR --split FILE --root DIR`.

An exported model at work from its files alone: `model.json`'s preprocessing, written out
here with PIL and numpy (what a service without this project would do), and `model.onnx`
through ONNX Runtime or `model.pt2` through torch. Nothing of the training code path runs,
so scoring a split is a check of the export, not a second copy of the evaluation.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ffn_dist.errors import FFNError
from ffn_dist.fusion import describe_fusion
from ffn_dist.priors import logit_adjustment, read_prior
from ffn_dist.progress import progress
from ffn_dist.run.paths import export_description

# The rule `ffn predict --split` keeps to the report: the report scores the run's classifier
# on the cache's fp32 test embeddings (torch's kernels, the cache's batches), the export the
# same model from the same pixels through another runtime; their logits differ by far less
# than this (the tests bound it by half), so an image is classified otherwise only where its
# k-th and (k+1)-th logits are within TIE_TOLERANCE of each other (docs/export.md).
TIE_TOLERANCE = 1e-4


class PredictError(FFNError):
    pass


def preprocess(path: Path, spec: dict, where: str | None = None) -> np.ndarray:
    """One image as the model's input (3 x S x S float32): RGB, the shorter side resized to
    `resize_shorter_side` (bilinear), the centre `center_crop` square, / 255, then
    (x - mean) / std: torchvision's Resize, CenterCrop, ToTensor, Normalize on PIL images."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except FileNotFoundError:
        raise PredictError(f"{where or path}: no such image") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PredictError(f"{where or path}: cannot be decoded ({exc})") from None
    size = spec["resize_shorter_side"]
    width, height = image.size
    if min(width, height) != size:
        if width <= height:
            width, height = size, int(size * height / width)
        else:
            width, height = int(size * width / height), size
        image = image.resize((width, height), Image.BILINEAR)
    crop = spec["center_crop"]
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / np.float32(
        spec["scale"]
    )
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


class ExportedModel:
    """`model.json` and one runtime's model: `logits(batch)` for an N x 3 x S x S batch."""

    def __init__(self, directory: str | Path, runtime: str = "onnx", prior: str | None = None):
        self.directory = Path(directory)
        described = export_description(self.directory)
        if not described.is_file():
            raise PredictError(
                f"{self.directory}: not an export (no model.json); run `ffn export CONFIG` first"
            )
        self.meta = json.loads(described.read_text())
        self.classes = self.meta["classes"]
        # what the model is: 'ffn (kps 0.5, ce 0.5)'; an export of format 1 gave w1 alone
        fusion = self.meta.get("fusion")
        shown = describe_fusion(fusion) if fusion else f"w1={self.meta.get('w1', 0.0):g}"
        self.name = f"{self.meta.get('method', 'ffn')} ({shown})"
        self.runtime = runtime
        # --prior: the logits move from the training prior to the one given (priors.py)
        self.adjustment = (
            None
            if prior is None
            else logit_adjustment(read_prior(prior, len(self.classes)), self.meta["train_counts"])
        )
        model = self.directory / self.meta["files"][runtime]
        if runtime == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            self._run = lambda batch: session.run(["logits"], {"images": batch})[0]
        else:
            import torch

            program = torch.export.load(str(model)).module()

            def run(batch):
                with torch.no_grad():
                    return program(torch.from_numpy(batch)).numpy()

            self._run = run

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's logits, moved to `--prior` where one was given (what predictions rank)."""
        logits = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        if self.adjustment is None:
            return logits
        return logits + (self.adjustment / self.meta["probability_scale"]).astype(np.float32)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """softmax(scale * logits / T): the scale the classifier was trained with (FFN's LDAM s),
        the temperature fitted on val (none where it was not fitted). T > 0 divides every logit
        alike, so it calibrates the probabilities and never changes which class ranks first."""
        scaled = (
            logits.astype(np.float64) * self.meta["probability_scale"] / (self.meta["temperature"] or 1.0)
        )
        scaled -= scaled.max(axis=1, keepdims=True)
        exp = np.exp(scaled)
        return exp / exp.sum(axis=1, keepdims=True)


def predict_images(model: ExportedModel, images: list[str], top_k: int) -> list[dict]:
    spec = model.meta["preprocess"]
    batch = np.stack([preprocess(Path(image), spec) for image in images])
    probabilities = model.probabilities(model.logits(batch))
    results = []
    for image, row in zip(images, probabilities, strict=True):
        best = np.argsort(-row, kind="stable")[:top_k]
        results.append(
            {"image": image, "top": [{"class": model.classes[c], "probability": float(row[c])} for c in best]}
        )
    return results


def score_split(model: ExportedModel, split_path: str, root: str, batch_size: int, threads: int) -> dict:
    """Top-1, top-5, the shot groups, shifted priors and calibration (of the export's calibrated
    probabilities) of a split file, as the report gives them."""
    from ffn_dist.data.splits import read_split
    from ffn_dist.metrics import accuracy_report

    split = read_split(split_path, root, len(model.classes))
    spec = model.meta["preprocess"]
    top5, scores, start = [], [], time.perf_counter()
    bar = progress(desc=f"predict {Path(split_path).name} ({model.runtime})", total=len(split))

    def load(i: int) -> np.ndarray:
        return preprocess(split.image_path(i), spec, where=split.where(i))

    with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL decodes without the GIL
        for begin in range(0, len(split), batch_size):
            indices = range(begin, min(begin + batch_size, len(split)))
            logits = model.logits(np.stack(list(pool.map(load, indices))))
            top5.append(np.argsort(-logits, axis=1, kind="stable")[:, :5])
            probabilities = model.probabilities(logits)
            labels = split.labels[indices.start : indices.stop]
            with np.errstate(divide="ignore"):
                scores.append(
                    np.stack(
                        [probabilities.max(axis=1), np.log(probabilities[np.arange(len(labels)), labels])], 1
                    )
                )
            bar.update(len(indices))
    bar.close()
    seconds = time.perf_counter() - start
    counts = np.asarray(model.meta["train_counts"])
    report = accuracy_report(split.labels, np.concatenate(top5), counts, np.concatenate(scores))
    return {**report, "seconds": round(seconds, 2), "images_per_s": round(len(split) / seconds, 1)}


def score_test_lists(cfg, files: list[str]) -> dict[str, dict]:
    """`ffn evaluate --test-split FILE`: each split file (SADE's published shifted test lists,
    say; paths under `data.root`) scored by the run's export of its configured classifier, as
    `ffn predict --split` scores it. The export is written first where it is missing or is not
    of this config's current classifier."""
    from ffn_dist.run.paths import export_dir
    from ffn_dist.stages.export import export_is_current, export_run

    if not export_is_current(cfg):
        export_run(cfg)
    model = ExportedModel(export_dir(cfg))
    threads = max(1, cfg.data.num_threads)
    return {str(f): score_split(model, f, cfg.data.root, cfg.data.batch_size, threads) for f in files}
