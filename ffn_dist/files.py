"""Writing and hashing files: the one way any file of ffn-dist is written.

`writing(path)` yields a temporary name beside `path` and renames it to `path` when the
block ends, so a reader (or a rerun after a kill) sees the old file or the new one, never a
part; the temporary name carries the process id, so processes that write the same file at
once (ranks, a job and its heartbeat) never write into each other's. An OS error (disk
full, permission) becomes one line naming the file, and the temporary file goes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

from ffn_dist.errors import FFNError


class WriteFailed(FFNError):
    """A file could not be written (disk full, permission, ...)."""

    exit_status = 1


@contextmanager
def writing(path: str | Path):
    """Yields a temporary path to write `path` through; renamed to `path` when the block
    ends, removed when it fails. An OSError is raised as WriteFailed naming `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"{path}: cannot be written: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes | memoryview, sync: bool = False) -> Path:
    """`sync`: on disk before the rename, for files a rerun resumes from."""
    with writing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, body) -> Path:
    return write_text(path, json.dumps(body, indent=1))


def save_torch(path: str | Path, state) -> Path:
    """torch.save, atomically and on disk. Serialised in memory first: torch's own writer
    reports a full disk as a RuntimeError that names neither the file nor the cause."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_bytes(path, buffer.getbuffer(), sync=True)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def digest(value) -> str:
    """A short identity of a JSON-able value (a stage's inputs, a config)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def file_stamp(path: str | Path) -> dict:
    """What a file's metadata says of it: size and modification time. A file whose stamp is
    unchanged since it was hashed is taken to hold what it held (no read)."""
    stat = Path(path).stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_record(path: str | Path) -> dict:
    """A file as a record holds it: its sha256 (16 hex digits) and its stamp."""
    return {"sha256": sha256_file(path)[:16], **file_stamp(path)}


def current_sha(path: str | Path, recorded: dict | None = None, verify: bool = False) -> str:
    """The file's sha256 (16 digits), or 'missing': taken from `recorded` without opening the
    file where its stamp still matches (unless `verify`), else hashed."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if not verify and recorded and {k: recorded.get(k) for k in ("bytes", "mtime_ns")} == file_stamp(path):
        return recorded["sha256"][:16]
    return sha256_file(path)[:16]
