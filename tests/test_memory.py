"""The memory backend: decoded once, augmented on the device, the same batches as the others."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from ffn_dist.config import ConfigError, load_config
from ffn_dist.data import memory
from ffn_dist.data.loader import build_loader
from ffn_dist.data.memory import decoded_path, fit_problem, random_draws, uniform_ints
from ffn_dist.data.splits import read_split
from ffn_dist.data.transforms import TransformSpec
from ffn_dist.errors import FFNError
from tests.conftest import write_jpeg


def data_cfg(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.num_threads=1", *overrides]).data


def test_eval_tensors_equal_the_torch_backends(demo_root):
    cfg, split = data_cfg(demo_root), read_split(demo_root / "test.txt", demo_root, 10)
    memory, torch_ = (
        next(iter(build_loader(cfg, split, train=False, backend=b))) for b in ("memory", "torch")
    )
    assert torch.equal(memory.indices, torch_.indices) and torch.equal(memory.labels, torch_.labels)
    assert memory.images.shape == (64, 3, 32, 32) and memory.images.dtype == torch.float32
    assert memory.images.is_contiguous()
    assert torch.equal(memory.images, torch_.images)  # the same decoder, geometry and arithmetic


def position_coded_split(tmp_path, samples):
    """One lossless image whose red channel codes the column and green the row (8 per step),
    listed `samples` times: a crop's offset and a flip can be read off any output."""
    side = 32
    x, y = np.meshgrid(np.arange(side), np.arange(side))
    pixels = np.stack([8 * x, 8 * y, np.full_like(x, 100)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "coded.png")
    (tmp_path / "train.txt").write_text("coded.png 0\n" * samples)
    return read_split(tmp_path / "train.txt", tmp_path, 10)


def offsets_and_flips(loader):
    """(dy, dx, flipped) of every sample, read from the centre of its augmented image."""
    images = torch.cat([b.images for b in loader])
    pixels = (images * 255).round().long()  # mean 0, std 1: the 0..255 values back
    red, green = pixels[:, 0, 16], pixels[:, 1, 16, 16]
    flipped = red[:, 17] < red[:, 16]
    dx = red[:, 16] // 8 - torch.where(flipped, 15, 16)
    dy = green // 8 - 16
    return dy.numpy(), dx.numpy(), flipped.numpy()


def test_crops_and_flips_are_distributed_as_the_torch_backends(tmp_path):
    """Tolerance: each backend's 81 (dy, dx) offsets uniform and its flips fair at p > 0.001,
    and the two backends' offsets indistinguishable at p > 0.001 (chi-square tests on 4,096
    samples; both backends draw deterministically from (seed, epoch, index), so the test
    gives the same answer every run)."""
    split = position_coded_split(tmp_path, 4096)
    cfg = data_cfg(tmp_path, "data.mean=[0, 0, 0]", "data.std=[1, 1, 1]", "data.batch_size=512")
    cells = {}
    for backend in ("memory", "torch"):
        dy, dx, flipped = offsets_and_flips(build_loader(cfg, split, train=True, backend=backend, seed=3))
        assert dy.min() == dx.min() == -4 and dy.max() == dx.max() == 4
        cells[backend] = np.bincount((dy + 4) * 9 + dx + 4, minlength=81)
        assert stats.chisquare(cells[backend]).pvalue > 1e-3, backend
        assert stats.binomtest(int(flipped.sum()), len(flipped)).pvalue > 1e-3, backend
    assert stats.chi2_contingency(np.stack([cells["memory"], cells["torch"]])).pvalue > 1e-3


def test_a_samples_augmentation_depends_on_seed_epoch_and_index_only(demo_root):
    cfg = data_cfg(demo_root, "data.batch_size=16")
    split = read_split(demo_root / "train.txt", demo_root, 10, is_train=True)

    def by_index(loader):
        batches = list(loader)
        return {int(i): image for b in batches for i, image in zip(b.indices, b.images, strict=True)}

    alone = by_index(build_loader(cfg, split, train=True, backend="memory", seed=5))
    sharded = by_index(build_loader(cfg, split, train=True, backend="memory", seed=5, rank=1, size=3))
    assert len(sharded) > 100 and all(torch.equal(sharded[i], alone[i]) for i in sharded)
    again = build_loader(cfg, split, train=True, backend="memory", seed=5)
    again.set_epoch(1)
    assert not all(torch.equal(image, alone[i]) for i, image in by_index(again).items())


def test_the_decoded_split_is_stored_reused_and_rebuilt_when_stale(demo_copy, tmp_path, capsys, monkeypatch):
    cfg = data_cfg(demo_copy)
    split = read_split(demo_copy / "test.txt", demo_copy, 10)
    first = next(iter(build_loader(cfg, split, train=False, backend="memory", run_dir=tmp_path)))
    (stored,) = (tmp_path / "decoded").glob("test_*.safetensors")
    assert stored == decoded_path(tmp_path / "decoded", split, TransformSpec.from_config(cfg, False))
    written = stored.stat().st_mtime_ns
    build_loader(cfg, split, train=False, backend="memory", run_dir=tmp_path)
    assert stored.stat().st_mtime_ns == written  # reused, not decoded again

    write_jpeg(split.image_path(0), seed=99)  # an image changed on disk
    capsys.readouterr()
    changed = next(iter(build_loader(cfg, split, train=False, backend="memory", run_dir=tmp_path)))
    assert "images changed since it was decoded; decoding" in capsys.readouterr().out
    assert not torch.equal(changed.images[0], first.images[0]) and torch.equal(
        changed.images[1:], first.images[1:]
    )

    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # the stored array damaged, then read by another process
    stored.write_bytes(bytes(data))
    monkeypatch.setattr(memory, "_LOADED", {})
    again = next(iter(build_loader(cfg, split, train=False, backend="memory", run_dir=tmp_path)))
    assert "sha256 differs" in capsys.readouterr().out and torch.equal(again.images, changed.images)


def test_a_split_too_large_is_refused_before_decoding(demo_root, tmp_path):
    cfg = data_cfg(demo_root, "data.memory_limit_gb=0.001")
    split = read_split(demo_root / "train.txt", demo_root, 10, is_train=True)
    with pytest.raises(FFNError) as info:
        build_loader(cfg, split, train=True, backend="memory", run_dir=tmp_path)
    message = str(info.value)
    assert f"{split.path}: data.backend=memory would hold 585 images of 32x32" in message
    assert "(padded and mirrored for random crops): 0.01 GB, over data.memory_limit_gb = 0.001" in message
    assert not (tmp_path / "decoded").exists()


def test_the_limit_and_the_free_device_memory_both_bound_it():
    assert fit_problem(10**9, limit_gb=4, free=8 * 10**9) is None
    assert "over data.memory_limit_gb = 0.5" in fit_problem(10**9, limit_gb=0.5, free=None)
    assert "over half of the 1.50 GB free on the device" in fit_problem(10**9, limit_gb=4, free=15 * 10**8)


def test_random_resized_crop_is_refused_in_the_config():
    with pytest.raises(ConfigError, match="data.backend: memory supports data.train_crop=pad_crop"):
        load_config(None, ["data.backend=memory", "data.train_crop=random_resized_crop"])


def test_draws_are_uniform_and_fixed_by_their_inputs():
    indices = torch.arange(90_000)
    values = uniform_ints(random_draws(0, 0, indices, "dx"), 9)
    assert np.allclose(np.bincount(values.numpy(), minlength=9) / 90_000, 1 / 9, atol=0.005)
    assert torch.equal(random_draws(0, 0, indices, "dx"), random_draws(0, 0, indices, "dx"))
    for other in (
        random_draws(1, 0, indices, "dx"),
        random_draws(0, 1, indices, "dx"),
        random_draws(0, 0, indices, "dy"),
    ):
        assert (other != random_draws(0, 0, indices, "dx")).float().mean() > 0.99


def test_colour_jitter_is_per_sample_and_repeatable(demo_root):
    split = read_split(demo_root / "train.txt", demo_root, 10, is_train=True)

    def batch(*overrides):
        cfg = data_cfg(demo_root, "data.batch_size=16", *overrides)
        return next(iter(build_loader(cfg, split, train=True, backend="memory", seed=2)))

    plain, jittered, again = batch(), batch("data.color_jitter=0.4"), batch("data.color_jitter=0.4")
    assert torch.equal(plain.indices, jittered.indices) and torch.equal(jittered.images, again.images)
    changed = (jittered.images - plain.images).abs().flatten(1).amax(1)
    assert (changed > 0.05).float().mean() > 0.9  # nearly every image gets its own factors
