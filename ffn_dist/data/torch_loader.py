"""The torchvision fallback backend: PIL decoding in DataLoader workers, same transforms."""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ffn_dist.data.loader import Batch, Loader, bad_image_error
from ffn_dist.data.transforms import torchvision_transform


class _SplitDataset(Dataset):
    """Maps (epoch, index) to (image, label, index).

    The augmentation of a sample is seeded from (seed, epoch, index), so it does not depend
    on the number of workers or on where a resumed run restarted. An unreadable image comes
    back as index -1 - index, so the main process can name the file (an exception raised in
    a worker would arrive wrapped in the worker's traceback).
    """

    def __init__(self, split, transform, image_size, seed):
        self.split, self.transform, self.seed = split, transform, seed
        self.placeholder = torch.zeros(3, image_size, image_size)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        epoch, index = key
        try:
            with Image.open(self.split.image_path(index)) as image:
                image = image.convert("RGB")
        except OSError:
            return self.placeholder, -1, -1 - index
        # fork_rng: with 0 workers this runs in the training process, whose RNG stays its own
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) % 2**63)
            return self.transform(image), int(self.split.labels[index]), index


class _EpochSampler(Sampler):
    def __init__(self, loader: TorchLoader):
        self.loader = loader

    def __len__(self):
        return len(self.loader.epoch_indices(self.loader.epoch))

    def __iter__(self):
        epoch = self.loader.epoch
        return ((epoch, index) for index in self.loader.epoch_indices(epoch).tolist())


class TorchLoader(Loader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Workers decode; 0 threads would decode in the training process itself. Workers
        # come from a forkserver: forking a process that already runs DALI, NCCL or OpenMP
        # threads can deadlock the child.
        self.dataloader = DataLoader(
            _SplitDataset(
                self.split, torchvision_transform(self.spec), self.spec.image_size, self.sampler.seed
            ),
            batch_size=self.batch_size,
            sampler=_EpochSampler(self),
            num_workers=self.num_threads,
            persistent_workers=self.num_threads > 0,
            multiprocessing_context="forkserver" if self.num_threads > 0 else None,
            pin_memory=self.device.type == "cuda",
        )

    def __iter__(self):
        for images, labels, indices in self.dataloader:
            if (indices < 0).any():
                bad = -1 - int(indices[indices < 0][0])
                raise bad_image_error(self.split, bad)
            yield Batch(
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                indices,
            )
