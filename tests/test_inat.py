"""`ffn splits inat`: iNaturalist 2018's JSON annotations as split files, bad annotations refused."""

import json

import pytest

from ffn_dist.data.inat import write_inat
from ffn_dist.data.splits import read_split
from tests.conftest import run_ffn


def annotations(path, pairs, categories=3, **damage):
    """An iNaturalist-style file: (image id, category id) `pairs`, one annotation each;
    `damage` replaces (or, with None, removes) a top-level key."""
    body = {
        "images": [
            {"id": i, "file_name": f"train_val2018/Plantae/{c}/{i}.jpg", "width": 8} for i, c in pairs
        ],
        "annotations": [{"id": 100 + i, "image_id": i, "category_id": c} for i, c in pairs],
        "categories": [{"id": c, "name": f"species {c}"} for c in range(categories)],
    }
    for key, value in damage.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    path.write_text(json.dumps(body))
    return path


def test_splits_inat_labels_each_image_by_its_category(tmp_path):
    train = annotations(tmp_path / "train2018.json", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 0)])
    val = annotations(tmp_path / "val2018.json", [(10, 2), (11, 0), (12, 1)])
    result = run_ffn("splits", "inat", train, val, "--out", tmp_path / "inat")
    assert result.returncode == 0, result.stderr[-2000:]
    split = read_split(tmp_path / "inat" / "train.txt", tmp_path, 3, is_train=True)
    assert split.files[0] == "train_val2018/Plantae/0/1.jpg" and split.labels.tolist() == [0, 1, 2, 2, 0]
    assert read_split(tmp_path / "inat" / "test.txt", tmp_path, 3).labels.tolist() == [2, 0, 1]
    assert (tmp_path / "inat" / "classes.txt").read_text().splitlines() == [
        "species 0",
        "species 1",
        "species 2",
    ]
    assert "train.txt (5 images, 3 classes)" in result.stdout


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ({"annotations": None}, "no 'annotations' list"),
        ({"images": [{"id": 1}]}, "images[0]: no 'file_name'"),
        (
            {"annotations": [{"image_id": 99, "category_id": 0}]},
            "annotations[0]: image_id 99 is no image of the file",
        ),
        ({"annotations": [{"image_id": 1}]}, "annotations[0]: no 'category_id'"),
        ({"annotations": []}, "1 image(s) without an annotation, e.g. id 1"),
    ],
)
def test_bad_annotations_are_refused_naming_the_file_and_key(tmp_path, damage, said):
    train = annotations(tmp_path / "train2018.json", [(1, 0)], **damage)
    val = annotations(tmp_path / "val2018.json", [(2, 0)])
    result = run_ffn("splits", "inat", train, val, "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {train}: ") and said in result.stderr, result.stderr
    assert not (tmp_path / "out" / "train.txt").exists()


def test_a_test_category_with_no_training_image_is_refused(tmp_path):
    train = annotations(tmp_path / "t.json", [(1, 0), (2, 1)])
    val = annotations(tmp_path / "v.json", [(3, 2)])
    with pytest.raises(Exception, match="category_id 2 has no training image"):
        write_inat(train, val, tmp_path / "out")
    (tmp_path / "bad.json").write_text("{not json")
    result = run_ffn("splits", "inat", tmp_path / "bad.json", val, "--out", tmp_path / "out")
    assert result.returncode == 2 and "bad.json: not valid JSON" in result.stderr
