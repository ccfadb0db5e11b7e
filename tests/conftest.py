import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from PIL import Image

from ffn_dist.data.builtin import ensure_builtin
from ffn_dist.distributed import init_world

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The built-in digits dataset, written once per test session."""
    root = tmp_path_factory.mktemp("builtin") / "digits"
    ensure_builtin("digits", root)
    return root


WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def world_env():
    """For code that forms a world of one in this process: init_world sets torchrun's
    variables, which must not leak into the processes later tests start."""
    saved = {key: os.environ.pop(key) for key in WORLD_ENV if key in os.environ}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in WORLD_ENV:
        os.environ.pop(key, None)
    os.environ.update(saved)


@pytest.fixture
def world(world_env):
    """A world of one (gloo) in this process."""
    return init_world(60)


@pytest.fixture
def demo_copy(demo_root, tmp_path) -> Path:
    """A private copy of the demo dataset that a test may damage."""
    return Path(shutil.copytree(demo_root, tmp_path / "digits"))


def write_jpeg(path: Path, size=(32, 32), seed=0, smooth=False) -> Path:
    """A random JPEG; `smooth` upsamples coarse noise, closer to a photograph's spectrum."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = (size[1] // 16, size[0] // 16) if smooth else (size[1], size[0])
    image = Image.fromarray(rng.integers(0, 256, (*coarse, 3), dtype=np.uint8))
    image.resize(size, Image.BICUBIC).save(path, quality=90)
    return path


def run_torchrun(nproc: int, script: Path, *args, timeout=240) -> subprocess.CompletedProcess:
    """Real `torchrun` processes over gloo on this machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *map(str, args),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def run_ffn_torchrun(nproc: int, *args, timeout=300) -> subprocess.CompletedProcess:
    """An `ffn` subcommand under real `torchrun` processes (gloo), as `ffn run` starts it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "ffn_dist.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def run_ffn(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """The installed `ffn` command, as a user runs it."""
    cmd = [sys.executable, "-m", "ffn_dist.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)


@pytest.fixture(scope="session")
def tiny_root(demo_root, tmp_path_factory) -> Path:
    """A small long-tailed subset of the demo data for training tests: 12..2 train images per
    class, and 61 test images (not a multiple of any group size)."""
    root = tmp_path_factory.mktemp("tiny")
    train = [line.split() for line in (demo_root / "train.txt").read_text().splitlines()]
    test = [line.split() for line in (demo_root / "test.txt").read_text().splitlines()]
    keep = {c: max(2, 12 - c) for c in range(10)}
    taken = {c: 0 for c in range(10)}
    lines = []
    for path, label in train:
        if taken[int(label)] < keep[int(label)]:
            taken[int(label)] += 1
            lines.append(f"{path} {label}\n")
    (root / "train.txt").write_text("".join(lines))
    (root / "test.txt").write_text("".join(f"{p} {c}\n" for p, c in test[::4][:61]))
    for entry in demo_root.iterdir():
        if entry.is_dir():
            (root / entry.name).symlink_to(entry)
    return root


def tiny_overrides(root: Path, out: Path, *extra) -> list[str]:
    return [
        f"data.root={root}",
        "data.builtin=null",
        f"output_dir={out}",
        "data.batch_size=16",
        "data.num_threads=1",
        "stage1.epochs=2",
        "stage1.warmup_epochs=1",
        "stage1.lr_milestones=[]",
        "stage1.lr_factors=[]",
        "stage1.kps_ga_epoch=1",
        "stage1.eval_every=1",
        "stage1.checkpoint_every=1",
        "stage1.log_every=100",
        *extra,
    ]


CONFIG = REPO / "configs" / "demo.yaml"
CACHE_ARGS = ("cache.train_views=3", "cache.shard_rows=16", "cache.batch_size=20")
TRAIN_IMAGES, TEST_IMAGES = 75, 61  # the tiny split


def cache_overrides(root, out, *extra) -> list[str]:
    return tiny_overrides(root, out, *CACHE_ARGS, *extra)


@pytest.fixture(scope="session")
def stage1_run(tiny_root, tmp_path_factory) -> Path:
    """Two stage-1 epochs on the tiny split, one process (read-only for tests: copy to damage)."""
    out = tmp_path_factory.mktemp("stage2") / "run"
    result = run_ffn("train-backbones", CONFIG, *cache_overrides(tiny_root, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def cached_run(stage1_run, tiny_root, tmp_path_factory) -> Path:
    """A copy of `stage1_run` plus its feature cache, written by two torchrun processes."""
    out = shutil.copytree(stage1_run, tmp_path_factory.mktemp("cached") / "run")
    result = run_ffn_torchrun(2, "cache-features", CONFIG, *cache_overrides(tiny_root, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[cache rank 0] wrote" in result.stdout and "[cache rank 1] wrote" in result.stdout
    return out
