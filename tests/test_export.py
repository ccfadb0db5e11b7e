"""`ffn export` and `ffn predict` on a real demo run: the exported model gives the report's
accuracy to the image, with ONNX Runtime and with torch alone, and the pipeline's logits."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader
from ffn_dist.models import CosineHead, FusedClassifier, LinearForm, build_backbone, fused_embedding
from ffn_dist.predict import ExportedModel, preprocess
from ffn_dist.run import write_json
from ffn_dist.stages.cache import load_frozen
from ffn_dist.stages.export import save_model
from tests.conftest import REPO, run_ffn

RUN = ["stage1.epochs=3", "data.batch_size=32", "cache.train_views=1", "stage2.epochs=5"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`ffn run demo` (a short schedule), then `ffn export demo`, in a fresh directory."""
    work = tmp_path_factory.mktemp("export")
    for command in (["run", "demo", *RUN], ["export", "demo", *RUN]):
        result = run_ffn(*command, cwd=work)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work


def predict(work, *args):
    return run_ffn("predict", work / "runs" / "demo" / "export", *args, cwd=work)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_predict_on_the_test_split_gives_the_reports_ffn_accuracy(exported, runtime):
    report = json.loads((exported / "runs" / "demo" / "report" / "report.json").read_text())
    ffn = report["methods"]["FFN (w1=0.5)"]
    split = ["--split", exported / "data" / "demo" / "test.txt", "--root", exported / "data" / "demo"]
    result = predict(exported, *split, "--runtime", runtime, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout)
    for key in ("samples", "top1", "top5", "many", "medium", "few", "per_class"):
        assert scored[key] == ffn[key], key  # to the image
    table = predict(exported, *split, "--runtime", runtime)
    assert f"| ffn (w1=0.5), {runtime} | {ffn['top1']:.2f} | {ffn['top5']:.2f} |" in table.stdout
    assert re.search(r"300 images in [\d.]+ s \([\d,]+ img/s\)", table.stdout)


def test_the_exported_logits_are_the_pipelines(exported, monkeypatch):
    """The live backbones, fused, through the trained classifier (fp32) against both files."""
    monkeypatch.chdir(exported)  # the run's config names its paths from there
    run = exported / "runs" / "demo"
    cfg = load_config(run / "config.yaml")
    cpu = torch.device("cpu")
    ce, kps = (load_frozen(cfg, branch, cpu) for branch in ("ce", "kps"))
    head = CosineHead(64, 10)
    head.weight.data = torch.load(run / "classifier" / "w1_0.50" / "classifier.pt", weights_only=True)[
        "weight"
    ]
    test = open_dataset(cfg.data).test
    loader = build_loader(cfg.data, test, train=False, order="sequential", run_dir=str(exported / "scratch"))
    meta = json.loads((run / "export" / "model.json").read_text())
    session = onnxruntime.InferenceSession(str(run / "export" / "model.onnx"))
    program = torch.export.load(str(run / "export" / "model.pt2")).module()
    checked = 0
    with torch.no_grad():
        for batch in loader:
            live = head(
                fused_embedding(kps.embed(batch.images), ce.embed(batch.images), 0.5, 0.5), normalized=True
            )
            images = np.stack(
                [preprocess(test.image_path(int(i)), meta["preprocess"]) for i in batch.indices]
            )
            assert np.abs(images - batch.images.numpy()).max() < 1e-5  # the recorded preprocessing
            from_onnx = session.run(["logits"], {"images": images})[0]
            from_torch = program(torch.from_numpy(images)).numpy()
            assert np.abs(from_onnx - live.numpy()).max() < 1e-4
            assert np.abs(from_torch - live.numpy()).max() < 1e-4
            checked += len(images)
    assert checked == 300


