import sys

import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import DataLoader

from ffn_dist.config import load_config
from ffn_dist.data import torch_loader
from ffn_dist.data.loader import BadImageError, build_loader
from ffn_dist.data.splits import read_split
from ffn_dist.errors import FFNError
from tests.conftest import write_jpeg

BACKENDS = ["dali", "torch"]
ALL_BACKENDS = [*BACKENDS, "memory"]


def data_cfg(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.num_threads=1", *overrides]).data


def demo_split(root, name="test.txt", is_train=False):
    return read_split(root / name, root, 10, is_train=is_train)


def first_batch(cfg, split, backend, train=False):
    return next(iter(build_loader(cfg, split, train=train, backend=backend)))


def test_backends_agree_on_eval_tensors_for_cifar_sized_jpegs(demo_root):
    cfg, split = data_cfg(demo_root), demo_split(demo_root)
    dali, ref = (first_batch(cfg, split, b) for b in BACKENDS)
    assert torch.equal(dali.indices, ref.indices) and torch.equal(dali.labels, ref.labels)
    assert dali.images.shape == ref.images.shape == (64, 3, 32, 32)
    assert dali.images.dtype == ref.images.dtype == torch.float32
    assert dali.images.is_contiguous() and ref.images.is_contiguous()
    # same decoder family, no resampling at 32 px: equal to float rounding
    assert float((dali.images - ref.images).abs().max()) < 1e-4
    # and normalised with the configured mean/std: undo it and get the 0..1 pixels back
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.mean, cfg.std))
    pixels = ref.images * std + mean
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6


def test_backends_agree_on_resized_centre_crops(tmp_path):
    sizes = [(400, 350), (300, 500), (256, 256)]
    for i, size in enumerate(sizes):
        write_jpeg(tmp_path / f"img{i}.jpg", size=size, seed=i, smooth=True)
    (tmp_path / "test.txt").write_text("".join(f"img{i}.jpg {i}\n" for i in range(3)))
    split = read_split(tmp_path / "test.txt", tmp_path, 3)
    cfg = data_cfg(tmp_path, "data.image_size=224", "data.resize_size=256", "data.num_classes=3")
    dali, ref = (first_batch(cfg, split, b) for b in BACKENDS)
    assert dali.images.shape == ref.images.shape == (3, 3, 224, 224)
    # same output geometry, resampling kernels differ by rounding: < 1/255 on average
    diff = (dali.images - ref.images).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert float(diff.mean()) < 1 / 255 and float(diff.max()) < 4 / 255


@pytest.mark.parametrize("crop, size", [("pad_crop", 32), ("random_resized_crop", 24)])
def test_train_batches_have_the_same_layout_in_both_backends(demo_root, crop, size):
    cfg = data_cfg(
        demo_root,
        f"data.train_crop={crop}",
        f"data.image_size={size}",
        f"data.resize_size={max(size, 32)}",
        "data.color_jitter=0.4",
        "data.batch_size=16",
    )
    split = demo_split(demo_root, "train.txt", is_train=True)
    batches = [first_batch(cfg, split, b, train=True) for b in BACKENDS]
    for batch in batches:
        assert batch.images.shape == (16, 3, size, size) and batch.images.dtype == torch.float32
        assert batch.labels.dtype == batch.indices.dtype == torch.int64
        assert torch.equal(batch.labels, torch.from_numpy(split.labels[batch.indices.numpy()]))
    assert torch.equal(batches[0].indices, batches[1].indices)  # same sampler, same order


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_epochs_follow_set_epoch_and_cover_the_split(demo_root, backend):
    split = demo_split(demo_root, "train.txt", is_train=True)
    loader = build_loader(data_cfg(demo_root), split, train=True, backend=backend, seed=1)
    seen = {}
    for epoch in (0, 1, 1, 5):
        loader.set_epoch(epoch)
        indices = torch.cat([b.indices for b in loader]).numpy()
        assert sorted(indices.tolist()) == list(range(len(split)))
        if epoch in seen:
            assert (seen[epoch] == indices).all()  # an epoch's order is a function of (seed, epoch)
        seen[epoch] = indices
    assert not (seen[0] == seen[1]).all()
    loader.set_epoch(2)
    next(iter(loader))  # abandon an epoch half-way: the next one starts clean
    loader.set_epoch(3)
    assert len(torch.cat([b.indices for b in loader])) == len(split)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_resumed_epoch_starts_at_its_batch_and_the_next_epoch_is_whole(demo_root, backend):
    split = demo_split(demo_root, "train.txt", is_train=True)
    loader = build_loader(data_cfg(demo_root), split, train=True, backend=backend, seed=1)
    loader.set_epoch(4)
    whole = torch.cat([b.indices for b in loader])
    fresh = build_loader(data_cfg(demo_root), split, train=True, backend=backend, seed=1)
    fresh.set_epoch(4, start_batch=3)
    rest = torch.cat([b.indices for b in fresh])
    assert torch.equal(rest, whole[3 * fresh.batch_size :])
    fresh.set_epoch(5)
    assert len(torch.cat([b.indices for b in fresh])) == len(split)


def damage(root, split, kind):
    """Damage the 6th image of `split`; return its line number."""
    path = split.image_path(5)
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:120])
    else:
        path.write_bytes(b"this is not a jpeg" * 8)
    return int(split.lines[5])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage"])
