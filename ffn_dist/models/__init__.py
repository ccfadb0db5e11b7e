"""Backbones that return pooled embeddings, and the heads that sit on them."""

from ffn_dist.models.heads import CosineHead, LinearHead, fused_embedding
from ffn_dist.models.resnet import build_backbone

__all__ = ["CosineHead", "LinearHead", "build_backbone", "fused_embedding"]
