"""The memory backend (`data.backend: memory`): a small split decoded once, held on the device
and augmented there, a whole batch at a time in a handful of operations.

Decoding a CIFAR JPEG again every epoch costs more than training on it on a GPU; the whole
of CIFAR-10-LT's training split is 38 MB as uint8 pixels (airbench keeps CIFAR-10 on the GPU
the same way). Each split is decoded once, with the torch backend's decoder and eval geometry
(PIL, shorter side resized, centre crop; so the pixels are the same), into a uint8 array
[N, H, W, 3]. In a run the array is stored in `output_dir/decoded/` as a safetensors file
with a sha256 and reused while the split file and its images are unchanged. Batches are
gathered by the same `ShardSampler` orders as the other backends and augmented on the device:
pad-4 random crop and horizontal flip (one gather from a strided view of the padded images
and their mirror images), colour jitter when configured (brightness, contrast, saturation,
in that order), normalisation. Every random draw is a hash
of (seed, epoch, sample index, which draw), so a resumed run draws what an uninterrupted one
would, whatever the device, batch or sharding. Only `pad_crop` (CIFAR-sized images): the
random-resized crop of variable-size ImageNet images stays with DALI.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ffn_dist.cache.shards import MappedShard, shard_problem, write_shard
from ffn_dist.data.loader import Batch, Loader, bad_image_error, to_device
from ffn_dist.data.splits import Split
from ffn_dist.data.transforms import PAD, TransformSpec, eval_geometry
from ffn_dist.errors import FFNError
from ffn_dist.locks import exclusive
from ffn_dist.progress import progress

MASK = 0xFFFFFFFF
GRAY = (0.2989, 0.587, 0.114)  # torchvision's grayscale weights
DRAWS = {"dy": 1, "dx": 2, "flip": 3, "brightness": 4, "contrast": 5, "saturation": 6}
# Pixels held in this process, by (images, geometry, device, layout): its loaders share them.
_LOADED: dict[tuple, torch.Tensor] = {}


def held_bytes(samples: int, spec: TransformSpec) -> int:
    """What a loader holds: the images as they are (eval), or zero-padded by PAD and beside
    their mirror images (random crops with flips: each crop is then one strided read)."""
    if spec.pad_crop:
        return 2 * samples * (spec.image_size + 2 * PAD) ** 2 * 3
    return samples * spec.image_size**2 * 3


def free_memory(device: torch.device) -> int | None:
    """Bytes free where the arrays will live: the GPU's memory, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def fit_problem(needed: int, limit_gb: float, free: int | None) -> str | None:
    """Why `needed` bytes may not be held (None if they may): over the limit, or over half
    of what is free (the model, its activations and the other splits need the rest)."""
    gb = needed / 1e9
    if gb > limit_gb:
        return f"{gb:.2f} GB, over data.memory_limit_gb = {limit_gb:g}"
    if free is not None and needed > free / 2:
        return f"{gb:.2f} GB, over half of the {free / 1e9:.2f} GB free on the device"
    return None


def check_fits(split: Split, spec: TransformSpec, limit_gb: float, device: torch.device) -> None:
    problem = fit_problem(held_bytes(len(split), spec), limit_gb, free_memory(device))
    if problem:
        kind = "padded and mirrored for random crops" if spec.pad_crop else "as decoded"
        raise FFNError(
            f"{split.path}: data.backend=memory would hold {len(split):,} images of "
            f"{spec.image_size}x{spec.image_size} ({kind}): {problem}. Raise data.memory_limit_gb "
            "if it fits, or use data.backend=dali"
        )


# ----------------------------------------------------------------------------- decoding
def _decode_one(split: Split, index: int, geometry) -> np.ndarray:
    try:
        with Image.open(split.image_path(index)) as image:
            return np.asarray(geometry(image.convert("RGB")), dtype=np.uint8)
    except OSError:
        raise bad_image_error(split, index) from None  # it names the file and why


