import numpy as np
import pytest
import torch

from ffn_dist.data.mixup import mixup
from ffn_dist.data.sampling import ShardSampler, epoch_order, shard


@pytest.mark.parametrize("n, size", [(10, 1), (10, 3), (11, 4), (3, 4), (100, 2)])
def test_shards_cover_the_split_with_equal_lengths(n, size):
    order = epoch_order(np.zeros(n, dtype=np.int64), "shuffle", seed=1, epoch=0)
    shards = [shard(order, r, size) for r in range(size)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    assert set(np.concatenate(shards).tolist()) == set(range(n))
    # only the padding repeats: the first n of the interleaved shards are a permutation
    interleaved = np.stack(shards, 1).reshape(-1)[:n]
    assert sorted(interleaved.tolist()) == list(range(n))


def test_orders_depend_on_seed_and_epoch_only():
    labels = np.arange(50) % 5
    a = ShardSampler(labels, "shuffle", 0, 2, seed=3)
    b = ShardSampler(labels, "shuffle", 0, 2, seed=3)
    assert (a.indices(4) == b.indices(4)).all() and not (a.indices(4) == a.indices(5)).all()
    assert (ShardSampler(labels, "sequential", 1, 2).indices(9) == np.arange(1, 50, 2)).all()


def test_balanced_sampling_draws_classes_uniformly():
    counts = [5000, 500, 50, 5]
    labels = np.repeat(np.arange(4), counts)
    draws = np.concatenate([epoch_order(labels, "balanced", seed=0, epoch=e) for e in range(4)])
    assert len(draws) == 4 * len(labels)
    freq = np.bincount(labels[draws], minlength=4) / len(draws)
    assert np.allclose(freq, 0.25, atol=0.01)
    tail = draws[labels[draws] == 3]
    assert set(tail.tolist()) == set(np.flatnonzero(labels == 3).tolist())  # every tail image used


def test_balanced_sampling_sharded_keeps_uniform_classes_on_each_rank():
    labels = np.repeat(np.arange(3), [900, 90, 9])
    for rank in range(3):
        sampler = ShardSampler(labels, "balanced", rank, 3, seed=5)
        picked = np.concatenate([sampler.indices(e) for e in range(20)])
        assert len(sampler.indices(0)) == 333
        assert np.allclose(np.bincount(labels[picked]) / len(picked), 1 / 3, atol=0.03)


def test_mixup_arithmetic():
    rng = np.random.default_rng(0)
    images = torch.randn(8, 3, 4, 4)
    labels = torch.arange(8)
    mixed, y_a, y_b, lam = mixup(images, labels, 1.0, rng)
    assert 0.0 <= lam <= 1.0 and torch.equal(y_a, labels)
    perm = y_b  # labels are 0..7, so y_b is the pairing permutation
    assert sorted(perm.tolist()) == list(range(8))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[perm])
    same, ya, yb, one = mixup(images, labels, 0.0, rng)
    assert one == 1.0 and same is images and torch.equal(ya, yb)


def test_mixup_lambda_follows_beta():
    rng = np.random.default_rng(1)
    x, y = torch.zeros(4, 1), torch.arange(4)
    lams = np.array([mixup(x, y, 0.2, rng)[3] for _ in range(2000)])
    # Beta(0.2, 0.2) is U-shaped: mean 1/2, most mass near 0 and 1
    assert abs(lams.mean() - 0.5) < 0.03 and ((lams < 0.1) | (lams > 0.9)).mean() > 0.6


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_whole_steps_make_step_k_the_same_images_on_any_number_of_ranks(size):
    """Padded to whole steps of a global batch of 16, rank r's batch k (of 16 / size) holds
    positions 16k .. 16k + 15 of the epoch's order, whatever the group size."""
    order = np.random.default_rng(0).permutation(75)
    shares = [shard(order, r, size, multiple=16) for r in range(size)]
    per_rank = 16 // size
    assert {len(s) for s in shares} == {80 // size}  # 5 whole steps, the last completed by wrapping
    for step in range(5):
        batch = np.concatenate([s[step * per_rank : (step + 1) * per_rank] for s in shares])
        assert sorted(batch) == sorted(np.resize(order, 80)[step * 16 : (step + 1) * 16])
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        shard(order, 0, 3, multiple=16)


def test_square_root_sampling_draws_a_class_as_the_root_of_its_count():
    counts = [5000, 500, 50, 5]
    labels = np.repeat(np.arange(4), counts)
    draws = np.concatenate([epoch_order(labels, "sqrt", seed=0, epoch=e) for e in range(4)])
    freq = np.bincount(labels[draws], minlength=4) / len(draws)
    expected = np.sqrt(counts) / np.sqrt(counts).sum()
    # binomial standard error of each share over 22,220 draws is at most 0.0034: 4 of them allowed
    assert np.allclose(freq, expected, atol=4 * np.sqrt(0.25 / len(draws)))
    assert (epoch_order(labels, "sqrt", 0, 1) == epoch_order(labels, "sqrt", 0, 1)).all()
