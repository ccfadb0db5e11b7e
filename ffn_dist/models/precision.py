"""Memory format and autocast: bf16 + channels_last on CUDA, fp32 on the CPU unless asked."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")


def uses_bf16(device: torch.device, precision: str) -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to `device`; channels_last on CUDA, where cuDNN's convolutions prefer NHWC."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def autocast(device: torch.device, precision: str = "auto"):
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def without_autocast(device_type: str):
    """The tensors' own precision inside an autocast region (where the device has autocast;
    `meta`, which tests use to check device placement, has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
