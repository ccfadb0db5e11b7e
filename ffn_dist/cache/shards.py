"""One cache shard: a safetensors file (no pickle), written atomically, memory-mapped to read.

A shard `NAME.safetensors` is written as `NAME.safetensors.tmp` and renamed when complete;
then `NAME.safetensors.json` records its row count, sha256, size and modification time,
which is how a rerun or a reader tells a finished, intact shard from a truncated or altered
one: by its metadata (a shard whose size and time are those recorded is not read), or with
`verify` by its sha256 (what a reader does before it uses the shards).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ffn_dist.errors import FFNError
from ffn_dist.files import current_sha, file_stamp, sha256_file, write_bytes, write_json

if TYPE_CHECKING:
    import torch

NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "U8": np.uint8}


class CacheError(FFNError):
    pass


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write atomically, then the sidecar; returns what the sidecar records."""
    from safetensors.torch import save  # torch: a shard's checks and readers need none

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, data, sync=True)
    info = {"file": path.name, "rows": int(tensors["labels"].shape[0]), "sha256": sha256_file(path)}
    info.update(file_stamp(path))
    write_json(sidecar_path(path), info)
    return info


def shard_problem(path: Path, record: dict | None = None, verify: bool = False) -> str | None:
    """Why the shard at `path` cannot be used (None if it is complete and intact).

    `record`: the size, time and sha256 to check against (a manifest's entry); by default
    the sidecar written with the shard. `verify`: hash it even where its metadata matches.
    """
    if not path.is_file():
        return "missing"
    if record is None:
        side = sidecar_path(path)
        if not side.is_file():
            return "no record of a completed write"
        try:
            record = json.loads(side.read_text())
        except (json.JSONDecodeError, OSError) as exc:
            return f"unreadable record {side.name} ({exc})"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"size {size} bytes, expected {record.get('bytes')} (truncated or altered)"
    if current_sha(path, record, verify) != str(record.get("sha256"))[:16]:
        return "sha256 differs from the one recorded when it was written (altered)"
    return None


def set_aside(path: Path) -> Path:
    """A shard found damaged is renamed `NAME.damaged` and its sidecar removed, so that the
    cache stage sees the part as missing and rewrites it alone."""
    sidecar_path(path).unlink(missing_ok=True)
    damaged = path.with_name(path.name + ".damaged")
    path.replace(damaged)
    return damaged


class MappedShard:
    """A shard's tensors as read-only numpy memory maps: nothing is read until indexed."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(f"{path}: not a readable safetensors shard ({exc})") from None
        self.metadata = header.pop("__metadata__", {})
        self.arrays = {}
        for name, entry in header.items():
            dtype = NUMPY_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CacheError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if begin == end:
                self.arrays[name] = np.empty(shape, dtype)
            else:
                self.arrays[name] = np.memmap(path, dtype, "r", offset=8 + header_len + begin, shape=shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def rows(self) -> int:
        return len(self.arrays["labels"])
