import tarfile

import pytest

from ffn_dist.data.longtail import exp_profile, make_lt, pareto_profile
from ffn_dist.data.splits import SplitError, read_split
from tests.conftest import SHARED_CIFAR, run_ffn

CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def fake_image_folder(root, per_class, classes):
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:04d}.jpg").touch()


def test_exp_profile_is_the_cifar_lt_one():
    assert exp_profile(10, 5000, 100) == CIFAR10_LT_IF100
    assert sum(exp_profile(10, 5000, 100)) == 12406
    counts = exp_profile(100, 500, 100)
    assert counts[0] == 500 and counts[-1] == 5 and len(counts) == 100 and sum(counts) == 10847


def test_make_lt_on_cifar10_layout_gives_exact_counts(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    fake_image_folder(tmp_path / "img" / "train", 5000, classes)
    fake_image_folder(tmp_path / "img" / "test", 1000, classes)
    result = run_ffn(
        "splits",
        "make-lt",
        "--image-root",
        tmp_path / "img",
        "--out",
        tmp_path / "lt",
        "--profile",
        "exp",
        "--imbalance-factor",
        "100",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    train = read_split(tmp_path / "lt" / "train.txt", tmp_path / "img", 10, is_train=True)
    test = read_split(tmp_path / "lt" / "test.txt", tmp_path / "img", 10)
    assert len(train) == 12406 and train.class_counts().tolist() == CIFAR10_LT_IF100
    assert test.class_counts().tolist() == [1000] * 10
    assert all(f.startswith("train/") for f in train.files) and len(set(train.files)) == 12406
    assert (tmp_path / "lt" / "classes.txt").read_text().split() == classes
    # reproducible for a seed, different for another
    make_lt(tmp_path / "img", tmp_path / "again", "exp", 100, seed=3)
    make_lt(tmp_path / "img", tmp_path / "other", "exp", 100, seed=4)
    first = (tmp_path / "lt" / "train.txt").read_text()
    assert (tmp_path / "again" / "train.txt").read_text() == first
    assert (tmp_path / "other" / "train.txt").read_text() != first


def test_a_balanced_val_split_from_the_images_the_long_tail_left_out(tmp_path):
    classes = [f"c{i}" for i in range(4)]
    fake_image_folder(tmp_path / "img" / "train", 100, classes)
    fake_image_folder(tmp_path / "img" / "test", 20, classes)
    make_lt(tmp_path / "img", tmp_path / "plain", "exp", 10, seed=1)
    result = run_ffn(
        "splits",
        "make-lt",
        *("--image-root", tmp_path / "img", "--out", tmp_path / "lt", "--profile", "exp"),
        *("--imbalance-factor", "10", "--seed", "1", "--val-per-class", "30"),
    )
    assert result.returncode == 0 and "val.txt (120 images)" in result.stdout, result.stderr
    # the head class's whole pool (100) is in the long tail: its 30 come out of its training share
    assert "val.txt: 30 of class c0's images come from its training images" in result.stdout
    train = read_split(tmp_path / "lt" / "train.txt", tmp_path / "img", 4, is_train=True)
    plain = read_split(tmp_path / "plain" / "train.txt", tmp_path / "img", 4, is_train=True)
    val = read_split(tmp_path / "lt" / "val.txt", tmp_path / "img", 4)
    assert val.class_counts().tolist() == [30] * 4
    assert train.class_counts().tolist() == [70, *plain.class_counts().tolist()[1:]]
    assert not set(val.files) & set(train.files) and all(f.startswith("train/") for f in val.files)
    assert set(train.files) <= set(plain.files)  # the other classes' training images unchanged
    assert (tmp_path / "lt" / "test.txt").read_text() == (tmp_path / "plain" / "test.txt").read_text()
    make_lt(tmp_path / "img", tmp_path / "again", "exp", 10, seed=1, val_per_class=30)
    assert (tmp_path / "again" / "val.txt").read_text() == (tmp_path / "lt" / "val.txt").read_text()
    with pytest.raises(SplitError, match="class c0: 100 images, too few for --val-per-class 100"):
        make_lt(tmp_path / "img", tmp_path / "none", "exp", 1, seed=1, val_per_class=100)


def test_pareto_profile_is_reproducible_unsorted_and_bounded():
    counts = pareto_profile(1000, 1280, 256, seed=0)
    assert counts == pareto_profile(1000, 1280, 256, seed=0)
    assert counts != pareto_profile(1000, 1280, 256, seed=1)
    assert max(counts) == 1280 and min(counts) == 5
    assert counts != sorted(counts, reverse=True)  # class ids are not ordered by frequency
    # alpha 6 puts most classes near the tail, as in ImageNet-LT (mean 116 per class)
    assert 60 < sum(counts) / 1000 < 200
    assert sorted(counts)[500] < 120


def test_make_lt_pareto_with_held_out_test(tmp_path):
    fake_image_folder(tmp_path / "img", 60, [f"c{i}" for i in range(20)])
    make_lt(tmp_path / "img", tmp_path / "lt", "pareto", 10, seed=0, test_per_class=10)
    train = read_split(tmp_path / "lt" / "train.txt", tmp_path / "img", 20, is_train=True)
    test = read_split(tmp_path / "lt" / "test.txt", tmp_path / "img", 20)
    assert train.class_counts().max() == 50 and train.class_counts().min() == 5
    assert test.class_counts().tolist() == [10] * 20
    assert not set(train.files) & set(test.files)


def test_make_lt_refusals(tmp_path):
    fake_image_folder(tmp_path / "img", 5, ["a", "b"])
    with pytest.raises(SplitError, match="pass --test-per-class"):
        make_lt(tmp_path / "img", tmp_path / "lt", "exp", 10, seed=0)
    with pytest.raises(SplitError, match="need more than --test-per-class 5"):
        make_lt(tmp_path / "img", tmp_path / "lt", "exp", 10, seed=0, test_per_class=5)
    with pytest.raises(SplitError, match="image folder not found"):
        make_lt(tmp_path / "none", tmp_path / "lt", "exp", 10, seed=0, test_per_class=1)
    assert not (tmp_path / "lt" / "train.txt").exists()


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"real CIFAR-10 JPEGs absent ({SHARED_CIFAR})")
def test_make_lt_on_real_cifar10_jpegs(tmp_path):
    with tarfile.open(SHARED_CIFAR) as archive:
        archive.extractall(tmp_path / "cifar", filter="data")
    (root,) = [p.parent for p in (tmp_path / "cifar").rglob("train") if p.is_dir()]
    make_lt(root, tmp_path / "lt", "exp", 100, seed=0)
    train = read_split(tmp_path / "lt" / "train.txt", root, 10, is_train=True)
    assert train.class_counts().tolist() == CIFAR10_LT_IF100
    assert all((root / f).is_file() for f in train.files)
