"""CIFAR-10 and CIFAR-100 from their python archives, and the literature's long-tailed subset.

`cifar-10-python.tar.gz` (data_batch_1..5, test_batch, batches.meta) and
`cifar-100-python.tar.gz` (train, test, meta) hold pickled numpy batches: what LDAM-DRW, the
KPS and FFN code and torchvision read. `write_cifar` writes every image as a lossless PNG
(the archive's pixels, byte for byte, after decoding) and the split files. The long-tailed
training subset is LDAM-DRW's `IMBALANCECIFAR`, which every CIFAR-LT paper since trains on:
numpy's legacy generator seeded with the seed, then for each class in label order that
class's indices in archive order, shuffled, the first n_c kept, with
n_c = int(n_max * (1/IF)^(c/(C-1))) (`longtail.exp_profile`).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ffn_dist.data.longtail import exp_profile, hold_out_val
from ffn_dist.data.splits import SplitError, write_split
from ffn_dist.files import write_text
from ffn_dist.progress import progress

LAYOUTS = {
    10: {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
    },
    100: {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
    },
}


class _Batches(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts and strings, and nothing else: an
    archive from elsewhere must not run code when read."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how a protocol-2 pickle written by Python 3 holds bytes
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to build {module}.{name}")


def _unpickled(archive: Path, handle: tarfile.TarFile, member: str) -> dict:
    try:
        data = handle.extractfile(member).read()
        return {
            (k.decode() if isinstance(k, bytes) else k): v
            for k, v in _Batches(io.BytesIO(data), encoding="bytes").load().items()
        }
    except (KeyError, AttributeError):
        raise SplitError(f"{archive}: {member} missing from the archive") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, tarfile.TarError, OSError) as exc:
        raise SplitError(f"{archive}: {member}: not a CIFAR batch ({exc})") from None


def _batch(archive: Path, handle, member: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    body = _unpickled(archive, handle, member)
    for key in ("data", labels_key):
        if key not in body:
            raise SplitError(f"{archive}: {member}: no '{key}' in the batch (keys: {', '.join(body)})")
    data, labels = np.asarray(body["data"]), np.asarray(body[labels_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise SplitError(
            f"{archive}: {member}: expected 'data' of N x 3072 uint8 and N labels, "
            f"got {data.dtype} {data.shape} and {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # HWC, as torchvision reads it


def read_archive(archive: Path) -> dict:
    """{classes, names, train: (images N x 32 x 32 x 3 uint8, labels), test: ...}; CIFAR-10 or
    CIFAR-100, told apart by the folder inside."""
    archive = Path(archive)
    if not archive.is_file():
        raise SplitError(f"{archive}: archive not found")
    try:
        with tarfile.open(archive, "r:*") as handle:
            names = set(handle.getnames())
            found = [c for c, layout in LAYOUTS.items() if f"{layout['folder']}/{layout['meta'][0]}" in names]
            if not found:
                raise SplitError(
                    f"{archive}: not a CIFAR python archive (no cifar-10-batches-py/batches.meta "
                    "or cifar-100-python/meta inside)"
                )
            classes = found[0]
            layout = LAYOUTS[classes]
            folder = layout["folder"]
            meta = _unpickled(archive, handle, f"{folder}/{layout['meta'][0]}")
            label_names = [
                n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(layout["meta"][1], [])
            ]
            if len(label_names) != classes:
                raise SplitError(f"{archive}: {folder}/{layout['meta'][0]}: expected {classes} class names")
            body = {"classes": classes, "names": label_names}
            for split in ("train", "test"):
                parts = [_batch(archive, handle, f"{folder}/{m}", layout["labels"]) for m in layout[split]]
                labels = np.concatenate([p[1] for p in parts])
                if labels.min() < 0 or labels.max() >= classes:
                    raise SplitError(f"{archive}: {split}: labels outside 0..{classes - 1}")
                body[split] = (np.concatenate([p[0] for p in parts]), labels)
    except (tarfile.TarError, EOFError, OSError) as exc:  # truncated or not a tar.gz at all
        raise SplitError(f"{archive}: not a readable tar.gz archive ({exc})") from None
    return body


def literature_subset(
    labels: np.ndarray, classes: int, imbalance_factor: float, seed: int
) -> list[np.ndarray]:
    """Per class, the training indices LDAM-DRW's IMBALANCECIFAR keeps, in its order."""
    if imbalance_factor < 1:
        raise SplitError(f"--imbalance-factor: expected a value >= 1, got {imbalance_factor}")
    rng = np.random.RandomState(seed)  # the legacy generator np.random.seed(seed) sets
    counts = exp_profile(classes, len(labels) / classes, imbalance_factor)
    chosen = []
    for label, count in enumerate(counts):
        indices = np.where(labels == label)[0]
        rng.shuffle(indices)
        chosen.append(indices[:count])
    return chosen


def _write_pngs(images: np.ndarray, labels: np.ndarray, names: list[str], out: Path, split: str) -> list[str]:
    """Every image of a split as out/split/<class>/<index>.png (written once: the folder is
    renamed into place when complete); returns their paths relative to `out`."""
    paths = [f"{split}/{names[label]}/{index:05d}.png" for index, label in enumerate(labels)]
    if (out / split).is_dir():
        return paths
    staging = out / f"{split}.tmp"
    for name in names:
        (staging / name).mkdir(parents=True, exist_ok=True)
    for index, relative in enumerate(progress(paths, desc=f"writing {split} PNGs", unit="img")):
        Image.fromarray(images[index]).save(staging / relative.split("/", 1)[1], format="PNG")
    staging.replace(out / split)
    return paths


def write_cifar(
    archive: Path, out: Path, imbalance_factor: float, seed: int, val_per_class: int | None = None
) -> dict:
    """Images as PNGs under `out`, `classes.txt`, `test.txt` (the whole test set),
    `train.txt` (the literature's subset) and with `val_per_class` a balanced `val.txt` by
    make-lt's rule (`longtail.hold_out_val`); split paths relative to `out`."""
    body = read_archive(archive)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = body["names"]
    paths = {split: _write_pngs(*body[split], names, out, split) for split in ("train", "test")}
    train_labels = body["train"][1]
    chosen = literature_subset(train_labels, body["classes"], imbalance_factor, seed)
    pools = [np.flatnonzero(train_labels == label) for label in range(body["classes"])]
    positions = [np.searchsorted(pool, picked) for pool, picked in zip(pools, chosen, strict=True)]
    val, kept, moved = hold_out_val(
        [len(pool) for pool in pools], positions, val_per_class or 0, np.random.default_rng(seed), names
    )
    write_text(out / "classes.txt", "".join(f"{name}\n" for name in names))
    write_split(
        out / "test.txt", [(p, int(label)) for p, label in zip(paths["test"], body["test"][1], strict=True)]
    )
    if val_per_class:
        write_split(
            out / "val.txt",
            [(paths["train"][pools[c][i]], c) for c, picked in enumerate(val) for i in picked],
        )
    train = [(paths["train"][pools[c][i]], c) for c, picked in enumerate(kept) for i in picked]
    write_split(out / "train.txt", train)  # written last: its presence marks completion
    return {
        "classes": body["classes"],
        "train_counts": [len(k) for k in kept],
        "test_size": len(paths["test"]),
        "val_size": sum(len(v) for v in val),
        "val_from_train": moved,
    }
