"""The field's benchmarks: each shipped config validates, and runs end to end in miniature
(generated images, four classes, one epoch) with its own backbone and recipe."""

import json

import pytest
import torch

from ffn_dist.config import load_config, shipped_configs
from tests.conftest import run_ffn, write_jpeg

CLASSES, TRAIN, EVAL = 4, [6, 4, 3, 2], 2


def miniature_data(root):
    """Long-tailed train, balanced val and test, as `path label` lists (the published form)."""
    splits = (("train", TRAIN), ("val", [EVAL] * CLASSES), ("test", [EVAL] * CLASSES))
    for number, (name, per_class) in enumerate(splits):
        lines = []
        for label, count in enumerate(per_class):
            for i in range(count):
                path = f"{name}/c{label}/{i}.jpg"
                write_jpeg(root / path, size=(40, 36), seed=100 * number + 10 * label + i, smooth=True)
                lines.append(f"{path} {label}\n")
        (root / f"{name}.txt").write_text("".join(lines))
    return root


MINIATURE = [
    f"data.num_classes={CLASSES}",
    "data.image_size=32",
    "data.resize_size=36",
    "data.batch_size=4",
    "data.num_threads=1",
    "stage1.epochs=1",
    "stage1.warmup_epochs=0",
    "stage1.eval_every=1",
    "stage1.checkpoint_every=1",
    "stage1.kps_ga_epoch=0",
    "stage1.log_every=100",
    "cache.train_views=1",
    "cache.batch_size=8",
    "stage2.epochs=1",
    "dist.nproc=2",
    "stage1.lr=0.001",  # 4 images a batch at the recipe's lr can diverge a random ResNet-152 in one epoch
]


SHIPPED = sorted(path.stem for path in shipped_configs().glob("*.yaml"))


def test_every_benchmark_of_the_readme_is_a_shipped_config():
    assert {"cifar10_lt_r32", "cifar100_lt_r32", "imagenet_lt_r50", "inat2018_r50", "places_lt_r152"} <= set(
        SHIPPED
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_a_benchmark_config_validates_and_runs_in_miniature(tmp_path, name):
    shown = run_ffn("show-config", name)
    assert shown.returncode == 0, shown.stderr
    cfg = load_config(name)
    arch = cfg.model.arch
    assert cfg.name == name
    data = miniature_data(tmp_path / "data")
    splits = [
        f"data.root={data}",
        "data.builtin=null",
        "data.train_split=train.txt",
        "data.test_split=test.txt",
    ]
    splits += ["data.val_split=val.txt"] if cfg.data.val_split else []
    extra = []
    if cfg.model.pretrained:  # a local file of torchvision's format for the config's arch
        import torchvision.models

        torch.manual_seed(0)  # the same weights every run
        torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), tmp_path / "weights.pth")
        extra.append(f"model.pretrained={tmp_path / 'weights.pth'}")
    out = tmp_path / "run"
    result = run_ffn("run", name, *splits, *MINIATURE, *extra, f"output_dir={out}", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert list(report["methods"])[:2] == ["CE", "KPS"] and report["train_counts"] == TRAIN
    assert all(m["samples"] == EVAL * CLASSES for m in report["methods"].values())
    record = json.loads((out / "stages" / "stage1.json").read_text())
    assert record["inputs"]["model.arch"] == arch
    if cfg.model.pretrained:
        assert "model.pretrained (weights.pth) sha256" in record["inputs"]  # what was loaded


def test_a_pretrained_file_of_another_architecture_is_refused_before_anything_trains(tmp_path):
    import torchvision.models

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    result = run_ffn("run", "demo", f"model.pretrained={tmp_path / 'resnet18.pth'}", cwd=tmp_path)
    # the built-in data's progress bar, then the refusal: one line, no traceback
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert error.startswith(f"error: {tmp_path / 'resnet18.pth'}: model.pretrained is not a resnet32 trunk: ")
    assert "180 missing keys (blocks.0.conv1.weight, " in error and "114 unexpected keys (layer1." in error
    assert not (tmp_path / "runs" / "demo" / "stage1").exists()
    missing = run_ffn("run", "demo", "model.pretrained=nope.pth", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.pth: model.pretrained: file not found" in missing.stderr
