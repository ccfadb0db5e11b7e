"""Decode every image of a split in parallel and report the ones that cannot be used."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from ffn_dist.data.splits import Split
from ffn_dist.progress import progress


@dataclass(frozen=True)
class BadImage:
    index: int  # position in the split
    where: str  # split-file:line (path)
    reason: str


def check_image(path) -> str | None:
    """None if the image decodes completely, else why not."""
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here, not at open()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:  # PIL's UnidentifiedImageError and decoder errors are OSErrors
        return f"unreadable: {exc}"
    return None


def find_bad_images(split: Split, workers: int = 2, indices=None, show_progress=True) -> list[BadImage]:
    """Check `indices` (default: all) of `split`; PIL releases the GIL while decoding."""
    indices = range(len(split)) if indices is None else indices
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = pool.map(lambda i: check_image(split.image_path(i)), indices)
        if show_progress:
            reasons = progress(reasons, desc=f"verifying {split.path.name}", total=len(indices))
        return [
            BadImage(i, split.where(i), reason)
            for i, reason in zip(indices, reasons, strict=True)
            if reason is not None
        ]