def test_the_torch_export_loads_without_this_package(exported, tmp_path):
    """A fresh interpreter that cannot import ffn_dist runs model.pt2 with torch alone."""
    script = tmp_path / "alone.py"
    script.write_text(
        "import sys, torch\n"
        "sys.modules['ffn_dist'] = None  # importing it would fail\n"
        "model = torch.export.load(sys.argv[1]).module()\n"
        "print(tuple(model(torch.zeros(3, 3, 32, 32)).shape))\n"
    )
    result = subprocess.run(
        [sys.executable, script, exported / "runs" / "demo" / "export" / "model.pt2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "(3, 10)"


def test_model_json_describes_the_model(exported):
    meta = json.loads((exported / "runs" / "demo" / "export" / "model.json").read_text())
    report = json.loads((exported / "runs" / "demo" / "report" / "report.json").read_text())
    assert meta["classes"] == [str(c) for c in range(10)] and meta["method"] == "ffn" and meta["w1"] == 0.5
    assert meta["preprocess"]["center_crop"] == 32 and len(meta["preprocess"]["mean"]) == 3
    assert meta["train_counts"] == report["train_counts"] and meta["config"] == report["config"]
    assert meta["reported_test"]["top1"] == report["methods"]["FFN (w1=0.5)"]["top1"]
    assert sorted(sum(meta["shot_groups"].values(), [])) == list(range(10))


def test_predict_images_prints_top_k_classes_with_probabilities(exported):
    lines = (exported / "data" / "demo" / "test.txt").read_text().splitlines()[:2]
    images = [str(exported / "data" / "demo" / line.split()[0]) for line in lines]
    result = predict(exported, *images, "--top-k", "3", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    body = json.loads(result.stdout)
    assert [r["image"] for r in body] == images
    for row in body:
        probabilities = [t["probability"] for t in row["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    plain = predict(exported, images[0])
    assert plain.stdout.startswith(f"{images[0]}: ") and plain.stdout.count(",") == 4


def test_predict_refuses_bad_input_naming_file_and_line(exported, tmp_path):
    data = exported / "data" / "demo"
    missing = predict(exported, tmp_path / "nope.jpg")
    assert (
        missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nope.jpg'}: no such image"
    )
    root = tmp_path / "root"  # the demo's class folders, and one file that is no image
    root.mkdir()
    for folder in (p for p in data.iterdir() if p.is_dir()):
        (root / folder.name).symlink_to(folder)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    lines = (data / "test.txt").read_text().splitlines()
    split = tmp_path / "split.txt"
    split.write_text("\n".join([*lines[:3], "broken.jpg 1"]) + "\n")
    broken = predict(exported, "--split", split, "--root", root)
    assert broken.returncode == 2
    assert f"error: {split}:4 ({root / 'broken.jpg'}): cannot be decoded" in broken.stderr
    assert "Traceback" not in broken.stderr
    split.write_text(f"{lines[0]}\n{lines[1].split()[0]} 12\n")
    outside = predict(exported, "--split", split, "--root", data)
    assert outside.returncode == 2 and f"{split}:2" in outside.stderr and "Traceback" not in outside.stderr


def test_export_of_another_method_gives_its_row_in_methods_json(exported, tmp_path):
    work = Path(shutil.copytree(exported, tmp_path / "work", symlinks=True))
    compared = run_ffn("train-classifier", "demo", *RUN, "--methods", "crt", cwd=work)
    assert compared.returncode == 0, compared.stderr[-3000:]
    rows = json.loads((work / "runs" / "demo" / "classifier" / "methods" / "methods.json").read_text())[
        "rows"
    ]
    crt = next(r for r in rows if (r["method"], r["features"]) == ("crt", "fused"))
    result = run_ffn("export", "demo", *RUN, "--method", "crt", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    split = ["--split", work / "data" / "demo" / "test.txt", "--root", work / "data" / "demo", "--json"]
    scored = json.loads(predict(work, *split).stdout)
    assert scored["top1"] == crt["test"]["top1"] and scored["top5"] == crt["test"]["top5"]
    row_file = work / "runs" / "demo" / "classifier" / "methods" / "crt_fused.json"
    row = json.loads(row_file.read_text())
    row_file.write_text(json.dumps({**row, "identity": "from-another-cache"}))
    stale = run_ffn("export", "demo", *RUN, "--method", "crt", cwd=work)
    assert stale.returncode == 2 and "fitted from other settings or another cache" in stale.stderr


def test_export_refuses_what_is_not_a_finished_finite_model(exported, tmp_path):
    work = Path(shutil.copytree(exported, tmp_path / "work", symlinks=True))
    joint = run_ffn("export", "demo", *RUN, "--method", "joint", cwd=work)
    assert (
        joint.returncode == 2
        and joint.stderr.count("\n") == 1
        and "no form on fused features" in joint.stderr
    )
    other_w1 = run_ffn("export", "demo", *RUN, "--w1", "0.3", cwd=work)
    assert other_w1.returncode == 2 and "no complete classifier for w1=0.3" in other_w1.stderr
    weights = work / "runs" / "demo" / "classifier" / "w1_0.50" / "classifier.pt"
    state = torch.load(weights, weights_only=True)
    state["weight"][0, 0] = float("nan")
    torch.save(state, weights)
    nan = run_ffn("export", "demo", *RUN, cwd=work)
    assert nan.returncode == 2 and "head.weight: weights that are not finite" in nan.stderr
    shutil.rmtree(work / "runs" / "demo" / "stage1" / "kps")
    unfinished = run_ffn("export", "demo", *RUN, cwd=work)
    assert unfinished.returncode == 2 and "stage 1 is stale" in unfinished.stderr
    assert unfinished.stderr.count("\n") == 1


def test_the_export_is_refused_where_no_run_exists(tmp_path):
    result = run_ffn("export", REPO / "configs" / "demo.yaml", f"output_dir={tmp_path / 'none'}")
    assert result.returncode == 2 and "stage 1 is not started; run `ffn run` first" in result.stderr


def test_a_gated_classifier_exports_with_its_gate(tmp_path):
    """DisAlign's form (a confidence gate on the input) through both exports, logits equal."""
    torch.manual_seed(0)
    ce, kps = build_backbone("resnet32"), build_backbone("resnet32")
    dims, classes = ce.embedding_dim, 10
    gate = {
        "gate_weight": torch.randn(dims),
        "gate_bias": torch.tensor(0.3),
        "scale": torch.rand(classes) + 0.5,
        "shift": torch.randn(classes),
    }
    head = LinearForm(torch.randn(classes, dims), torch.randn(classes), gate=gate)
    model = FusedClassifier(ce, kps, 0.5, head).eval()
    save_model(model, tmp_path, 32)
    files = {"onnx": "model.onnx", "torch": "model.pt2"}
    write_json(tmp_path / "model.json", {"files": files, "classes": [str(c) for c in range(classes)]})
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    ungated = LinearForm(head.weight, head.bias)
    with torch.no_grad():
        assert not np.allclose(
            FusedClassifier(ce, kps, 0.5, ungated).eval()(torch.from_numpy(images)), expected
        )
    for runtime in ("onnx", "torch"):
        assert np.allclose(ExportedModel(tmp_path, runtime).logits(images), expected, atol=1e-4)