def decode_split(split: Split, spec: TransformSpec, threads: int, show_progress: bool = True) -> np.ndarray:
    """Every image of the split through the eval geometry: uint8 [N, H, W, 3]."""
    geometry = eval_geometry(spec)
    out = np.empty((len(split), spec.image_size, spec.image_size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL decodes without the GIL
        done = pool.map(lambda i: _decode_one(split, i, geometry), range(len(split)))
        bar = progress(done, desc=f"decoding {split.path.name}", total=len(split), disable=not show_progress)
        for i, pixels in enumerate(bar):
            out[i] = pixels
    return out


def images_identity(split: Split) -> str:
    """The images as they are now: where they are, and the size and modification time of each."""
    digest = hashlib.sha256(f"{split.root.resolve()}\n".encode())
    for i in range(len(split)):
        try:
            stat = split.image_path(i).stat()
            digest.update(f"{split.files[i]} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        except FileNotFoundError:  # decoding will name it
            digest.update(f"{split.files[i]} missing\n".encode())
    return digest.hexdigest()


def decoded_path(directory: Path, split: Split, spec: TransformSpec) -> Path:
    """One file per list of images (a split, or the part of one a loader reads) and geometry:
    a changed split file names another list, so it is decoded anew."""
    key = hashlib.sha256(f"{split.root.resolve()}\n{spec.resize_size} {spec.image_size}\n".encode())
    key.update("\n".join(split.files).encode())
    return Path(directory) / f"{split.path.stem}_{key.hexdigest()[:16]}.safetensors"


def stored_problem(path: Path, identity: dict) -> str | None:
    """Why the stored array cannot be used (None if it can)."""
    problem = shard_problem(path)
    if problem:
        return problem
    stored = MappedShard(path).metadata
    changed = [key for key in identity if stored.get(key) != identity[key]]
    return f"{', '.join(changed)} changed since it was decoded" if changed else None


def load_decoded(split: Split, spec: TransformSpec, path: Path, identity: dict, threads: int) -> np.ndarray:
    """The split's pixels: from the array stored at `path` while it matches `identity`, else
    decoded and stored. Ranks that ask at once decode it once."""
    with exclusive(path.with_name(path.name + ".lock")):
        problem = stored_problem(path, identity)
        if problem is None:
            return np.array(MappedShard(path)["images"])  # read into memory
        if problem != "missing":
            print(f"{path}: {problem}; decoding {split.path} again", flush=True)
        pixels = decode_split(split, spec, threads)
        labels = torch.from_numpy(split.labels)
        write_shard(path, {"images": torch.from_numpy(pixels), "labels": labels}, identity)
        return pixels


# ----------------------------------------------------------------------------- augmenting
def _mix(x):
    """A 32-bit integer hash (xorshift-multiply rounds; multipliers below 2^31, so int64
    products never overflow): Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK
    return x ^ (x >> 16)


def random_draws(seed: int, epoch: int, indices: torch.Tensor, draw: str) -> torch.Tensor:
    """Uniform 32-bit integers (int64) that depend on (seed, epoch, sample index, draw) only."""
    key = _mix((_mix((_mix(seed & MASK) + epoch) & MASK) + DRAWS[draw]) & MASK)
    return _mix(((indices & MASK) * 0x9E3779B9 + key) & MASK)


def uniform_ints(draws: torch.Tensor, n: int) -> torch.Tensor:
    """Integers in [0, n) from 32-bit draws (multiply and shift)."""
    return (draws * n) >> 32


def uniform_floats(draws: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * ((draws >> 8).float() / 2**24)


def crop_windows(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> what pad-crop with flips reads: a view [2, N, 2P+1, 2P+1, C, H, W]
    of the zero-padded images and their mirror images, whose [f, n, y, x] is image n's crop
    at offset (y - P, x - P), mirrored if f. Choosing a crop is indexing; nothing is computed."""
    padded = F.pad(pixels, (0, 0, PAD, PAD, PAD, PAD))
    both = torch.stack([padded, padded.flip(2)])
    height, width = pixels.shape[1:3]
    return both.unfold(2, height, 1).unfold(3, width, 1)


def random_crops(windows: torch.Tensor, positions: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """uint8 [B, C, H, W]: pad-4 random crops, half of them mirrored, as torchvision's
    RandomCrop(padding=4) and RandomHorizontalFlip draw them (offsets uniform in -4..4)."""
    dy, dx = (uniform_ints(random_draws(seed, epoch, positions, d), 2 * PAD + 1) for d in ("dy", "dx"))
    flip = random_draws(seed, epoch, positions, "flip") & 1
    # a crop at column offset x, mirrored, is the mirror image's crop at offset 2P - x
    return windows[flip, positions, dy, torch.where(flip.bool(), 2 * PAD - dx, dx)]


def color_jitter(images: torch.Tensor, factors: dict[str, torch.Tensor], gray: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in 0..1: brightness, contrast, saturation (torchvision's blends);
    `gray`: the grayscale weights [1, 3, 1, 1] on the images' device."""

    def per_sample(name):
        return factors[name].view(-1, 1, 1, 1)

    images = (images * per_sample("brightness")).clamp_(0, 1)
    mean = (images * gray).sum(1, keepdim=True).mean((1, 2, 3), keepdim=True)
    images = (images * per_sample("contrast") + mean * (1 - per_sample("contrast"))).clamp_(0, 1)
    luma = (images * gray).sum(1, keepdim=True)
    return (images * per_sample("saturation") + luma * (1 - per_sample("saturation"))).clamp_(0, 1)


def channel_constants(spec: TransformSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """mean, std and grayscale weights as [1, 3, 1, 1] tensors on the device, made once: made
    every batch, they would be host-to-device copies that wait for the GPU."""
    values = {"mean": spec.mean, "std": spec.std, "gray": GRAY}
    return {name: torch.tensor(v, device=device).view(1, 3, 1, 1) for name, v in values.items()}


def to_normalised(images, positions, seed: int, epoch: int, spec: TransformSpec, constants: dict):
    """uint8 [B, 3, H, W] -> float32, colour-jittered if configured, normalised: the torch
    backend's arithmetic (ToTensor, Normalize), so eval tensors are equal to its."""
    images = images.float().div_(255)
    if spec.color_jitter > 0:
        low, high = 1 - spec.color_jitter, 1 + spec.color_jitter
        factors = {
            name: uniform_floats(random_draws(seed, epoch, positions, name), low, high)
            for name in ("brightness", "contrast", "saturation")
        }
        images = color_jitter(images, factors, constants["gray"])
    return images.sub_(constants["mean"]).div_(constants["std"])


class MemoryLoader(Loader):
    def __init__(self, *args, decoded_dir: Path | None = None, memory_limit_gb: float = 4.0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.spec.random_resized_crop:
            raise FFNError(
                "data.backend=memory supports data.train_crop=pad_crop (CIFAR-sized images); "
                "random_resized_crop of variable-size images needs data.backend=dali or torch"
            )
        check_fits(self.split, self.spec, memory_limit_gb, self.device)
        self.pixels, self.labels = self._arrays(decoded_dir)
        self.constants = channel_constants(self.spec, self.device)

    def _arrays(self, decoded_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels as this loader reads them, on the device ([N, 3, H, W], or the crop
        windows), and the labels: shared with another loader of this process that holds the
        same images (unchanged since), else read from the stored array, else decoded."""
        spec = self.spec
        labels = torch.from_numpy(self.split.labels).to(self.device)
        identity = {"images": images_identity(self.split), "samples": str(len(self.split))}
        key = (identity["images"], spec.resize_size, spec.image_size, str(self.device), spec.pad_crop)
        if key not in _LOADED:
            if decoded_dir is None:
                pixels = decode_split(self.split, spec, self.num_threads)
            else:
                path = decoded_path(decoded_dir, self.split, spec)
                pixels = load_decoded(self.split, spec, path, identity, self.num_threads)
            pixels = torch.from_numpy(pixels).to(self.device)
            _LOADED[key] = crop_windows(pixels) if spec.pad_crop else pixels.permute(0, 3, 1, 2).contiguous()
        return _LOADED[key], labels

    def __iter__(self):
        epoch, seed = self.epoch, self.sampler.seed
        order = torch.from_numpy(self.epoch_indices(epoch))
        # One copy an epoch: a batch's positions are a slice of it on the device, so no step
        # waits on (or stages) a host-to-device copy.
        on_device = to_device(order, self.device)
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            positions = on_device[start : start + self.batch_size]
            if self.spec.pad_crop:
                images = random_crops(self.pixels, positions, seed, epoch)
            else:
                images = self.pixels[positions]
            images = to_normalised(images, positions, seed, epoch, self.spec, self.constants)
            yield Batch(images, self.labels[positions], indices)
