"""`ffn export` and `ffn predict` on a real demo run: the exported model gives the report's
accuracy, with ONNX Runtime and with torch alone, to the rule docs/export.md states (an image
may be classified otherwise only where its logits are tied to within TIE_TOLERANCE), and the
pipeline's logits."""

import contextlib
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
from ffn_dist.files import write_json
from ffn_dist.metrics import accuracy_report
from ffn_dist.models.backbones import build_backbone
from ffn_dist.models.heads import FusedClassifier, LinearForm, fused_embedding
from ffn_dist.predict import TIE_TOLERANCE, ExportedModel, preprocess
from ffn_dist.run.paths import classifier_dir
from ffn_dist.run.stages import finish_stage
from ffn_dist.stages.cache import load_frozen, open_run_cache
from ffn_dist.stages.classifier import load_form
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


def report_logits(work: Path, *overrides) -> np.ndarray:
    """The logits the report scored, per test image in split order: the configured
    classifier on the cached (fp32) test embeddings."""
    with contextlib.chdir(work):  # the run's config names its paths from there
        cfg = load_config(work / "runs" / "demo" / "config.yaml", list(overrides))
        test = open_run_cache(cfg).splits["test"]
        rows = test.rows_of_view(0)
        rows = rows[np.argsort(test.indices[rows])]
        with torch.no_grad():
            return load_form(cfg)(test.fused(rows, cfg.stage2.fusion)).numpy()


def export_logits(work: Path, runtime: str) -> np.ndarray:
    """The exported model's logits of every test image, preprocessed as `ffn predict` does."""
    model = ExportedModel(work / "runs" / "demo" / "export", runtime)
    data = work / "data" / "demo"
    lines = [line.split() for line in (data / "test.txt").read_text().splitlines()]
    images = np.stack([preprocess(data / path, model.meta["preprocess"]) for path, _ in lines])
    return model.logits(images)


def near_tie(logits: np.ndarray, k: int) -> np.ndarray:
    """Images whose k-th and (k+1)-th logits are within the tolerance of the rule."""
    ranked = -np.sort(-logits, axis=1)
    return ranked[:, k - 1] - ranked[:, k] <= TIE_TOLERANCE


def assert_the_export_equals_the_report(work: Path, runtime: str, reported: dict, *overrides) -> None:
    """`ffn predict --split` gives the report's figures, but where the export classifies an
    image otherwise, and then only on a near-tie of the report's logits (the documented rule)."""
    split = ["--split", work / "data" / "demo" / "test.txt", "--root", work / "data" / "demo"]
    result = run_ffn(
        "predict", work / "runs" / "demo" / "export", *split, "--runtime", runtime, "--json", cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout)
    ours, theirs = report_logits(work, *overrides), export_logits(work, runtime)
    assert np.abs(ours - theirs).max() < TIE_TOLERANCE / 2  # the bound the rule rests on
    labels = np.array(
        [int(line.split()[1]) for line in (work / "data" / "demo" / "test.txt").read_text().splitlines()]
    )
    counts = np.array(
        json.loads((work / "runs" / "demo" / "export" / "model.json").read_text())["train_counts"]
    )
    top = lambda logits: np.argsort(-logits, axis=1, kind="stable")[:, :5]  # noqa: E731
    plain = accuracy_report(labels, top(ours), counts)  # accuracies (calibration: its own test)
    assert plain == {k: reported[k] for k in plain}  # the report's scoring
    assert {k: scored[k] for k in plain} == accuracy_report(labels, top(theirs), counts)  # predict's
    differs_top1 = top(ours)[:, 0] != top(theirs)[:, 0]
    differs_top5 = np.any(np.sort(top(ours), 1) != np.sort(top(theirs), 1), axis=1)
    assert not np.any(differs_top1 & ~near_tie(ours, 1)), "top-1 differs beyond a near-tie"
    assert not np.any(differs_top5 & ~near_tie(ours, 5)), "top-5 differs beyond a near-tie"


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_predict_on_the_test_split_gives_the_reports_ffn_accuracy(exported, runtime):
    report = json.loads((exported / "runs" / "demo" / "report" / "report.json").read_text())
    ffn = report["methods"]["FFN (kps 0.5, ce 0.5)"]
    assert_the_export_equals_the_report(exported, runtime, ffn)
    split = ["--split", exported / "data" / "demo" / "test.txt", "--root", exported / "data" / "demo"]
    table = predict(exported, *split, "--runtime", runtime)
    assert re.search(rf"\| ffn \(kps 0.5, ce 0.5\), {runtime} \| [\d.]+ \| [\d.]+ \|", table.stdout)
    assert re.search(r"300 images in [\d.]+ s \([\d,]+ img/s\)", table.stdout)


