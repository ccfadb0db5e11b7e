"""The torchvision fallback backend: PIL decoding in DataLoader worker processes, same transforms.

Worker processes start once per process and then serve every torch loader with the same
worker count: a loader hands them self-contained batch requests (files, labels, epoch, seed,
transform), so a new epoch, a new split or a new transform (the evaluation after a training
epoch, the cache's passes over views and splits) reuses the running workers. Starting them
costs seconds (a fresh interpreter importing torch per worker); paid per epoch or per cache
pass it once dominated short jobs on a GPU. Where an epoch has fewer batches than there are
workers (2,048 images at batch 256 for 16 workers), a batch is requested in parts, so that
every worker has work; the parts are joined on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ffn_dist.data.loader import Batch, Loader, bad_image_error
from ffn_dist.data.transforms import TransformSpec, torchvision_transform


@dataclass(frozen=True)
class _BatchRequest:
    """Everything a worker needs to produce one batch, and nothing it must remember."""

    paths: tuple[str, ...]
    labels: np.ndarray
    indices: np.ndarray  # positions in the split
    epoch: int
    seed: int
    spec: TransformSpec
    ends_batch: bool = True  # the last part of its batch


class _Decoder(Dataset):
    """Worker side: decodes and augments a requested batch.

    The augmentation of a sample is seeded from (seed, epoch, index), so it does not depend
    on the number of workers or on where a resumed run restarted. An unreadable image comes
    back as index -1 - index, so the main process can name the file (an exception raised in
    a worker would arrive wrapped in the worker's traceback).
    """

    def __init__(self):
        self.transforms = {}

    def __getitem__(self, request: _BatchRequest):
        transform = self.transforms.get(request.spec)
        if transform is None:
            transform = self.transforms[request.spec] = torchvision_transform(request.spec)
        size = request.spec.image_size
        images, indices = torch.zeros(len(request.paths), 3, size, size), request.indices.copy()
        for i, (path, index) in enumerate(zip(request.paths, request.indices, strict=True)):
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
            except OSError:
                indices[i] = -1 - index
                continue
            # fork_rng: with 0 workers this runs in the training process, whose RNG stays its own
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((request.seed, request.epoch, int(index))) % 2**63)
                images[i] = transform(image)
        return images, torch.from_numpy(request.labels), torch.from_numpy(indices), request.ends_batch


class _WorkerPool(Sampler):
    """One persistent DataLoader whose requests come from the loader being iterated."""

    def __init__(self, workers: int, pin_memory: bool):
        self.serving, self.generation = None, 0
        # Workers come from a forkserver: forking a process that already runs DALI, NCCL or
        # OpenMP threads can deadlock the child.
        self.dataloader = DataLoader(
            _Decoder(),
            batch_size=None,  # a request is a whole batch
            sampler=self,
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context="forkserver" if workers > 0 else None,
            pin_memory=pin_memory,
        )

    def __iter__(self):
        return self.serving.requests()

    def __len__(self):
        return len(self.serving)


_POOLS: dict[tuple[int, bool], _WorkerPool] = {}


def worker_pool(workers: int, pin_memory: bool) -> _WorkerPool:
    key = (workers, pin_memory)
    if key not in _POOLS:
        _POOLS[key] = _WorkerPool(workers, pin_memory)
    return _POOLS[key]


class TorchLoader(Loader):
    def parts_per_batch(self, batches: int) -> int:
        """Enough parts that an epoch of `batches` has a request for every worker."""
        return max(1, -(-self.num_threads // max(batches, 1)))

    def requests(self):
        epoch = self.epoch
        order = self.epoch_indices(epoch)
        parts = self.parts_per_batch(-(-len(order) // self.batch_size))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            pieces = np.array_split(batch, min(parts, len(batch)))
            for number, chosen in enumerate(pieces):
                paths = tuple(str(self.split.image_path(i)) for i in chosen)
                labels = self.split.labels[chosen]
                last = number == len(pieces) - 1
                yield _BatchRequest(paths, labels, chosen, epoch, self.sampler.seed, self.spec, last)

    def __iter__(self):
        # Pinned batches on CUDA, so the copies below overlap with the GPU's work.
        pool = worker_pool(self.num_threads, pin_memory=self.device.type == "cuda")
        pool.generation += 1
        pool.serving, generation = self, pool.generation
        parts = []
        for images, labels, indices, ends_batch in pool.dataloader:
            if pool.generation != generation:
                raise RuntimeError("two torch loaders were iterated at once: they share one worker pool")
            if (indices < 0).any():
                bad = -1 - int(indices[indices < 0][0])
                raise bad_image_error(self.split, bad)
            # each part's copy starts now, from pinned memory; the parts are joined on the device
            on_device = (t.to(self.device, non_blocking=True) for t in (images, labels))
            parts.append((*on_device, indices))
            if ends_batch:
                columns = zip(*parts, strict=True)
                yield Batch(*(torch.cat(c) if len(parts) > 1 else c[0] for c in columns))
                parts = []