def test_bad_image_stops_with_split_line_and_path(demo_copy, backend, kind):
    split = demo_split(demo_copy)
    line = damage(demo_copy, split, kind)
    with pytest.raises(BadImageError) as info:  # the memory backend: when it decodes, up front
        for _ in build_loader(data_cfg(demo_copy, "data.batch_size=4"), split, train=False, backend=backend):
            pass
    message = str(info.value)
    assert f"{split.path}:{line} ({split.image_path(5)})" in message
    assert "data.on_bad_image=skip" in message and "Traceback" not in message


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_skip_excludes_bad_images_and_lists_them_once(demo_copy, backend, capsys):
    split = demo_split(demo_copy)
    line = damage(demo_copy, split, "garbage")
    loader = build_loader(data_cfg(demo_copy, "data.on_bad_image=skip"), split, train=False, backend=backend)
    indices = torch.cat([b.indices for b in loader]).numpy()
    assert len(indices) == len(split) - 1
    assert f"{split.path}:{line}" in capsys.readouterr().out
    kept_lines = loader.split.lines[indices]
    assert line not in kept_lines.tolist() and len(np.unique(kept_lines)) == len(split) - 1


def test_without_dali_the_dali_backend_is_refused_and_the_torch_one_still_runs(demo_root, monkeypatch):
    """A machine without DALI (a bare CUDA image) gets a message that says what to do."""
    monkeypatch.setitem(sys.modules, "nvidia.dali.plugin.pytorch", None)  # any import of it fails
    cfg, split = data_cfg(demo_root), demo_split(demo_root)
    with pytest.raises(FFNError, match="data.backend=dali needs NVIDIA DALI.*set data.backend=torch"):
        build_loader(cfg, split, train=False, backend="dali")
    assert first_batch(cfg, split, "torch").images.shape == (64, 3, 32, 32)


@pytest.fixture
def worker_starts(monkeypatch):
    """Counts the times DataLoader workers are started, in a process with no pool yet."""
    monkeypatch.setattr(torch_loader, "_POOLS", {})
    starts = []
    start = DataLoader._get_iterator

    def counted(self):
        starts.append(self)
        return start(self)

    monkeypatch.setattr(DataLoader, "_get_iterator", counted)
    return starts


def test_torch_loader_workers_start_once_for_every_epoch_split_and_view(demo_root, worker_starts):
    """Start-up (seconds: a fresh interpreter per worker) is paid once per process, not per
    epoch, per evaluation or per cache pass."""
    cfg = data_cfg(demo_root, "data.num_threads=2")
    train_split = demo_split(demo_root, "train.txt", is_train=True)
    train = build_loader(cfg, train_split, train=True, backend="torch")
    test = build_loader(cfg, demo_split(demo_root), train=False, backend="torch")
    me = psutil.Process()
    for epoch in range(3):
        train.set_epoch(epoch)
        assert len(torch.cat([b.indices for b in train])) == len(train_split)
        if epoch == 0:
            workers = {p.pid for p in me.children(recursive=True)}
        assert len(torch.cat([b.indices for b in test])) == 300  # the evaluation between epochs
    views = build_loader(cfg, train_split.subset(range(40)), train=True, backend="torch", order="sequential")
    for view in (1, 2):  # a cache's augmented passes over a part
        views.set_epoch(view)
        assert torch.cat([b.indices for b in views]).tolist() == list(range(40))
    assert len(worker_starts) == 1
    assert {p.pid for p in me.children(recursive=True)} == workers  # the same processes throughout


def test_two_torch_loaders_cannot_be_read_at_once(demo_root, worker_starts):
    cfg = data_cfg(demo_root, "data.batch_size=8")
    first, second = (build_loader(cfg, demo_split(demo_root), train=False, backend="torch") for _ in range(2))
    reading = iter(first)
    next(reading)
    next(iter(second))  # takes the shared workers over
    with pytest.raises(RuntimeError, match="two torch loaders were iterated at once"):
        next(reading)


def test_a_batch_comes_in_parts_where_an_epoch_has_fewer_batches_than_workers(demo_root, worker_starts):
    """Every worker gets work (an epoch of 8 batches once kept 8 of 16 workers idle), and the
    batch is the one a single worker would make."""
    split = demo_split(demo_root, "train.txt", is_train=True).subset(range(40))  # one batch of 40

    def loader():
        cfg = data_cfg(demo_root, "data.num_threads=2", "data.batch_size=64")
        return build_loader(cfg, split, train=True, backend="torch", order="sequential")

    parted, unparted = loader(), loader()
    unparted.parts_per_batch = lambda batches: 1  # as before: one request a batch
    requests = list(parted.requests())
    assert [len(r.paths) for r in requests] == [20, 20] and [r.ends_batch for r in requests] == [False, True]
    (joined,), (whole,) = list(parted), list(unparted)
    assert torch.equal(joined.images, whole.images) and torch.equal(joined.labels, whole.labels)
    assert joined.indices.tolist() == whole.indices.tolist() == list(range(40))
    assert parted.parts_per_batch(452) == 1  # ImageNet-LT's epochs: whole batches, as before
    assert len(worker_starts) == 1  # one pool served both
