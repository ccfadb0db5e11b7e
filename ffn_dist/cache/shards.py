"""One cache shard: a safetensors file (no pickle), written atomically, memory-mapped to read.

A shard `NAME.safetensors` is written as `NAME.safetensors.tmp` and renamed when complete;
then `NAME.safetensors.json` records its row count and sha256, which is how a rerun or a
reader tells a finished, intact shard from a truncated or altered one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from ffn_dist.errors import FFNError
from ffn_dist.run import sha256_file, write_bytes, write_json

NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "U8": np.uint8}


class CacheError(FFNError):
    pass


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write atomically, then the sidecar; returns what the sidecar records."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, data, sync=True)
    info = {
        "file": path.name,
        "rows": int(tensors["labels"].shape[0]),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    write_json(sidecar_path(path), info)
    return info


def shard_problem(path: Path, record: dict | None = None) -> str | None:
    """Why the shard at `path` cannot be used (None if it is complete and intact).

    `record`: the size and sha256 to check against (a manifest's entry); by default the
    sidecar written with the shard.
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
    if sha256_file(path) != record.get("sha256"):
        return "sha256 differs from the one recorded when it was written (altered)"
    return None


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
