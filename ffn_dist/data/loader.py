"""Loaders for one rank of a process group: batches of (images, labels, indices).

Both backends read the indices a `ShardSampler` gives them, so sharding, balanced sampling
and epoch length are the same code whichever backend decodes. `indices` are positions in
the split: evaluation uses them to drop the padded repeats, the feature cache to store them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ffn_dist.data.sampling import ShardSampler
from ffn_dist.data.splits import Split
from ffn_dist.data.transforms import TransformSpec
from ffn_dist.data.verify import check_image, find_bad_images
from ffn_dist.errors import FFNError


class BadImageError(FFNError):
    pass


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, H, W], normalised
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], positions in the split


def bad_image_error(split: Split, index: int, reason: str | None = None) -> BadImageError:
    reason = reason or check_image(split.image_path(index)) or "could not be decoded"
    return BadImageError(
        f"{split.where(index)}: {reason}. Fix or remove the file, or set "
        "data.on_bad_image=skip to exclude unreadable images"
    )


class Loader:
    """Shared part of both backends: epochs, length, device."""

    def __init__(
        self,
        split: Split,
        spec: TransformSpec,
        sampler: ShardSampler,
        batch_size: int,
        num_threads: int,
        device: torch.device,
    ):
        self.split, self.spec, self.sampler = split, spec, sampler
        self.batch_size, self.num_threads, self.device = batch_size, num_threads, device
        self.epoch = 0
        self.resume_at = (0, 0)  # (epoch, batch): that epoch starts at that batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to read next; `start_batch` skips that many batches of it (a resumed
        mid-epoch checkpoint) without decoding them."""
        self.epoch = epoch
        self.resume_at = (epoch, start_batch)

    def epoch_indices(self, epoch: int):
        indices = self.sampler.indices(epoch)
        if epoch == self.resume_at[0]:
            indices = indices[self.resume_at[1] * self.batch_size :]
        return indices

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    @property
    def samples_per_epoch(self) -> int:
        return len(self.sampler)


def _is_first_process(group_rank: int) -> bool:
    """Global rank 0 when distributed (so a job lists once, not once per group)."""
    return dist.get_rank() == 0 if dist.is_initialized() else group_rank == 0


def exclude_bad_images(split: Split, workers: int, rank: int, size: int, group=None) -> Split:
    """Decode the split once, each rank a share, and drop the bad files on every rank alike."""
    mine = find_bad_images(
        split, workers, indices=range(rank, len(split), size), show_progress=_is_first_process(rank)
    )
    if size > 1:
        gathered = [None] * size
        dist.all_gather_object(gathered, mine, group=group)
        mine = [bad for part in gathered for bad in part]
    if mine and _is_first_process(rank):
        print(f"data.on_bad_image=skip: excluding {len(mine)} unreadable image(s) of {split.path}:")
        for bad in sorted(mine, key=lambda b: b.index):
            print(f"  {bad.where}: {bad.reason}")
    return split.without(b.index for b in mine) if mine else split


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stalling: pinned first on CUDA (from torch's caching
    pinned allocator, so a repeated size costs no allocation), since the driver stages a
    "non-blocking" copy from pageable memory synchronously."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dali_missing() -> str | None:
    """Why NVIDIA DALI cannot be used in this environment, or None when it can."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def _dali_loader_class():
    missing = dali_missing()
    if missing:
        raise FFNError(
            f"data.backend=dali needs NVIDIA DALI, which cannot be imported here ({missing}); "
            "install it (scripts/install.sh) or set data.backend=torch"
        )
    from ffn_dist.data.dali import DaliLoader

    return DaliLoader


def build_loader(
    data_cfg,
    split: Split,
    *,
    train: bool,
    balanced: bool = False,
    rank: int = 0,
    size: int = 1,
    seed: int = 0,
    group=None,
    device: torch.device | None = None,
    backend: str | None = None,
    order: str | None = None,
    run_dir: str | Path | None = None,
    whole_steps: bool = False,
) -> Loader:
    """The loader for rank `rank` of a process group of `size` ranks (`group` for collectives).

    train: shuffled (or class-balanced) order, train transform; otherwise the split in order
    with the eval transform. `order` overrides the order (the feature cache reads augmented
    views sequentially). `run_dir`: where the memory backend stores decoded splits
    (`run_dir/decoded`; without one it decodes into memory only). `whole_steps`: every
    batch of every rank is full, the epoch's order completed by wrapping around (stage 1:
    every step is the recipe's global batch of `size` x `data_cfg.batch_size`).
    """
    if data_cfg.on_bad_image == "skip":
        split = exclude_bad_images(split, data_cfg.num_threads, rank, size, group)
    order = order or (("balanced" if balanced else "shuffle") if train else "sequential")
    multiple = size * data_cfg.batch_size if whole_steps else None
    sampler = ShardSampler(split.labels, order, rank, size, seed, multiple)
    spec = TransformSpec.from_config(data_cfg, train)
    device = device or default_device()
    backend = backend or data_cfg.backend
    args = (split, spec, sampler, data_cfg.batch_size, data_cfg.num_threads, device)
    if backend == "memory":
        from ffn_dist.data.memory import MemoryLoader

        decoded = Path(run_dir) / "decoded" if run_dir is not None else None
        return MemoryLoader(*args, decoded_dir=decoded, memory_limit_gb=data_cfg.memory_limit_gb)
    if backend == "dali":
        return _dali_loader_class()(*args)
    from ffn_dist.data.torch_loader import TorchLoader

    return TorchLoader(*args)
