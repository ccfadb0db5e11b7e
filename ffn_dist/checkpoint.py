"""Checkpoints: written atomically, loaded with `weights_only=True`, the newest K kept.

A checkpoint is `epoch_NNNN.pt` in its directory, written under a temporary name and
renamed when complete, so a kill during the write leaves the previous one as the latest.
When each rank holds a shard of the optimizer state (ZeRO 1-2), the shards are written
first as `epoch_NNNN.shardR.pt`, and `epoch_NNNN.pt`, renamed last, marks them complete.
It records the config hash; resuming under another config is refused. A stop requested
mid-epoch (SLURM's pre-emption warning) writes `interrupted.pt` (and its shards) instead,
holding the position (epoch, step); the next epoch checkpoint removes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ffn_dist.errors import FFNError
from ffn_dist.files import save_torch

NAME = re.compile(r"^epoch_(\d{4,})\.pt$")


class CheckpointError(FFNError):
    pass


class ConfigMismatch(CheckpointError):
    pass


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def shard_path(directory: Path, epoch: int, rank: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.shard{rank}.pt"


def interrupted_path(directory: Path, rank: int | None = None) -> Path:
    """The mid-epoch checkpoint, or (with `rank`) that rank's optimizer shard of it."""
    return Path(directory) / ("interrupted.pt" if rank is None else f"interrupted.shard{rank}.pt")


def clear_interrupted(directory: Path) -> None:
    for path in Path(directory).glob("interrupted*.pt"):
        path.unlink()


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary files are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), directory / m.group(0)) for p in directory.iterdir() if (m := NAME.match(p.name))
    ]
    return sorted(found)


def save_checkpoint(directory: Path, epoch: int, state: dict, keep: int) -> Path:
    directory = Path(directory)
    path = save_torch(checkpoint_path(directory, epoch), state)
    for old_epoch, old in list_checkpoints(directory)[:-keep]:
        old.unlink()
        for shard in directory.glob(f"epoch_{old_epoch:04d}.shard*.pt"):
            shard.unlink()
    return path


def load_checkpoint(path: Path, config_hash: str, safe_classes: tuple = ()) -> dict:
    """`safe_classes`: plain data classes an engine's state holds, allowed by name."""
    import torch  # here, not at the top: the run's paths (and `ffn --help`) need no torch

    try:
        with torch.serialization.safe_globals(list(safe_classes)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding objects that could run code
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {exc})") from None
    if state.get("config_hash") != config_hash:
        raise ConfigMismatch(
            f"{path}: written by a different config (hash {state.get('config_hash')}, this run "
            f"{config_hash}); use another output_dir or the config that wrote it"
        )
    return state


def load_latest(directory: Path, config_hash: str, safe_classes: tuple = ()) -> tuple[int, dict] | None:
    """(epoch, state) of the newest checkpoint that loads; a damaged newer one is reported
    and skipped. None if there is none."""
    for epoch, path in reversed(list_checkpoints(directory)):
        try:
            return epoch, load_checkpoint(path, config_hash, safe_classes)
        except ConfigMismatch:
            raise
        except CheckpointError as exc:
            print(f"warning: skipping {exc}")
    return None