def test_the_exported_logits_are_the_pipelines(exported, monkeypatch):
    """The live backbones, fused, through the trained classifier (fp32) against both files."""
    monkeypatch.chdir(exported)  # the run's config names its paths from there
    run = exported / "runs" / "demo"
    cfg = load_config(run / "config.yaml")
    cpu = torch.device("cpu")
    networks = {branch: load_frozen(cfg, branch, cpu) for branch in ("ce", "kps")}
    head = load_form(cfg)
    test = open_dataset(cfg.data).test
    loader = build_loader(cfg.data, test, train=False, order="sequential", run_dir=str(exported / "scratch"))
    meta = json.loads((run / "export" / "model.json").read_text())
    session = onnxruntime.InferenceSession(str(run / "export" / "model.onnx"))
    program = torch.export.load(str(run / "export" / "model.pt2")).module()
    checked = 0
    with torch.no_grad():
        for batch in loader:
            features = {name: network.embed(batch.images) for name, network in networks.items()}
            live = head(fused_embedding(features, cfg.stage2.fusion))
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
    assert meta["classes"] == [str(c) for c in range(10)] and meta["method"] == "ffn"
    assert meta["format"] == 2 and meta["fusion"] == {"kps": 0.5, "ce": 0.5}
    assert meta["preprocess"]["center_crop"] == 32 and len(meta["preprocess"]["mean"]) == 3
    assert meta["train_counts"] == report["train_counts"] and meta["config"] == report["config"]
    assert meta["reported_test"]["top1"] == report["methods"]["FFN (kps 0.5, ce 0.5)"]["top1"]
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


