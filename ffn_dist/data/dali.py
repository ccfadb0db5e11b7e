"""The DALI backend: JPEG decoding and augmentation in DALI's C++ thread pool.

On a CUDA machine images are decoded with `device="mixed"` on GPU `device.index` and
augmented on the GPU; otherwise every operator runs on the CPU with `device_id=None`.
The file bytes come from an external source fed by the rank's `ShardSampler`, so DALI
sees exactly the samples (and the epoch) the sampler chose.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ffn_dist.data.loader import Batch, Loader, bad_image_error
from ffn_dist.data.transforms import PAD, RRC_RATIO, RRC_SCALE, TransformSpec
from ffn_dist.data.verify import check_image

PREFETCH_DEPTH = 2
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


def _shorter_side_size(encoded, target: int) -> dict:
    """Output size of torchvision's Resize(int): the long side truncated, not rounded.

    DALI's own `resize_shorter` keeps the exact aspect ratio, which shifts every pixel by a
    fraction and makes the two backends disagree by about 3/255 on average.
    """
    shape = fn.cast(fn.peek_image_shape(encoded), dtype=types.FLOAT)  # H, W, C
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    return {
        "resize_y": dmath.floor(target * height / shorter),
        "resize_x": dmath.floor(target * width / shorter),
    }


@pipeline_def
def _image_pipeline(source, spec: TransformSpec, on_gpu: bool):
    encoded, labels, indices = fn.external_source(
        source=source,
        num_outputs=3,
        batch=True,
        batch_info=True,
        dtype=[types.UINT8, types.INT64, types.INT64],
    )
    decoder = "mixed" if on_gpu else "cpu"
    size = spec.image_size
    if spec.random_resized_crop:
        images = fn.decoders.image_random_crop(
            encoded,
            device=decoder,
            output_type=types.RGB,
            random_area=list(RRC_SCALE),
            random_aspect_ratio=list(RRC_RATIO),
        )
        images = fn.resize(images, size=[size, size], antialias=True)
    else:
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        images = fn.resize(images, antialias=True, **_shorter_side_size(encoded, spec.resize_size))
        if spec.pad_crop:
            images = fn.crop(images, crop=[size, size])
            shift = fn.random.uniform(values=list(range(-PAD, PAD + 1)), shape=[2], dtype=types.INT32)
            images = fn.slice(
                images,
                start=shift,
                shape=[size, size],
                axis_names="WH",
                out_of_bounds_policy="pad",
                fill_values=0,
            )
    if spec.color_jitter > 0:
        jitter = [1.0 - spec.color_jitter, 1.0 + spec.color_jitter]
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=jitter),
            contrast=fn.random.uniform(range=jitter),
            saturation=fn.random.uniform(range=jitter),
        )
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        crop=[size, size],
        mean=[m * 255 for m in spec.mean],
        std=[s * 255 for s in spec.std],
        mirror=fn.random.coin_flip() if spec.train else 0,
    )
    return images, labels, indices


class DaliLoader(Loader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._iterator = None
        self._first_epoch = 0  # epoch of the pipeline's epoch_idx 0
        self._next_epoch = None  # epoch the built pipeline will produce next
        self._order = (None, None)  # (epoch, this rank's indices) cache
        self._recent = deque(maxlen=PREFETCH_DEPTH + 2)  # batches handed to DALI lately

    def _read_batch(self, info):
        epoch = self._first_epoch + info.epoch_idx
        if self._order[0] != epoch:
            self._order = (epoch, self.epoch_indices(epoch))
        order = self._order[1]
        start = info.iteration * self.batch_size
        if start >= len(order):
            raise StopIteration
        chosen = order[start : start + self.batch_size]
        encoded = [self._read_file(i) for i in chosen]
        self._recent.append(chosen)
        labels = self.split.labels[chosen]
        return encoded, [np.int64(v) for v in labels], [np.int64(v) for v in chosen]

    def _read_file(self, i: int) -> np.ndarray:
        try:
            data = np.fromfile(self.split.image_path(i), dtype=np.uint8)
        except OSError as exc:
            raise bad_image_error(self.split, i, f"unreadable: {exc}") from None
        # DALI decodes a truncated JPEG into a partly grey image without complaint; one
        # that lacks its end marker is checked by a full decode before it is used.
        if len(data) < 4 or (data[:2].tobytes() == JPEG_START and data[-2:].tobytes() != JPEG_END):
            reason = check_image(self.split.image_path(i))
            if reason is not None:
                raise bad_image_error(self.split, i, reason)
        return data

    def _build(self, first_epoch: int) -> None:
        on_gpu = self.device.type == "cuda"
        pipe = _image_pipeline(
            self._read_batch,
            self.spec,
            on_gpu,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if on_gpu else None,
            prefetch_queue_depth=PREFETCH_DEPTH,
            seed=(self.sampler.seed * 1009 + self.sampler.rank * 7919 + first_epoch) % 2**31,
        )
        pipe.build()
        self._first_epoch = self._next_epoch = first_epoch
        self._recent.clear()
        self._iterator = DALIGenericIterator(
            pipe,
            ["images", "labels", "indices"],
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=False,
            prepare_first_batch=False,
        )

    def _diagnose(self, error: RuntimeError) -> Exception:
        """DALI reports a failed decode without the file: find it among recent batches."""
        self._iterator = None  # the pipeline is unusable after an error
        for chosen in self._recent:
            for i in chosen:
                reason = check_image(self.split.image_path(i))
                if reason is not None:
                    return bad_image_error(self.split, i, reason)
        return error

    def __iter__(self):
        if self._iterator is None or self._next_epoch != self.epoch or self.resume_at[1]:
            self._build(self.epoch)  # first use, a new start epoch, an abandoned or resumed epoch
        self._next_epoch = None  # until this epoch is read to its end
        try:
            for (out,) in self._iterator:
                yield Batch(out["images"], out["labels"].long(), out["indices"].long())
        except RuntimeError as error:
            raise self._diagnose(error) from None
        self._iterator.reset()
        self._next_epoch = self.epoch + 1
