"""The feature cache: written by real torchrun processes, checked, resumed, refused when stale."""

import json
import shutil

import numpy as np
import pytest
import torch

from ffn_dist.bench.cache import fake_stage1
from ffn_dist.cache.shards import CacheError, MappedShard, sha256_file
from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader
from ffn_dist.models.heads import CosineHead, fused_embedding
from ffn_dist.run.paths import cache_dir
from ffn_dist.stages.cache import cache_features, load_frozen, open_run_cache
from tests.conftest import CONFIG, TEST_IMAGES, TRAIN_IMAGES, run_ffn
from tests.conftest import cache_overrides as overrides
from tests.test_loaders import worker_starts  # noqa: F401  (a fixture)


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run", symlinks=True)


def test_two_processes_cache_every_sample_of_every_view_once(cached_run, tiny_root):
    cfg = load_config(CONFIG, overrides(tiny_root, cached_run))
    manifest = json.loads((cache_dir(cfg) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 3 * TRAIN_IMAGES
    assert manifest["splits"]["test"]["rows"] == TEST_IMAGES
    assert manifest["dims"] == 64 and manifest["store"] == "normalized"
    assert manifest["dtype"] == {
        "train": "fp16",
        "val": "fp32",
        "test": "fp32",
    }  # eval splits: the export's numbers
    made_from = set(json.loads((cached_run / "stages" / "cache.json").read_text())["inputs"])
    assert {f"stage1 output stage1/{b}/epoch_0002.pt" for b in ("ce", "kps")} <= made_from
    for entry in manifest["splits"].values():
        for part in entry["parts"]:
            assert sha256_file(cache_dir(cfg) / part["file"]) == part["sha256"]
    cache = open_run_cache(cfg)
    dataset = open_dataset(cfg.data)
    for name, split in dataset.splits().items():
        cached = cache.splits[name]
        for view in range(3 if name == "train" else 1):
            rows = cached.rows_of_view(view)
            assert sorted(cached.indices[rows]) == list(range(len(split)))
            assert (cached.labels[rows] == split.labels[cached.indices[rows]]).all()
    shard = cache.splits["train"].shards[0]
    assert isinstance(shard["kps"], np.memmap) and shard["kps"].dtype == np.float16
    train = cache.splits["train"]
    by_view = [
        train.branch(train.rows_of_view(v)[np.argsort(train.indices[train.rows_of_view(v)])], "ce")
        for v in range(3)
    ]
    assert torch.allclose(by_view[0].norm(dim=1), torch.ones(TRAIN_IMAGES), atol=2e-3)
    assert not torch.allclose(by_view[0], by_view[1], atol=1e-2)  # views 1, 2 are augmented crops
    assert not torch.allclose(by_view[1], by_view[2], atol=1e-2)


@pytest.mark.parametrize("fusion", [{"kps": 0.5, "ce": 0.5}, {"kps": 0.9, "ce": 0.1}])
def test_logits_from_the_cache_equal_logits_from_the_live_backbones(cached_run, tiny_root, fusion):
    cfg = load_config(CONFIG, overrides(tiny_root, cached_run))
    test = open_run_cache(cfg).splits["test"]
    head = CosineHead(64, 10)
    rows = test.rows_of_view(0)
    cached = head(test.fused(rows, fusion), normalized=True)[np.argsort(test.indices[rows])]
    networks = {b: load_frozen(cfg, b, torch.device("cpu")) for b in ("ce", "kps")}
    live = []
    with torch.no_grad():
        for batch in build_loader(cfg.data, open_dataset(cfg.data).test, train=False):
            features = {b: networks[b].embed(batch.images) for b in ("ce", "kps")}
            live.append(head(fused_embedding(features, fusion), normalized=True))
    live = torch.cat(live)
    assert live.shape == cached.shape == (TEST_IMAGES, 10)
    assert (live - cached).abs().max() < 1e-4  # the test split is computed and stored in fp32
    assert torch.equal(live.argmax(1), cached.argmax(1))


def test_rerun_rewrites_only_missing_or_damaged_shards(cached_run, tiny_root, tmp_path):
    out = copy_run(cached_run, tmp_path)
    cfg = load_config(CONFIG, overrides(tiny_root, out))
    shards = sorted(cache_dir(cfg).rglob("*.safetensors"))
    missing, truncated, *kept = shards
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:100])
    before = {p: p.stat().st_mtime_ns for p in kept}
    result = run_ffn("cache-features", CONFIG, *overrides(tiny_root, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(kept)} of {len(shards)} shards already complete" in result.stdout
    assert f"{truncated}: size 100 bytes" in result.stdout and "rewriting it" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == before
    assert missing.is_file() and len(open_run_cache(cfg).splits["train"]) == 3 * TRAIN_IMAGES


def test_stale_or_altered_cache_is_refused_with_what_changed(cached_run, tiny_root, tmp_path):
    out = copy_run(cached_run, tmp_path)
    changed = load_config(CONFIG, overrides(tiny_root, out, "cache.dtype=fp32"))
    with pytest.raises(
        CacheError, match=r"the feature cache is stale \(cache.dtype: 'fp16' when it ran, 'fp32' now"
    ):
        open_run_cache(changed)
    refused = run_ffn("cache-features", CONFIG, *overrides(tiny_root, out, "cache.dtype=fp32"))
    assert refused.returncode == 2 and "Rerun with --rebuild" in refused.stderr

    cfg = load_config(CONFIG, overrides(tiny_root, out))
    shard = sorted(cache_dir(cfg).rglob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="sha256 differs from the one recorded"):
        open_run_cache(cfg)

    checkpoint = out / "stage1" / "ce" / "epoch_0002.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["head.bias"] += 1
    torch.save(state, checkpoint)
    with pytest.raises(CacheError, match="stage1 output stage1/ce/epoch_0002.pt: '[0-9a-f]+' when it ran"):
        open_run_cache(cfg)


def test_fused_store_holds_only_z_for_its_weights(cached_run, tiny_root, tmp_path):
    out = copy_run(cached_run, tmp_path)
    shutil.rmtree(out / "cache")
    args = overrides(tiny_root, out, "cache.store=fused", "cache.train_views=1")
    result = run_ffn("cache-features", CONFIG, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    fused = open_run_cache(load_config(CONFIG, args)).splits["test"]
    full = open_run_cache(load_config(CONFIG, overrides(tiny_root, cached_run))).splits["test"]
    assert set(MappedShard(fused.shards[0].path).arrays) == {"fused", "labels", "indices"}
    order_f, order_n = np.argsort(fused.indices), np.argsort(full.indices[full.rows_of_view(0)])
    z = fused.fused(np.arange(len(fused))[order_f], {"kps": 0.5, "ce": 0.5})
    reference = full.fused(full.rows_of_view(0)[order_n], {"kps": 0.5, "ce": 0.5})
    assert torch.allclose(z, reference, atol=2e-3)
    refused = r"stores only z for kps 0.5, ce 0.5 \(cache.store=fused\), not kps 0.3, ce 0.7"
    with pytest.raises(CacheError, match=refused):
        fused.fused(np.arange(3), {"kps": 0.3, "ce": 0.7})


def test_the_cache_starts_its_loader_workers_once_for_every_view_and_split(
    tiny_root,
    tmp_path,
    worker_starts,  # noqa: F811  (the fixture imported above)
    world_env,
):
    cfg = load_config(
        CONFIG, overrides(tiny_root, tmp_path / "run", "data.backend=torch", "data.num_threads=2")
    )
    fake_stage1(cfg)  # untrained final checkpoints: only the passes matter here
    cache_features(cfg)
    cache = open_run_cache(cfg)
    assert len(cache.splits["train"]) == 3 * TRAIN_IMAGES and len(cache.splits["test"]) == TEST_IMAGES
    assert len(worker_starts) == 1  # 3 training views and the test split: one start


def test_completeness_reads_metadata_and_damage_is_found_when_read_and_rewritten_alone(
    cached_run, tiny_root, tmp_path
):
    """A shard altered without changing its size or time: `ffn status` (metadata) cannot see
    it, `--verify` and a reader (which hash) do, and the reader sets it aside so that the
    next cache stage rewrites it alone."""
    import os

    out = copy_run(cached_run, tmp_path)
    args = overrides(tiny_root, out)
    cfg = load_config(CONFIG, args)
    run_ffn("train-classifier", CONFIG, *args, "stage2.epochs=1")
    shard = sorted(cache_dir(cfg).rglob("train/view1/*.safetensors"))[0]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same time
    status = run_ffn("status", CONFIG, *args)
    assert "cache       complete" in status.stdout, status.stdout
    verified = run_ffn("status", CONFIG, *args, "--verify")
    assert f"cache       stale: {shard}: sha256 differs from the one recorded" in verified.stdout, (
        verified.stdout
    )
    with pytest.raises(CacheError, match=f"{shard}: sha256 differs.*rewrites this shard alone"):
        open_run_cache(cfg)  # a reader hashes before it trains
    assert not shard.exists() and shard.with_name(shard.name + ".damaged").is_file()  # set aside
    others = {p: p.stat().st_mtime_ns for p in cache_dir(cfg).rglob("*.safetensors")}
    rerun = run_ffn("cache-features", CONFIG, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(others)} of {len(others) + 1} shards already complete" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in others} == others and shard.is_file()
    assert len(open_run_cache(cfg).splits["train"]) == 3 * TRAIN_IMAGES
