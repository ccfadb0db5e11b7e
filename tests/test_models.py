import pytest
import torch
import torch.nn.functional as F

from ffn_dist.errors import FFNError
from ffn_dist.models.backbones import BACKBONES, PretrainedRefused, build_backbone, load_pretrained
from ffn_dist.models.heads import CosineHead, CosineLogits, LinearHead, fused_embedding
from ffn_dist.models.precision import autocast, place_images, place_model, uses_bf16


def trainable(module):
    return sum(p.numel() for p in module.parameters())


def test_resnet32_is_the_cifar_network():
    trunk = build_backbone("resnet32")
    # conv1 + bn1, then 3 stages of 5 basic blocks at 16/32/64 channels, option A shortcuts
    conv = lambda i, o: 9 * i * o  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    block = lambda i, o: conv(i, o) + conv(o, o) + 2 * bn(o)  # noqa: E731
    expected = conv(3, 16) + bn(16)
    expected += 5 * block(16, 16) + block(16, 32) + 4 * block(32, 32) + block(32, 64) + 4 * block(64, 64)
    assert trainable(trunk) == expected == 463_504  # "0.46 M" of the ResNet paper's Table 6
    embedding = trunk(torch.randn(2, 3, 32, 32))
    assert embedding.shape == (2, 64) and trunk.embedding_dim == 64


def test_resnet50_trunk_is_torchvisions_without_fc():
    from torchvision.models import resnet50

    trunk = build_backbone("resnet50")
    full = resnet50(weights=None)
    assert trainable(trunk) == trainable(full) - (2048 * 1000 + 1000) == 23_508_032
    assert trunk.embedding_dim == 2048
    assert trunk(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


@pytest.mark.parametrize("arch", [a for a in BACKBONES if a != "resnet32"])
def test_every_registered_trunk_is_torchvisions_without_fc_and_its_dimension(arch):
    import torchvision.models

    trunk = build_backbone(arch)
    full = getattr(torchvision.models, arch)(weights=None)
    dims = BACKBONES[arch].embedding_dim
    assert full.fc.in_features == dims == trunk.embedding_dim
    assert trainable(trunk) == trainable(full) - (dims * 1000 + 1000)
    assert trunk.eval()(torch.randn(1, 3, 32, 32)).shape == (1, dims)


def test_unknown_backbone_is_refused_listing_the_names():
    with pytest.raises(FFNError, match="model.arch: unknown backbone 'vgg'; available: resnet32, resnet18, "):
        build_backbone("vgg")
    from ffn_dist.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match="model.arch: got 'vgg', allowed values: resnet32, .*resnext50_32x4d"
    ):
        load_config(None, ["model.arch=vgg"])


def test_pretrained_weights_come_from_a_torchvision_file_or_a_stage1_checkpoint(tmp_path):
    import torchvision.models

    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")  # as torchvision holds it, fc included
    trunk = build_backbone("resnet18")
    load_pretrained(trunk, tmp_path / "resnet18.pth", "resnet18")
    assert torch.equal(trunk.conv1.weight, source.conv1.weight) and torch.equal(
        trunk.bn1.running_mean, source.bn1.running_mean
    )
    state = {
        "model": {
            **{f"backbone.{k}": v for k, v in trunk.state_dict().items()},
            "head.weight": torch.zeros(3, 512),
        }
    }
    torch.save(state, tmp_path / "epoch_0010.pt")
    again = build_backbone("resnet18")
    load_pretrained(again, tmp_path / "epoch_0010.pt", "resnet18")
    assert torch.equal(again.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_a_pretrained_file_for_another_architecture_is_refused_naming_its_keys(tmp_path):
    import torchvision.models

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(
        PretrainedRefused,
        match=r"r18.pth: model.pretrained is not a resnet50 trunk: \d+ missing keys \(layer1.0.conv3.weight",
    ):
        load_pretrained(build_backbone("resnet50"), tmp_path / "r18.pth", "resnet50")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedRefused, match="junk.pth: model.pretrained: cannot be loaded safely"):
        load_pretrained(build_backbone("resnet18"), tmp_path / "junk.pth", "resnet18")


def test_cosine_head_logits_are_cosines_and_init_copies():
    head = CosineHead(8, 5)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(5))
    f = torch.randn(4, 8)
    expected = torch.stack([F.cosine_similarity(f, head.weight[c].expand(4, 8), dim=1) for c in range(5)], 1)
    assert torch.allclose(head(f), expected, atol=1e-6)
    clone = CosineHead.from_head(head)
    assert torch.equal(clone.weight, head.weight) and clone.weight is not head.weight
    assert LinearHead(8, 5)(f).shape == (4, 5)


def test_cosine_logits_gradient_matches_autograd_of_the_formula():
    z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CosineLogits.apply, (z, w))
    z32, w32 = torch.randn(64, 32), torch.randn(10, 32) * 3
    grad_out = torch.randn(64, 10)
    ours = [t.clone().requires_grad_() for t in (z32, w32)]
    CosineLogits.apply(*ours).backward(grad_out)
    plain = [t.clone().requires_grad_() for t in (z32, w32)]
    (plain[0] @ F.normalize(plain[1], dim=1).t()).backward(grad_out)
    for a, b in zip(ours, plain, strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_cosine_head_runs_in_fp32_under_bf16_autocast():
    head = CosineHead(16, 3)
    features = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features.bfloat16())
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, head(features.bfloat16().float()), atol=2e-2)
    logits.sum().backward()
    assert head.weight.grad.dtype == torch.float32 and features.grad is not None


def test_fusion_identity():
    """Mixing the branches' cosine logits is one cosine head on the fused embedding, for two
    branches and for three."""
    gen = torch.Generator().manual_seed(0)
    scales = {"kps": 1, "ce": 7, "bs": 3}
    features = {name: torch.randn(16, 64, generator=gen) * scale for name, scale in scales.items()}
    head = CosineHead(64, 10)
    for weights in ({"kps": 0.3, "ce": 0.7}, {"kps": 1.0, "ce": 0.0}, {"kps": 0.5, "ce": 0.3, "bs": 0.2}):
        mixed_logits = sum(w * head(features[name]) for name, w in weights.items())
        fused_logits = head(fused_embedding(features, weights), normalized=True)
        assert torch.allclose(mixed_logits, fused_logits, atol=1e-6)
        direct = (
            sum(w * F.normalize(features[name]) for name, w in weights.items())
            @ F.normalize(head.weight, dim=1).t()
        )
        assert torch.allclose(fused_logits, direct, atol=1e-6)


def test_fusion_weights_must_be_on_the_simplex():
    ones = {"kps": torch.ones(1, 2), "ce": torch.ones(1, 2)}
    with pytest.raises(FFNError, match=r"fusion weights must sum to 1, got 0.7 \+ 0.5 = 1.2 \(kps, ce\)"):
        fused_embedding(ones, {"kps": 0.7, "ce": 0.5})
    with pytest.raises(FFNError, match=r"a fusion weight must be >= 0, got ce: -0.5"):
        fused_embedding(ones, {"kps": 1.5, "ce": -0.5})


def test_cpu_stays_fp32_unless_configured():
    cpu = torch.device("cpu")
    assert not uses_bf16(cpu, "auto") and uses_bf16(cpu, "bf16") and uses_bf16(torch.device("cuda"), "auto")
    model = place_model(build_backbone("resnet32"), cpu)
    x = place_images(torch.randn(2, 3, 32, 32), cpu)
    assert x.is_contiguous()  # NCHW on the CPU; channels_last is for CUDA
    with autocast(cpu, "auto"):
        assert model(x).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert model(x).dtype == torch.bfloat16
