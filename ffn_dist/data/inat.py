"""iNaturalist 2018 from its JSON annotations (`train2018.json`, `val2018.json`).

Each file holds `images` (`id`, `file_name`), `annotations` (`image_id`, `category_id`: one per
image) and `categories` (`id`, `name`). A split line is the image's `file_name` and its
category id as the label (the ids are 0..8141); the validation images serve as the test set,
as in every iNaturalist 2018 table. The published `path label` lists
(`iNaturalist18_train.txt`, `iNaturalist18_val.txt`) are split files already.
"""

from __future__ import annotations

import json
from pathlib import Path

from ffn_dist.data.splits import SplitError, write_split
from ffn_dist.files import write_text


def _field(path: Path, entry, key: str, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise SplitError(f"{path}: {where}: no '{key}'")
    return entry[key]


def read_annotations(path: str | Path) -> tuple[list[tuple[str, int]], dict[int, str]]:
    """(file_name, category_id) of every image, in the file's order, and the category names."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise SplitError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations"):
        if not isinstance(body, dict) or not isinstance(body.get(key), list):
            raise SplitError(
                f"{path}: no '{key}' list (expected iNaturalist's images, annotations, categories)"
            )
    files = {}
    for i, image in enumerate(body["images"]):
        files[_field(path, image, "id", f"images[{i}]")] = _field(path, image, "file_name", f"images[{i}]")
    labels = {}
    for i, annotation in enumerate(body["annotations"]):
        image = _field(path, annotation, "image_id", f"annotations[{i}]")
        category = _field(path, annotation, "category_id", f"annotations[{i}]")
        if image not in files:
            raise SplitError(f"{path}: annotations[{i}]: image_id {image!r} is no image of the file")
        if not isinstance(category, int) or category < 0:
            raise SplitError(f"{path}: annotations[{i}]: category_id {category!r}, expected an integer >= 0")
        labels[image] = category
    unlabelled = [image for image in files if image not in labels]
    if unlabelled:
        raise SplitError(
            f"{path}: {len(unlabelled)} image(s) without an annotation, e.g. id {unlabelled[0]!r}"
        )
    names = {
        _field(path, c, "id", f"categories[{i}]"): str(c.get("name", c["id"]))
        for i, c in enumerate(body.get("categories") or [])
    }
    return [(files[image], labels[image]) for image in files], names


def write_inat(train_json: str | Path, val_json: str | Path, out: str | Path) -> dict:
    """`out/train.txt` and `out/test.txt` (the validation images), and `out/classes.txt` where
    the annotations name every category; returns the sizes and the class count."""
    train, names = read_annotations(train_json)
    test, _ = read_annotations(val_json)
    classes = 1 + max(label for _, label in train)
    outside = [label for _, label in test if label >= classes]
    if outside:
        raise SplitError(
            f"{val_json}: category_id {outside[0]} has no training image (train has 0..{classes - 1})"
        )
    out = Path(out)
    if len(names) == classes and set(names) == set(range(classes)):
        write_text(out / "classes.txt", "".join(f"{names[c]}\n" for c in range(classes)))
    write_split(out / "test.txt", test)
    write_split(out / "train.txt", train)  # written last: its presence marks completion
    return {"classes": classes, "train_size": len(train), "test_size": len(test)}
