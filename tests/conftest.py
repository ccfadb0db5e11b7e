import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffn_dist.data.builtin import ensure_builtin

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The built-in digits dataset, written once per test session."""
    root = tmp_path_factory.mktemp("builtin") / "digits"
    ensure_builtin("digits", root)
    return root


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


def run_ffn(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """The installed `ffn` command, as a user runs it."""
    cmd = [sys.executable, "-m", "ffn_dist.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)
