"""The built-in default dataset: a long-tailed version of scikit-learn's handwritten digits.

The 1,797 scanned 8x8 digits ship with scikit-learn, so the demo needs no download. They
are written as 32x32 RGB JPEGs in ImageFolder layout and split with `make_lt` (exp profile),
so the demo reads them through exactly the loader path ImageNet-LT uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ffn_dist.data.longtail import make_lt
from ffn_dist.errors import FFNError
from ffn_dist.locks import exclusive

DIGITS_IMBALANCE_FACTOR = 10.0
DIGITS_TEST_PER_CLASS = 30
DIGITS_SEED = 0
SIDE = 32


def write_digits(out_dir: Path) -> dict:
    """Class folders `0`..`9` of JPEGs plus `train.txt`/`test.txt`, all inside `out_dir`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    for i, (pixels, label) in enumerate(zip(images, digits.target, strict=True)):
        folder = out_dir / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels, mode="L").resize((SIDE, SIDE), Image.BILINEAR)
        image.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
    return make_lt(
        out_dir,
        out_dir,
        profile="exp",
        imbalance_factor=DIGITS_IMBALANCE_FACTOR,
        seed=DIGITS_SEED,
        test_per_class=DIGITS_TEST_PER_CLASS,
    )


BUILTIN_WRITERS = {"digits": write_digits}


def ensure_builtin(name: str, out_dir: str | Path) -> bool:
    """Write built-in dataset `name` into `out_dir` unless complete; True if written now."""
    out_dir = Path(out_dir)
    if name not in BUILTIN_WRITERS:
        raise FFNError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_WRITERS)}")
    with exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / "train.txt").is_file():
            return False
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FFNError(
                f"{out_dir}: exists but holds no complete '{name}' dataset (no train.txt); "
                "remove it or choose another directory"
            )
        # Written under a temporary name and renamed, so a crash never leaves a half dataset.
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        BUILTIN_WRITERS[name](staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
        return True
