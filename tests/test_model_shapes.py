"""Our ResNet shapes (handler.refund_model.RESNET_SHAPES): what the stem keeps of an 80x60 photo,
the widths, and their int8 form (training.quantize) with the float model's state_dict."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from handler.refund_model import RESNET_SHAPES, available_archs, build_model
from training import quantize

SHAPES = sorted(RESNET_SHAPES)


def last_grid(model: nn.Module, size=(80, 60)) -> tuple[int, int]:
    """(H, W) of the last stage's feature map for one photo of `size`."""
    seen = {}

    def keep(module, inputs, output) -> None:  # a hook that returns a value replaces the output
        seen["shape"] = output.shape

    hook = model.layer4.register_forward_hook(keep)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, *size))
    hook.remove()
    return tuple(seen["shape"][-2:])


def randomized_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and scales away from their initial values, so that fusing them matters."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def test_every_shape_is_an_arch_and_answers_each_class():
    assert set(SHAPES) <= set(available_archs())
    for arch in SHAPES:
        assert build_model(arch, 31).eval()(torch.randn(2, 3, 64, 48)).shape == (2, 31), arch


def test_the_stems_keep_2x_the_resolution_of_the_imagenet_stem():
    assert last_grid(build_model("resnet18", 31)) == (3, 2)
    for arch in ("resnet18_s2", "resnet26_s2", "resnet18_deep2", "wide_resnet18_s2"):
        assert last_grid(build_model(arch, 31)) == (5, 4), arch
    assert isinstance(build_model("resnet18_s2", 31).maxpool, nn.Identity)
    assert len(build_model("resnet18_deep2", 31).conv1) == 7  # three convs, BN + ReLU after the first two


def test_a_shape_without_a_new_stem_or_width_keeps_torchvision_s_state_dict_keys():
    ours = build_model("resnet18_s2", 31).state_dict()
    theirs = build_model("resnet18", 31).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_resnet34_is_torchvision_s_network_with_an_int8_form():
    import torchvision

    ours, theirs = build_model("resnet34", 31), torchvision.models.resnet34(num_classes=31)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert "resnet34" in quantize.quantizable_archs() and available_archs().count("resnet34") == 1
    q = quantize.quantizable_model("resnet34", 31, theirs.state_dict())
    assert not [n for n, m in q.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("arch", ["wide_resnet18_s2", "wide_resnet18"])
def test_the_wide_shapes_are_wider_everywhere(arch):
    model = build_model(arch, 31)
    assert model.conv1.out_channels == 96 and model.layer4[-1].conv2.out_channels == 768
    assert model.fc.in_features == 768
    assert last_grid(model) == ((5, 4) if arch.endswith("_s2") else (3, 2))


@pytest.mark.parametrize("arch", ["resnet18_s2", "resnet26_s2", "resnet18_deep2", "wide_resnet18_s2", "wide_resnet18"])
def test_the_int8_form_loads_the_float_weights_fuses_every_bn_and_agrees(arch):
    torch.manual_seed(0)
    model = randomized_bn(build_model(arch, 31))
    q = quantize.quantizable_model(arch, 31, model.state_dict())
    assert not [n for n, m in q.named_modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(16, 3, 48, 36)  # (B, 3, H, W)
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-4)  # fused, still float: the same function
    int8 = quantize.quantize_int8(arch, 31, model.state_dict(), [torch.randn(16, 3, 48, 36) for _ in range(2)])
    with torch.no_grad():
        fp32, got = model(x), int8(x)
    assert (fp32.argmax(1) == got.argmax(1)).float().mean() >= 0.9
    assert (fp32 - got).abs().max() < 0.1 * fp32.abs().max()


def test_an_unknown_stem_is_refused():
    from handler.refund_model import ResNetShape, shape_resnet

    with pytest.raises(ValueError, match="Invalid stem 'huge'; choose one of: imagenet, s2, deep2"):
        shape_resnet(ResNetShape("basic", (1, 1, 1, 1), stem="huge"), 3)
