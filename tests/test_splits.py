import json

import numpy as np
import pytest

from ffn_dist.data.splits import SplitError, read_split, shot_groups, split_stats
from tests.conftest import run_ffn


def write_split_file(tmp_path, text, name="train.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_imagenet_lt_format(tmp_path):
    path = write_split_file(
        tmp_path,
        "train/n01440764/n01440764_190.JPEG 0\n"
        "train/n01443537/n01443537_2.JPEG 1\n"
        "\n"
        "train/n01443537/n01443537_7.JPEG 1\n",
    )
    split = read_split(path, tmp_path / "imagenet", 2, is_train=True)
    assert split.files[0] == "train/n01440764/n01440764_190.JPEG"
    assert split.labels.tolist() == [0, 1, 1]
    assert split.lines.tolist() == [1, 2, 4]  # blank lines are skipped, numbering is the file's
    assert split.class_counts().tolist() == [1, 2]
    assert split.where(2) == f"{path}:4 ({tmp_path / 'imagenet/train/n01443537/n01443537_7.JPEG'})"


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("a.jpg 0\nlonely_path\n", r":2: malformed line 'lonely_path'"),
        ("a.jpg 0\nb.jpg one\n", r":2: label 'one' is not an integer"),
        ("a.jpg 0\nb.jpg 1.5\n", r":2: label '1.5' is not an integer"),
        ("a.jpg 0\nb.jpg 3\n", r":2: label 3 out of range, expected 0..2"),
        ("a.jpg -1\n", r":1: label -1 out of range"),
        ("a.jpg 0\n/abs/b.jpg 1\n", r":2: absolute path '/abs/b.jpg'"),
        ("a.jpg 0\n../b.jpg 1\n", r":2: path '../b.jpg' leaves the data root"),
        ("a.jpg 0\nx/../../b.jpg 1\n", r":2: path 'x/../../b.jpg' leaves the data root"),
        ("\n\n", r"empty split, no samples"),
        ("a.jpg 0\nb.jpg 2\n", r"1 class\(es\) have no training sample: 1"),
    ],
)
def test_refusals_name_file_line_and_reason(tmp_path, text, pattern):
    path = write_split_file(tmp_path, text)
    with pytest.raises(SplitError, match=pattern) as info:
        read_split(path, tmp_path, 3, is_train=True)
    assert str(path) in str(info.value)


def test_missing_class_is_allowed_outside_training(tmp_path):
    path = write_split_file(tmp_path, "a.jpg 0\nb.jpg 2\n", "test.txt")
    assert len(read_split(path, tmp_path, 3)) == 2


def test_paths_with_inner_dotdot_that_stay_in_root_are_fine(tmp_path):
    path = write_split_file(tmp_path, "x/../a.jpg 0\n")
    assert read_split(path, tmp_path, 1).files == ("x/../a.jpg",)


def test_shot_groups_boundaries():
    groups = shot_groups(np.array([101, 100, 20, 19, 1, 1280]))
    assert groups["many"].tolist() == [True, False, False, False, False, True]
    assert groups["medium"].tolist() == [False, True, True, False, False, False]
    assert groups["few"].tolist() == [False, False, False, True, True, False]


def test_stats_cli_json(tmp_path):
    counts = [150, 100, 20, 19, 5]
    lines = "".join(f"c{c}/{i}.jpg {c}\n" for c, n in enumerate(counts) for i in range(n))
    path = write_split_file(tmp_path, lines)
    result = run_ffn("splits", "stats", path, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["samples"] == sum(counts) and stats["classes"] == 5
    assert (stats["min_per_class"], stats["max_per_class"]) == (5, 150)
    assert stats["imbalance_factor"] == 30.0
    assert (stats["many_shot_classes"], stats["medium_shot_classes"], stats["few_shot_classes"]) == (1, 2, 2)
    assert stats == split_stats(read_split(path, tmp_path, is_train=True))


def test_stats_cli_refusal_is_one_clear_line(tmp_path):
    path = write_split_file(tmp_path, "a.jpg zero\n")
    result = run_ffn("splits", "stats", path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}:1: label 'zero' is not an integer"
