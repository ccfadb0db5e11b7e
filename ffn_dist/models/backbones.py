"""Backbone trunks by name, in one registry: each returns its pooled embedding; heads live in
`heads.py`.

`resnet32` is the CIFAR network of He et al. (2016) as the LDAM / KPS / FFN code uses it
(`resnet.py`); the others are torchvision's ResNet family, built without weights (nothing is
downloaded) and without their fc layer. `model.pretrained` initialises a trunk from a local
file instead: a torchvision-format state dict (what `torchvision.models.X(weights=...)`
holds, its fc dropped) or a stage-1 checkpoint of another run (its `backbone.*` weights),
loaded weights-only; a file for another architecture is refused naming its first missing or
unexpected keys. Nothing here imports torch until a trunk is built: the config checks
`model.arch` against these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ffn_dist.errors import FFNError


class PretrainedRefused(FFNError):
    pass


@dataclass(frozen=True)
class Backbone:
    build: Callable  # () -> nn.Module returning the pooled embedding
    embedding_dim: int
    summary: str


def _resnet32():
    from ffn_dist.models.resnet import ResNet32

    return ResNet32()


def _torchvision(name: str, dims: int) -> Callable:
    def build():
        import torchvision.models
        from torch import nn

        model = getattr(torchvision.models, name)(weights=None)
        model.fc = nn.Identity()
        model.embedding_dim = dims
        return model

    return build


def _tv(name: str, dims: int, summary: str) -> Backbone:
    return Backbone(_torchvision(name, dims), dims, summary)


BACKBONES = {
    "resnet32": Backbone(_resnet32, 64, "CIFAR ResNet-32 (3 x 5 basic blocks, 16/32/64 channels): CIFAR-LT"),
    "resnet18": _tv("resnet18", 512, "torchvision ResNet-18"),
    "resnet34": _tv("resnet34", 512, "torchvision ResNet-34"),
    "resnet50": _tv("resnet50", 2048, "torchvision ResNet-50: ImageNet-LT (FFN), iNaturalist 2018"),
    "resnet101": _tv("resnet101", 2048, "torchvision ResNet-101"),
    "resnet152": _tv("resnet152", 2048, "torchvision ResNet-152: Places-LT (ImageNet-pretrained)"),
    "resnext50_32x4d": _tv(
        "resnext50_32x4d", 2048, "torchvision ResNeXt-50 32x4d: ImageNet-LT (cRT, RIDE, PaCo)"
    ),
    "resnext101_32x8d": _tv("resnext101_32x8d", 2048, "torchvision ResNeXt-101 32x8d"),
    "wide_resnet50_2": _tv("wide_resnet50_2", 2048, "torchvision Wide ResNet-50-2"),
}


def backbone_entry(arch: str) -> Backbone:
    if arch not in BACKBONES:
        raise FFNError(f"model.arch: unknown backbone {arch!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[arch]


def build_backbone(arch: str):
    return backbone_entry(arch).build()


def trunk_state(path: Path) -> dict:
    """The trunk weights a file holds: a torchvision state dict (fc dropped), or the
    `backbone.*` weights of a stage-1 checkpoint; loaded weights-only."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PretrainedRefused(f"{path}: model.pretrained: file not found") from None
    except Exception as exc:  # truncated, corrupt, or holding objects that could run code
        raise PretrainedRefused(
            f"{path}: model.pretrained: cannot be loaded safely ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a stage-1 checkpoint
        state = {
            k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")
        }
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedRefused(f"{path}: model.pretrained: expected a state dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_pretrained(backbone, path: str | Path, arch: str) -> None:
    """Initialise `backbone` (an `arch` trunk) from `path`, refused unless every key and shape
    matches, naming the first that do not."""
    path = Path(path)
    state = trunk_state(path)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        said = []
        for name, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("other shapes", shapes),
        ):
            if keys:
                said.append(f"{len(keys)} {name} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise PretrainedRefused(f"{path}: model.pretrained is not a {arch} trunk: {'; '.join(said)}")
    backbone.load_state_dict(state)
