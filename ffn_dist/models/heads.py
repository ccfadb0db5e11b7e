"""Classifier heads and the fused embedding of FFN (docs/method.md, stage 2).

CE branch: a plain linear head. KPS branch and the stage-2 classifier: a cosine head,
`normalize(f) @ normalize(W, dim=0)`. Because the cosine head is linear in the normalised
features, mixing the branches' cosine logits equals one cosine head applied to the fused
embedding z = sum_b w_b f̂_b (weights on the simplex, not re-normalised), which a feature
cache stores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ffn_dist.fusion import check_weights, weighed, weighted_sum
from ffn_dist.models.precision import without_autocast


class LinearHead(nn.Linear):
    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__(embedding_dim, num_classes)


def cosine_weight_gradient(
    grad_cosine: torch.Tensor, cosine: torch.Tensor, norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's one written-out gradient: (S, r) with dL/dW = S^T z - r[:, None] W for the
    cosines of (normalised) z against W's rows, S = dL/dcos / |w_j| and r_j = sum_i S_ij cos_ij
    / |w_j|, since d cos_ij / d w_j = z_i / |w_j| - cos_ij w_j / |w_j|^2."""
    scaled = grad_cosine / norms
    return scaled, (scaled * cosine).sum(0).div_(norms)


class CosineLogits(torch.autograd.Function):
    """cos(z_i, w_j) scaled by |z_i| (inputs are normalised by the caller): z @ normalize(W)^T.

    Its weight gradient is `cosine_weight_gradient`: one matrix product and one pass over W,
    because autograd's version (normalise, matmul, norm backward, accumulate) allocates and
    walks the C x D gradient several times per step.
    Computed in the weight's precision (fp32) under any autocast: the head is small and margins need it.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.input_dtype = features.dtype
        with without_autocast(features.device.type):
            features = features.to(weight.dtype)
            norms = torch.linalg.vector_norm(weight, dim=1)
            cosine = (features @ weight.t()).div_(norms)
        ctx.save_for_backward(features, weight, norms, cosine)
        return cosine

    @staticmethod
    def backward(ctx, grad_cosine: torch.Tensor):
        features, weight, norms, cosine = ctx.saved_tensors
        with without_autocast(grad_cosine.device.type):
            scaled, radial = cosine_weight_gradient(grad_cosine.to(weight.dtype), cosine, norms)
            grad_weight = weight * -radial[:, None]
            grad_weight.addmm_(scaled.t(), features)
            grad_features = (scaled @ weight).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        return grad_features, grad_weight


class CosineHead(nn.Module):
    """Cosine logits in [-1, 1]. The weight is stored C x D (each class's vector contiguous,
    so normalising it streams memory); the authors' NormedLinear holds its transpose."""

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        # The authors' init: uniform, then every class vector rescaled to unit norm.
        nn.init.uniform_(self.weight, -1.0, 1.0)
        with torch.no_grad():
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    @classmethod
    def from_head(cls, head: CosineHead) -> CosineHead:
        """A new head initialised from another's weights (stage 2 starts from the KPS head)."""
        num_classes, embedding_dim = head.weight.shape
        new = cls(embedding_dim, num_classes)
        with torch.no_grad():
            new.weight.copy_(head.weight)
        return new

    def forward(self, features: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """`normalized=True` for inputs that are already unit-norm or fused embeddings."""
        if not normalized:
            features = F.normalize(features, dim=1)
        return CosineLogits.apply(features, self.weight)


# Each head of registry.HEADS (branches.NAME.head).
HEAD_CLASSES = {"linear": LinearHead, "cosine": CosineHead}


def fused_embedding(features: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """z = sum_b w_b f̂_b over the branches of `weights` (on the simplex), in their order; a
    branch of weight 0 needs no features."""
    check_weights(weights)
    return weighted_sum({name: F.normalize(features[name], dim=1) for name in weighed(weights)}, weights)


def gated_logits(logits, features, gate_weight, gate_bias, scale, shift) -> torch.Tensor:
    """DisAlign's adjusted logits (Zhang et al. 2021): with the input's confidence
    c = sigmoid(z . g + g0), (1 + c * scale) * logits + c * shift, scale and shift per class."""
    confidence = torch.sigmoid(features @ gate_weight + gate_bias)[:, None]
    return logits * (1.0 + confidence * scale) + confidence * shift


class LinearForm(nn.Module):
    """A trained classifier of fused embeddings as one layer: x @ W^T + b, where x is z, or
    z / |z| with `normalize_input`. Every classifier stage 2 trains or fits has this form:
    FFN's cosine head (W's rows normalised, no bias), a linear one (cRT, ERM, weight
    balancing, Balanced Softmax, MiSLAS), LWS (rows scaled), tau-normalisation (rows divided
    by |w|^tau), logit adjustment (b - tau log pi), nearest class mean (unit inputs against
    unit means). DisAlign adds a `gate`: with confidence c = sigmoid(z . g + g0) of the
    input, logits l become (1 + c * scale) * l + c * shift. It holds no parameters, only
    buffers: a frozen model to evaluate and export."""

    GATE = ("gate_weight", "gate_bias", "scale", "shift")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        normalize_input: bool = False,
        gate: dict | None = None,
    ):
        super().__init__()
        weight = weight.detach().float()
        self.register_buffer("weight", weight.clone())
        self.register_buffer(
            "bias", torch.zeros(len(weight)) if bias is None else bias.detach().float().clone()
        )
        self.normalize_input = normalize_input
        self.gated = gate is not None
        for name in self.GATE if self.gated else ():
            self.register_buffer(name, torch.as_tensor(gate[name]).detach().float().clone())

    @classmethod
    def cosine(cls, weight: torch.Tensor) -> LinearForm:
        """FFN's classifier: z @ normalize(W)^T."""
        return cls(F.normalize(weight.detach().float(), dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        inputs = F.normalize(features, dim=1) if self.normalize_input else features
        logits = F.linear(inputs, self.weight, self.bias)
        if self.gated:
            logits = gated_logits(logits, features, *(getattr(self, name) for name in self.GATE))
        return logits

    def state(self) -> dict:
        state = {"weight": self.weight.cpu(), "bias": self.bias.cpu()}
        state["normalize_input"] = self.normalize_input
        if self.gated:
            state["gate"] = {name: getattr(self, name).cpu() for name in self.GATE}
        return state

    @classmethod
    def from_state(cls, state: dict) -> LinearForm:
        return cls(state["weight"], state["bias"], bool(state["normalize_input"]), state.get("gate"))


class FusedClassifier(nn.Module):
    """The whole FFN classifier, images to logits: every branch's backbone, their unit
    embeddings, z = sum_b w_b f̂_b, and a classifier of z (a LinearForm)."""

    def __init__(self, backbones: dict[str, nn.Module], weights: dict[str, float], head: LinearForm):
        super().__init__()
        check_weights(weights)
        self.weights, self.head = dict(weights), head
        # a branch of weight 0 adds nothing to z: its backbone is not in the model
        self.backbones = nn.ModuleDict({name: backbones[name] for name in weighed(weights)})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = {name: backbone(images) for name, backbone in self.backbones.items()}
        return self.head(fused_embedding(features, self.weights))
