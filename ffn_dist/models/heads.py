"""Classifier heads and the fused embedding of FFN (spec/FFN.md section 1).

CE branch: a plain linear head. KPS branch and the stage-2 classifier: a cosine head,
`normalize(f) @ normalize(W, dim=0)`. Because the cosine head is linear in the normalised
features, mixing the two branches' cosine logits equals one cosine head applied to the
fused embedding z = w1*f̂_kps + w2*f̂_ce (not re-normalised), which a feature cache stores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ffn_dist.errors import FFNError


class LinearHead(nn.Linear):
    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__(embedding_dim, num_classes)


class CosineHead(nn.Module):
    """Cosine logits in [-1, 1]; W is D x C, as in the authors' NormedLinear."""

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(embedding_dim, num_classes))
        # The authors' init: uniform, then every column rescaled to unit norm.
        nn.init.uniform_(self.weight, -1.0, 1.0)
        with torch.no_grad():
            self.weight.div_(self.weight.norm(dim=0, keepdim=True))

    @classmethod
    def from_head(cls, head: CosineHead) -> CosineHead:
        """A new head initialised from another's weights (stage 2 starts from the KPS head)."""
        new = cls(*head.weight.shape)
        with torch.no_grad():
            new.weight.copy_(head.weight)
        return new

    def forward(self, features: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """`normalized=True` for inputs that are already unit-norm or fused embeddings."""
        if not normalized:
            features = F.normalize(features, dim=1)
        return features @ F.normalize(self.weight, dim=0)


def fused_embedding(f_kps: torch.Tensor, f_ce: torch.Tensor, w1: float, w2: float) -> torch.Tensor:
    """z = w1 * f̂_kps + w2 * f̂_ce; the fusion weights must sum to 1."""
    if not math.isclose(w1 + w2, 1.0, abs_tol=1e-6):
        raise FFNError(f"fusion weights must sum to 1 (w1 + w2), got {w1} + {w2} = {w1 + w2:g}")
    return w1 * F.normalize(f_kps, dim=1) + w2 * F.normalize(f_ce, dim=1)
