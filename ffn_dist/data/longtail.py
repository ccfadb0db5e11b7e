"""Long-tailed training splits from a balanced ImageFolder: the CIFAR-LT and ImageNet-LT recipes.

`exp` (Cui et al. 2019): class i keeps int(n_max * mu ** (i / (C - 1))) images, mu = 1/IF,
classes in sorted order, so counts decrease with the class index.
`pareto` (Liu et al. 2019, ImageNet-LT): per-class counts drawn from a Pareto distribution
(alpha 6), scaled to [n_max / IF, n_max] and given to the classes in a seeded random order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffn_dist.data.splits import SplitError, write_split
from ffn_dist.progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
PARETO_ALPHA = 6.0


def exp_profile(num_classes: int, n_max: int, imbalance_factor: float) -> list[int]:
    # Same float expression as the reference CIFAR-LT code, so counts match it exactly.
    mu = 1.0 / imbalance_factor
    return [int(n_max * (mu ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def pareto_profile(num_classes: int, n_max: int, imbalance_factor: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    draws = 1.0 + rng.pareto(PARETO_ALPHA, size=num_classes)  # classic Pareto, x_m = 1
    n_min = max(1, round(n_max / imbalance_factor))
    scaled = (draws - draws.min()) / (draws.max() - draws.min())
    counts = np.rint(n_min + scaled * (n_max - n_min)).astype(int)
    return counts[rng.permutation(num_classes)].tolist()


def list_image_folder(root: Path) -> tuple[list[str], list[list[str]]]:
    """Class names (sorted sub-folders) and, per class, its image paths relative to `root`."""
    if not root.is_dir():
        raise SplitError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SplitError(f"{root}: no class sub-folders (expected ImageFolder layout root/<class>/*.jpg)")
    files = []
    for name in progress(classes, desc=f"listing {root}", unit="class"):
        found = sorted(
            p.relative_to(root).as_posix()
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not found:
            raise SplitError(f"{root / name}: class folder has no images")
        files.append(found)
    return classes, files


def hold_out_val(
    pool_sizes: list[int], chosen: list, per_class: int, rng: np.random.Generator, names: list[str]
) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    """A balanced validation split from the images the long-tailed split left unused:
    `per_class` of each class's pool (positions 0..size-1), drawn with `rng` after the
    training ones (`chosen`). A class whose whole pool is in the long tail (the head class of
    the exp profile: CIFAR-10-LT uses all 5,000 of its airplanes) gives the shortfall from its
    training images, which leave the training split. Returns the val positions per class
    (sorted), the training positions kept (in their order) and the shortfall per class name."""
    picked_all, kept, shortfalls = [], [list(c) for c in chosen], {}
    for label, size in enumerate(pool_sizes):
        if not per_class:
            picked_all.append([])
            continue
        left = sorted(set(range(size)) - set(kept[label]))
        picked = list(rng.choice(left, min(per_class, len(left)), replace=False))
        short = per_class - len(picked)
        if short:
            if short >= len(kept[label]):
                raise SplitError(
                    f"class {names[label]}: {size} images, too few for --val-per-class "
                    f"{per_class} and its {len(kept[label])} training images"
                )
            moved = set(rng.choice(kept[label], short, replace=False).tolist())
            kept[label] = [i for i in kept[label] if i not in moved]
            picked += sorted(moved)
            shortfalls[names[label]] = short
        picked_all.append(sorted(picked))
    return picked_all, kept, shortfalls


def make_lt(
    image_root: Path,
    out_dir: Path,
    profile: str,
    imbalance_factor: float,
    seed: int,
    test_per_class: int | None = None,
    val_per_class: int | None = None,
) -> dict:
    """Write `train.txt` (long-tailed), `test.txt` (balanced) and `classes.txt` into `out_dir`,
    and with `val_per_class` a balanced `val.txt` (CIFAR-LT ships no validation split).

    With `image_root/train` and `image_root/test` present (the CIFAR layout) they are the
    two pools; otherwise `test_per_class` images of each class are held out for the test
    split first. Paths are relative to `image_root`. Validation images are the training
    pool's images the long-tailed split left unused, drawn after the others; a class whose
    whole pool is in the long tail (the head class of the exp profile: CIFAR-10-LT uses all
    5,000 of its airplanes) gives the shortfall from its training images, which leave the
    training split (`val_from_train` says how many). Every other class keeps exactly its
    profile count. Returns the per-class train counts and the split sizes.
    """
    image_root = Path(image_root)
    if imbalance_factor < 1:
        raise SplitError(f"--imbalance-factor: expected a value >= 1, got {imbalance_factor}")
    rng = np.random.default_rng(seed)
    if (image_root / "train").is_dir() and (image_root / "test").is_dir():
        classes, train_pool = list_image_folder(image_root / "train")
        test_classes, test_pool = list_image_folder(image_root / "test")
        if test_classes != classes:
            raise SplitError(f"{image_root}: train/ and test/ have different class folders")
        train_pool = [[f"train/{f}" for f in files] for files in train_pool]
        test_pool = [[f"test/{f}" for f in files] for files in test_pool]
        per_class = min(len(files) for files in test_pool)
        test_pool = [sorted(rng.choice(files, per_class, replace=False)) for files in test_pool]
    else:
        if test_per_class is None:
            raise SplitError(
                f"{image_root}: no train/ and test/ sub-folders; pass --test-per-class N "
                "to hold out a balanced test split from the class folders"
            )
        classes, pool = list_image_folder(image_root)
        train_pool, test_pool = [], []
        for name, files in zip(classes, pool, strict=True):
            if len(files) <= test_per_class:
                raise SplitError(
                    f"{image_root / name}: {len(files)} images, need more than "
                    f"--test-per-class {test_per_class}"
                )
            order = rng.permutation(len(files))
            test_pool.append(sorted(files[i] for i in order[:test_per_class]))
            train_pool.append([files[i] for i in sorted(order[test_per_class:])])

    n_max = min(len(files) for files in train_pool)
    if profile == "exp":
        counts = exp_profile(len(classes), n_max, imbalance_factor)
    elif profile == "pareto":
        counts = pareto_profile(len(classes), n_max, imbalance_factor, seed)
    else:
        raise SplitError(f"--profile: got {profile!r}, allowed values: exp, pareto")

    chosen = [
        sorted(rng.choice(len(files), count, replace=False))
        for files, count in zip(train_pool, counts, strict=True)
    ]
    test = [(f, label) for label, files in enumerate(test_pool) for f in files]
    picked, chosen, shortfalls = hold_out_val(
        [len(files) for files in train_pool], chosen, val_per_class or 0, rng, classes
    )
    val = [(files[i], label) for label, files in enumerate(train_pool) for i in picked[label]]
    counts = [len(c) for c in chosen]
    train = [(files[i], label) for label, files in enumerate(train_pool) for i in chosen[label]]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    write_split(out_dir / "test.txt", test)
    if val:
        write_split(out_dir / "val.txt", val)
    write_split(out_dir / "train.txt", train)  # written last: its presence marks completion
    return {
        "classes": classes,
        "train_counts": counts,
        "test_size": len(test),
        "val_size": len(val),
        "val_from_train": shortfalls,
    }
