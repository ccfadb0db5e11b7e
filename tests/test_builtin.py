import pytest

from ffn_dist.data.builtin import ensure_builtin
from ffn_dist.data.splits import read_split, split_stats
from ffn_dist.errors import FFNError
from tests.conftest import run_ffn


def test_builtin_digits_is_long_tailed_and_complete(demo_root):
    train = read_split(demo_root / "train.txt", demo_root, 10, is_train=True)
    test = read_split(demo_root / "test.txt", demo_root, 10)
    counts = train.class_counts()
    assert counts.tolist() == sorted(counts.tolist(), reverse=True)
    stats = split_stats(train)
    assert stats["imbalance_factor"] > 9 and stats["few_shot_classes"] >= 1
    assert stats["many_shot_classes"] >= 1
    assert test.class_counts().tolist() == [30] * 10
    assert not set(train.files) & set(test.files)
    assert all((demo_root / f).is_file() for f in train.files + test.files)


def test_ensure_builtin_is_idempotent_and_refuses_foreign_directories(demo_root, tmp_path):
    assert ensure_builtin("digits", demo_root) is False
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FFNError, match="holds no complete 'digits' dataset"):
        ensure_builtin("digits", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_demo_data_cli(tmp_path):
    result = run_ffn("demo-data", "--out", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "train.txt").is_file() and not (tmp_path / "demo.tmp").exists()
