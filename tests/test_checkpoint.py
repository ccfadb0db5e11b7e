import pytest
import torch

from ffn_dist.checkpoint import (
    CheckpointError,
    ConfigMismatch,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)


class Payload:
    pass


def state(value, config_hash="abc"):
    return {"model": {"w": torch.full((3,), float(value))}, "epoch": value, "config_hash": config_hash}


def test_keeps_the_newest_k_and_ignores_partial_writes(tmp_path):
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, epoch, state(epoch), keep=3)
    assert [e for e, _ in list_checkpoints(tmp_path)] == [3, 4, 5]
    (tmp_path / "epoch_0006.pt.tmp").write_bytes(b"half a checkpoint")  # killed mid-write
    assert load_latest(tmp_path, "abc")[1]["epoch"] == 5


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, state(1), keep=3)
    path = save_checkpoint(tmp_path, 2, state(2), keep=3)
    path.write_bytes(path.read_bytes()[:50])
    assert load_latest(tmp_path, "abc")[0] == 1
    assert "epoch_0002.pt: cannot be loaded safely" in capsys.readouterr().out


def test_other_config_is_refused(tmp_path):
    save_checkpoint(tmp_path, 1, state(1, "abc"), keep=1)
    with pytest.raises(ConfigMismatch, match="written by a different config"):
        load_latest(tmp_path, "xyz")


def test_checkpoints_cannot_run_code(tmp_path):
    # weights_only loading refuses arbitrary objects: unpickling them could run code
    bad = state(1)
    bad["payload"] = Payload()
    path = save_checkpoint(tmp_path, 1, bad, keep=1)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path, "abc")
    assert load_latest(tmp_path, "abc") is None  # skipped, never loaded unsafely
