"""Checkpoints: written atomically, loaded with `weights_only=True`, the newest K kept.

A checkpoint is `epoch_NNNN.pt` in its directory, written under a temporary name and
renamed when complete, so a kill during the write leaves the previous one as the latest.
It holds whole tensors only (an engine gathers a partitioned optimizer state first), so it
loads on any number of processes. It records the config hash; resuming under another config
is refused. A stop requested mid-epoch (SLURM's pre-emption warning) writes `interrupted.pt`
instead, holding the position (epoch, step); the next epoch checkpoint removes it.
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


def interrupted_path(directory: Path) -> Path:
    """The mid-epoch checkpoint."""
    return Path(directory) / "interrupted.pt"


def clear_interrupted(directory: Path) -> None:
    interrupted_path(directory).unlink(missing_ok=True)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary files are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), directory / m.group(0)) for p in directory.iterdir() if (m := NAME.match(p.name))
    ]
    return sorted(found)


def checkpoint_state(model: dict, config_hash: str, **resume) -> dict:
    """The one checkpoint format: the module's state dict and the identity of the config that
    wrote it, plus what a trainer resumes from (`optimizer`, `epoch`, `step`, `branch`, `rng`)."""
    return {"model": model, "config_hash": config_hash, **resume}


def save_checkpoint(directory: Path, epoch: int, state: dict, keep: int) -> Path:
    directory = Path(directory)
    path = save_torch(checkpoint_path(directory, epoch), state)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path, config_hash: str) -> dict:
    import torch  # here, not at the top: the run's paths (and `ffn --help`) need no torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding objects that could run code
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {exc})") from None
    if state.get("config_hash") != config_hash:
        raise ConfigMismatch(
            f"{path}: written by a different config (hash {state.get('config_hash')}, this run "
            f"{config_hash}); use another output_dir or the config that wrote it"
        )
    return state


def load_latest(directory: Path, config_hash: str) -> tuple[int, dict] | None:
    """(epoch, state) of the newest checkpoint that loads; a damaged newer one is reported
    and skipped. None if there is none."""
    for epoch, path in reversed(list_checkpoints(directory)):
        try:
            return epoch, load_checkpoint(path, config_hash)
        except ConfigMismatch:
            raise
        except CheckpointError as exc:
            print(f"warning: skipping {exc}")
    return None
