"""Backbones that return pooled embeddings, and the heads that sit on them."""

from ffn_dist.models.heads import CosineHead, FusedClassifier, LinearForm, LinearHead, fused_embedding
from ffn_dist.models.resnet import build_backbone

__all__ = ["CosineHead", "FusedClassifier", "LinearForm", "LinearHead", "build_backbone", "fused_embedding"]
