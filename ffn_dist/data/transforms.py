"""One description of the image transforms, which both loader backends implement.

eval:  resize the shorter side to `resize_size`, centre crop `image_size`, normalise.
train: `pad_crop` (CIFAR) — the eval geometry, then a random crop after 4-pixel zero
       padding; `random_resized_crop` (ImageNet) — scale 0.08..1, ratio 3/4..4/3.
       Then a horizontal flip, colour jitter if configured, normalise.
Output of both backends: float32 NCHW, normalised with `mean`/`std` (given on a 0..1 scale).
"""

from __future__ import annotations

from dataclasses import dataclass

PAD = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class TransformSpec:
    train: bool
    train_crop: str
    image_size: int
    resize_size: int
    color_jitter: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, data_cfg, train: bool) -> TransformSpec:
        return cls(
            train=train,
            train_crop=data_cfg.train_crop,
            image_size=data_cfg.image_size,
            resize_size=data_cfg.resize_size,
            color_jitter=data_cfg.color_jitter if train else 0.0,
            mean=tuple(data_cfg.mean),
            std=tuple(data_cfg.std),
        )

    @property
    def random_resized_crop(self) -> bool:
        return self.train and self.train_crop == "random_resized_crop"

    @property
    def pad_crop(self) -> bool:
        return self.train and self.train_crop == "pad_crop"


def eval_geometry(spec: TransformSpec):
    """Shorter side to `resize_size`, centre crop `image_size`: PIL image in, PIL image out.
    The eval transform, and where `pad_crop` starts (the memory backend stores its output)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(spec.resize_size), T.CenterCrop(spec.image_size)])


def torchvision_transform(spec: TransformSpec):
    from torchvision import transforms as T

    if spec.random_resized_crop:
        steps = [T.RandomResizedCrop(spec.image_size, scale=RRC_SCALE, ratio=RRC_RATIO)]
    else:
        steps = [eval_geometry(spec)]
        if spec.pad_crop:
            steps.append(T.RandomCrop(spec.image_size, padding=PAD))
    if spec.train:
        steps.append(T.RandomHorizontalFlip())
    if spec.color_jitter > 0:
        j = spec.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps)