def test_a_run_of_another_method_reports_exports_and_shows_it(exported, tmp_path):
    """`ffn run demo stage2.method=crt`: stage 1 and the cache are reused, and the report, the
    export and `ffn status` are cRT's."""
    work = Path(shutil.copytree(exported, tmp_path / "work", symlinks=True))
    crt = [*RUN, "stage2.method=crt"]
    ran = run_ffn("run", "demo", *crt, cwd=work)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "stage1: complete, skipped" in ran.stdout and "cache: complete, skipped" in ran.stdout
    assert "| crt (kps 0.5, ce 0.5) |" in ran.stdout
    report = json.loads((work / "runs" / "demo" / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["CE", "KPS", "crt (kps 0.5, ce 0.5)"]
    assert {k: report["classifier"][k] for k in ("method", "fusion")} == {
        "method": "crt",
        "fusion": {"kps": 0.5, "ce": 0.5},
    }
    status = run_ffn("status", "demo", *crt, cwd=work)
    assert "classifier crt/kps0.50_ce0.50 complete" in status.stdout, status.stdout
    result = run_ffn("export", "demo", *crt, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((work / "runs" / "demo" / "export" / "model.json").read_text())
    assert meta["method"] == "crt" and meta["probability_scale"] == 1.0
    crt_report = report["methods"]["crt (kps 0.5, ce 0.5)"]
    assert_the_export_equals_the_report(work, "onnx", crt_report, "stage2.method=crt")
    stale = run_ffn("export", "demo", *crt, "stage2.epochs=4", cwd=work)
    assert stale.returncode == 2
    assert "classifier crt/kps0.50_ce0.50 is stale (stage2.epochs: 5 when it ran, 4 now)" in stale.stderr


def test_export_refuses_what_is_not_a_finished_finite_model(exported, tmp_path):
    work = Path(shutil.copytree(exported, tmp_path / "work", symlinks=True))
    other_fusion = run_ffn("export", "demo", *RUN, "stage2.fusion.kps=0.3", "stage2.fusion.ce=0.7", cwd=work)
    assert (
        other_fusion.returncode == 2
        and "classifier ffn/kps0.30_ce0.70 is not started; run `ffn run`" in other_fusion.stderr
    )
    with contextlib.chdir(work):
        cfg = load_config(work / "runs" / "demo" / "config.yaml")
        weights = work / classifier_dir(cfg) / "classifier.pt"
    state = torch.load(weights, weights_only=True)
    state["weight"][0, 0] = float("nan")
    torch.save(state, weights)
    changed = run_ffn("export", "demo", *RUN, cwd=work)
    assert changed.returncode == 2 and "classifier.pt changed since the stage wrote it" in changed.stderr
    with contextlib.chdir(work):  # as if it had trained so
        finish_stage(
            cfg, "classifier", [classifier_dir(cfg) / name for name in ("classifier.pt", "result.json")]
        )
    nan = run_ffn("export", "demo", *RUN, cwd=work)
    assert nan.returncode == 2 and "head.weight: weights that are not finite" in nan.stderr
    shutil.rmtree(work / "runs" / "demo" / "stage1" / "kps")
    unfinished = run_ffn("export", "demo", *RUN, cwd=work)
    assert unfinished.returncode == 2 and "stage1 is stale" in unfinished.stderr
    assert unfinished.stderr.count("\n") == 1


def test_the_export_is_refused_where_no_run_exists(tmp_path):
    result = run_ffn("export", REPO / "configs" / "demo.yaml", f"output_dir={tmp_path / 'none'}")
    assert result.returncode == 2 and "stage1 is not started; run `ffn run`" in result.stderr


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
    model = FusedClassifier({"ce": ce, "kps": kps}, {"kps": 0.5, "ce": 0.5}, head).eval()
    save_model(model, tmp_path, 32)
    files = {"onnx": "model.onnx", "torch": "model.pt2"}
    write_json(tmp_path / "model.json", {"files": files, "classes": [str(c) for c in range(classes)]})
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    ungated = LinearForm(head.weight, head.bias)
    with torch.no_grad():
        assert not np.allclose(
            FusedClassifier({"ce": ce, "kps": kps}, {"kps": 0.5, "ce": 0.5}, ungated).eval()(
                torch.from_numpy(images)
            ),
            expected,
        )
    for runtime in ("onnx", "torch"):
        assert np.allclose(ExportedModel(tmp_path, runtime).logits(images), expected, atol=1e-4)


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def within_near_ties(figure: float, scores: np.ndarray, labels: np.ndarray, weight: np.ndarray) -> None:
    """`figure` (a weighted top-1) is the rule's on float64 `scores`, but for images whose two
    best scores are within 1e-3 (the softmax's units; the code under test adds in fp32): each
    such image may count either way."""
    ranked = -np.sort(-scores, axis=1)
    near = ranked[:, 0] - ranked[:, 1] < 1e-3
    correct = scores.argmax(1) == labels
    assert np.sum(weight[correct & ~near]) - 1e-9 <= figure <= np.sum(weight[correct | near]) + 1e-9


def test_evaluate_scores_a_published_test_list_with_the_current_export(exported, tmp_path):
    """`ffn evaluate --test-split FILE` (a list like SADE's: a subsample of the test set under
    another prior) scores its images with the export, which is current and so not written again:
    the share of them the report's logits classify right, up to near-ties. A list with a bad
    label is refused naming the file and the line, and the report is left as it was."""
    work = Path(shutil.copytree(exported, tmp_path / "work", symlinks=True))
    data = work / "data" / "demo"
    lines = (data / "test.txt").read_text().splitlines()
    labels = np.array([int(line.split()[1]) for line in lines])
    keep = np.flatnonzero((labels < 3) | (np.arange(len(labels)) % 4 == 0))  # classes 0-2 over-sampled
    listed = work / "forward_list.txt"
    listed.write_text("".join(lines[i] + "\n" for i in keep))
    onnx = work / "runs" / "demo" / "export" / "model.onnx"
    written = onnx.stat().st_mtime_ns
    result = run_ffn("evaluate", "demo", *RUN, "--test-split", listed, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert onnx.stat().st_mtime_ns == written
    report_json = work / "runs" / "demo" / "report" / "report.json"
    scored = json.loads(report_json.read_text())["test_lists"][str(listed)]
    assert scored["samples"] == len(keep) and sum(scored["calibration"]["reliability"]["count"]) == len(keep)
    scale = json.loads((onnx.parent / "model.json").read_text())["probability_scale"]
    ours = report_logits(work).astype(np.float64)[keep] * scale
    within_near_ties(scored["top1"], ours, labels[keep], np.full(len(keep), 100.0 / len(keep)))
    assert "FFN (kps 0.5, ce 0.5) (its export) on the --test-split files:" in result.stdout
    assert f"| {listed} | {scored['top1']:.2f} |" in result.stdout

    before = report_json.read_bytes()
    listed.write_text(f"{lines[0]}\n{lines[1].split()[0]} 12\n")
    refused = run_ffn("evaluate", "demo", *RUN, "--test-split", listed, cwd=work)
    assert refused.returncode == 2 and f"{listed}:2" in refused.stderr and "Traceback" not in refused.stderr
    assert report_json.read_bytes() == before


def test_the_prior_rule_on_synthetic_logits(tmp_path):
    """ExportedModel with a model whose logits are its input: --prior adds
    log(prior / training prior) / scale to them, and the temperature never moves the argmax."""
    (tmp_path / "prior.txt").write_text("1\n1\n8\n")
    model = object.__new__(ExportedModel)
    model.meta = {"train_counts": [80, 15, 5], "probability_scale": 10.0, "temperature": 2.0}
    model._run = lambda batch: batch
    model.adjustment = None
    logits = np.array([[0.30, 0.20, 0.10], [0.10, 0.25, 0.22]], dtype=np.float32)
    assert model.logits(logits).argmax(1).tolist() == [0, 1]
    probabilities = model.probabilities(model.logits(logits))
    assert probabilities == pytest.approx(softmax(10.0 * logits.astype(np.float64) / 2.0))
    assert probabilities.argmax(1).tolist() == [0, 1]  # T calibrates, never reorders
    from ffn_dist.priors import read_prior

    model.adjustment = np.log(read_prior(str(tmp_path / "prior.txt"), 3)) - np.log(
        np.array([0.8, 0.15, 0.05])
    )
    # in the softmax's units, 10 * logits + log(pi_test / pi_train), the ratios being 0.125, 0.667 and 16
    expected = 10.0 * logits + model.adjustment
    assert model.logits(logits) * 10.0 == pytest.approx(expected, abs=1e-5)
    assert model.logits(logits).argmax(1).tolist() == [2, 2]  # the prior favours class 2 enough for both


def test_temperature_from_val_and_the_prior_end_to_end(exported, tmp_path):
    """With a val split: the temperature is fitted on it (val NLL no worse than at T = 1), kept
    in model.json and applied by `ffn predict` to probabilities only; `--prior` in `ffn predict`
    and `ffn evaluate` moves the predictions by the rule, which the figures are checked against."""
    work = Path(shutil.copytree(exported, tmp_path / "work", symlinks=True))
    data = work / "data" / "demo"
    taken, val = {}, []
    for line in (data / "train.txt").read_text().splitlines():  # 4 training images a class
        label = line.split()[1]
        if taken.setdefault(label, 0) < 4:
            taken[label] += 1
            val.append(line)
    (data / "val.txt").write_text("\n".join(val) + "\n")
    with_val = [*RUN, "data.val_split=val.txt"]
    for command in ("run", "export"):
        result = run_ffn(command, "demo", *with_val, cwd=work)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((work / "runs" / "demo" / "report" / "report.json").read_text())
    temperature = report["classifier"]["temperature"]
    assert temperature["fitted"] == "on val (minimum NLL)" and temperature["value"] > 0
    with contextlib.chdir(work):
        cfg = load_config(work / "runs" / "demo" / "config.yaml")
        result_json = json.loads((classifier_dir(cfg) / "result.json").read_text())
    val_report = result_json["val"]
    assert val_report["calibrated"]["nll"] <= val_report["calibration"]["nll"] + 1e-9  # T = 1 was a candidate
    ffn = report["methods"]["FFN (kps 0.5, ce 0.5)"]
    assert ffn["calibrated"]["temperature"] == temperature["value"]
    meta = json.loads((work / "runs" / "demo" / "export" / "model.json").read_text())
    assert meta["temperature"] == temperature["value"] and meta["temperature_fitted"] == temperature["fitted"]

    lines = (data / "test.txt").read_text().splitlines()
    image = str(data / lines[0].split()[0])
    shown = json.loads(predict(work, image, "--top-k", "10", "--json").stdout)[0]["top"]
    logits = export_logits(work, "onnx")[0].astype(np.float64)
    expected = softmax(meta["probability_scale"] * logits[None] / meta["temperature"])[0]
    assert [int(t["class"]) for t in shown] == np.argsort(
        -logits, kind="stable"
    ).tolist()  # the order is T's-free
    assert [t["probability"] for t in shown] == pytest.approx(np.sort(expected)[::-1].tolist(), abs=1e-6)

    counts = np.array(meta["train_counts"], dtype=np.float64)
    prior = np.ones(10)
    prior[7] = 50.0  # a test set where class 7 is 50 times as frequent as each other
    (work / "prior.txt").write_text("".join(f"{p:g}\n" for p in prior))
    split = ["--split", data / "test.txt", "--root", data]
    shifted = predict(work, *split, "--prior", work / "prior.txt", "--json")
    assert shifted.returncode == 0, shifted.stderr[-3000:]
    labels = np.array([int(line.split()[1]) for line in lines])
    rule = (
        export_logits(work, "onnx").astype(np.float64) * meta["probability_scale"]
        + np.log(prior / prior.sum())
        - np.log(counts / counts.sum())
    )
    per_image = np.full(len(labels), 100.0 / len(labels))
    within_near_ties(json.loads(shifted.stdout)["top1"], rule, labels, per_image)

    evaluated = run_ffn("evaluate", "demo", *with_val, "--prior", work / "prior.txt", cwd=work)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    shift = json.loads((work / "runs" / "demo" / "report" / "report.json").read_text())["prior_shift"]
    ours = report_logits(work, *with_val).astype(np.float64) * meta["probability_scale"]
    weight = prior / prior.sum()
    per_class_image = 100.0 * weight[labels] / np.bincount(labels, minlength=10)[labels]  # sum_c pi_c acc_c
    within_near_ties(shift["top1"]["without"], ours, labels, per_class_image)
    adjusted = ours + np.log(weight) - np.log(counts / counts.sum())
    within_near_ties(shift["top1"]["with"], adjusted, labels, per_class_image)
    assert f"on a test set of prior {work / 'prior.txt'} (top-1 %, exact): " in evaluated.stdout

    bad = work / "bad_prior.txt"
    bad.write_text("1\n2\n")
    refused = predict(work, image, "--prior", bad)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: {bad}: 2 frequencies for a model of 10 classes (one line per class)"
    )
