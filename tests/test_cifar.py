"""`ffn splits cifar`: the CIFAR python archives, the literature's long-tailed subset, lossless pixels."""

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from ffn_dist.config import load_config
from ffn_dist.data.cifar import literature_subset, read_archive, write_cifar
from ffn_dist.data.loader import build_loader
from ffn_dist.data.splits import SplitError, read_split
from tests.conftest import run_ffn

TRAIN_PER_CLASS = {10: 30, 100: 5}  # balanced, as the real archives are (5,000 / 500)
TEST = 40  # CIFAR-10's fake test set


def fake_archive(path, classes=10, seed=0, broken=None):
    """A CIFAR python archive with the real one's layout (pickled dicts with bytes keys) and
    few random images; `broken` damages it."""
    rng = np.random.default_rng(seed)
    layout = (
        (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
            b"label_names",
            b"labels",
        )
        if classes == 10
        else ("cifar-100-python", ["train"], "test", "meta", b"fine_label_names", b"fine_labels")
    )
    folder, train, test, meta, names_key, labels_key = layout
    members = {f"{folder}/{meta}": {names_key: [f"class{c}".encode() for c in range(classes)]}}
    train_labels = rng.permutation(np.repeat(np.arange(classes), TRAIN_PER_CLASS[classes]))
    test_labels = rng.permutation(np.arange(TEST if classes == 10 else classes) % classes)
    batches = [(m, part) for m, part in zip(train, np.array_split(train_labels, len(train)), strict=True)]
    for name, labels in [*batches, (test, test_labels)]:
        count, labels = len(labels), labels.tolist()
        members[f"{folder}/{name}"] = {
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            labels_key: labels,
            b"batch_label": name.encode(),
        }
    if broken == "no labels":
        del members[f"{folder}/{test}"][labels_key]
    with tarfile.open(path, "w:gz") as handle:
        for name, body in members.items():
            data = pickle.dumps(body, protocol=2)
            if broken == "code" and name.endswith(test):
                data = pickle.dumps(print)  # a pickle that would call a function
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    return path


def ldam_drw(labels, classes, imbalance_factor, seed):
    """LDAM-DRW's IMBALANCECIFAR selection, as its code does it (numpy's global generator)."""
    np.random.seed(seed)
    img_max = len(labels) / classes
    counts = [int(img_max * ((1.0 / imbalance_factor) ** (c / (classes - 1.0)))) for c in range(classes)]
    targets_np = np.array(labels, dtype=np.int64)
    chosen = []
    for the_class, the_img_num in zip(np.unique(targets_np), counts, strict=True):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        chosen.append(idx[:the_img_num].tolist())
    return chosen


@pytest.mark.parametrize("classes", [10, 100])
def test_the_subset_is_ldam_drws_for_every_seed_and_factor(tmp_path, classes):
    body = read_archive(fake_archive(tmp_path / "cifar.tar.gz", classes))
    assert body["classes"] == classes and len(body["names"]) == classes
    labels = body["train"][1]
    for seed in (0, 1, 7):
        for factor in (10, 50, 100):
            ours = [c.tolist() for c in literature_subset(labels, classes, factor, seed)]
            assert ours == ldam_drw(labels, classes, factor, seed), (seed, factor)


def test_splits_cifar_writes_lossless_pngs_and_the_literatures_train_split(tmp_path):
    archive = fake_archive(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "cifar10_lt"
    result = run_ffn("splits", "cifar", archive, "--out", out, "--imbalance-factor", 10, "--seed", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    body = read_archive(archive)
    train = read_split(out / "train.txt", out, 10, is_train=True)
    indices = [int(f.rsplit("/", 1)[1].split(".")[0]) for f in train.files]
    expected = ldam_drw(body["train"][1], 10, 10, 3)
    assert indices == [i for per_class in expected for i in per_class]  # the same images, in its order
    assert train.labels.tolist() == [c for c, per_class in enumerate(expected) for _ in per_class]
    test = read_split(out / "test.txt", out, 10)
    assert len(test) == TEST and test.labels.tolist() == body["test"][1].tolist()  # the whole test set
    for i in (0, 17, len(train) - 1):  # PNG: the archive's pixels, exactly
        with Image.open(train.image_path(i)) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), body["train"][0][indices[i]])
    assert (out / "classes.txt").read_text().splitlines() == [f"class{c}" for c in range(10)]
    assert "train.txt" in result.stdout and "test.txt" in result.stdout


@pytest.mark.parametrize("backend", ["memory", "torch", "dali"])
def test_every_loader_decodes_the_archives_bytes(tmp_path, backend):
    archive = fake_archive(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "cifar10"
    write_cifar(archive, out, 10, 0)
    images = read_archive(archive)["test"][0]
    cfg = load_config(
        None,
        [
            f"data.root={out}",
            f"data.backend={backend}",
            "data.mean=[0,0,0]",
            "data.std=[1,1,1]",
            "data.batch_size=16",
        ],
    )
    split = read_split(out / "test.txt", out, 10)
    decoded = np.concatenate(
        [b.images.numpy() for b in build_loader(cfg.data, split, train=False, run_dir=tmp_path / "run")]
    )
    assert decoded.shape == (TEST, 3, 32, 32)
    assert np.array_equal(np.rint(decoded.transpose(0, 2, 3, 1) * 255).astype(np.uint8), images)


def test_val_split_follows_make_lts_rule(tmp_path):
    archive = fake_archive(tmp_path / "cifar-10-python.tar.gz")
    result = write_cifar(archive, tmp_path / "out", 10, 0, val_per_class=3)
    val = read_split(tmp_path / "out" / "val.txt", tmp_path / "out", 10)
    train = read_split(tmp_path / "out" / "train.txt", tmp_path / "out", 10)
    assert np.bincount(val.labels, minlength=10).tolist() == [3] * 10 and not set(val.files) & set(
        train.files
    )
    assert result["val_size"] == 30 and sum(result["train_counts"]) == len(train)
    for name, moved in result["val_from_train"].items():  # a class whose whole pool is in the tail
        label = int(name.removeprefix("class"))
        assert (
            np.sum(train.labels == label)
            == len(ldam_drw(read_archive(archive)["train"][1], 10, 10, 0)[label]) - moved
        )


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("not cifar", "not a CIFAR python archive (no cifar-10-batches-py/batches.meta"),
        ("truncated", "not a readable tar.gz archive"),
        ("no labels", "test_batch: no 'labels' in the batch"),
        ("code", "test_batch: not a CIFAR batch (refused to build builtins.print)"),
    ],
)
def test_bad_archives_are_refused_with_one_line_naming_them(tmp_path, damage, said):
    path = tmp_path / "cifar.tar.gz"
    if damage == "not cifar":
        with tarfile.open(path, "w:gz") as handle:
            info = tarfile.TarInfo("photos/readme.txt")
            handle.addfile(info, io.BytesIO(b""))
    elif damage == "truncated":
        fake_archive(path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        fake_archive(path, broken=damage)
    result = run_ffn("splits", "cifar", path, "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {path}: ") and said in result.stderr, result.stderr
    with pytest.raises(SplitError):
        read_archive(path)
