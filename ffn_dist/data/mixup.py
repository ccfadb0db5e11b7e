"""Mixup (Zhang et al. 2018) as FFN's stage 1 uses it: pairs within the batch."""

from __future__ import annotations

import numpy as np
import torch

from ffn_dist.data.loader import to_device


def mixup(images: torch.Tensor, labels: torch.Tensor, alpha: float, rng: np.random.Generator):
    """Return (mixed images, y_a, y_b, lam); the loss is lam*L(y_a) + (1-lam)*L(y_b).

    lam ~ Beta(alpha, alpha), one per batch; alpha = 0 returns the batch unchanged (lam 1).
    """
    if alpha <= 0:
        return images, labels, labels, 1.0
    lam = float(rng.beta(alpha, alpha))
    perm = to_device(torch.from_numpy(rng.permutation(images.shape[0])), images.device)
    mixed = lam * images + (1.0 - lam) * images[perm]
    return mixed, labels, labels[perm], lam
