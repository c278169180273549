"""Initialisation from scratch, checked on freshly built models against each official rule, module by module: the
decoders and heads are always trained from these weights (only a backbone loads ImageNet weights). Also the leaf
layers of layers.py: DropPath, the drop-path schedule and labels brought to a feature grid.

The rules (segformer.py / swin.py / layers.py give their sources):
  MiT encoder       Linear trunc-normal(0.02), bias 0; LayerNorm (1, 0); Conv2d N(0, 2 / fan_out), fan_out =
                    k*k*out/groups, bias 0
  Swin encoder      Linear trunc-normal(0.02), bias 0; LayerNorm (1, 0); bias tables trunc-normal(0.02); the
                    patch conv PyTorch's default
  mmcv ConvModule   (SegFormer's linear_fuse, all of UperNet) conv Kaiming normal, fan_out, ReLU gain: N(0, 2 /
                    (k*k*out)); BN (1, 0); UperNet's aux conv_seg N(0, 0.01), bias 0
  SegFormer's MLPs  PyTorch's default Linear (the official decoder draws nothing else)
  HRNet, ResNet     every conv Kaiming normal, fan_out (He init; BN (1, 0))
  ProtoSeg head     PyTorch's default convs and LayerNorms (the official head draws only its prototypes),
                    prototypes trunc-normal(0.02) then unit length; the query head's queries (Eq. 2) N(0, 0.02^2)
PyTorch's default for a Linear / Conv2d: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""
import math

import pytest
import torch
import torch.nn as nn

import models
from layers import ConvModule, DropPath, drop_path_rates, labels_to
from segformer import MixTransformer, MLPDecoder
from swin import SwinTransformer, UperNet


def normal(w, std):
    """w looks like i.i.d. N(0, std^2) draws: mean, standard deviation and kurtosis (3; a uniform's is 1.8)
    within 5 standard errors."""
    n, w = w.numel(), w.detach().double().flatten()
    kurtosis = float((w ** 4).mean() / (w ** 2).mean() ** 2)
    return abs(float(w.mean())) < 5 * std / math.sqrt(n) and abs(float(w.std()) / std - 1) < 5 / math.sqrt(2 * n) \
        and abs(kurtosis - 3) < 5 * math.sqrt(24 / n)


def pytorch_default(w, fan_in):
    """U(-b, b), b = 1/sqrt(fan_in): inside the bound and with the uniform's standard deviation b/sqrt(3)."""
    b, n = 1 / math.sqrt(fan_in), w.numel()
    return float(w.abs().max()) <= b and abs(float(w.std()) * math.sqrt(3) / b - 1) < 5 / math.sqrt(n)


def fan_out(conv):
    return conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups


def unit_norm(m):
    return torch.equal(m.weight.detach(), torch.ones_like(m.weight)) and not m.bias.detach().any()


def check_vit(net, conv_rule):
    """Every Linear, LayerNorm and Conv2d of a transformer encoder; conv_rule(conv) -> bool."""
    seen = set()
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            assert normal(m.weight, 0.02) and float(m.weight.abs().max()) <= 2, name   # truncated at +-2
            assert m.bias is None or not m.bias.detach().any(), name
        elif isinstance(m, nn.LayerNorm):
            assert unit_norm(m), name
        elif isinstance(m, nn.Conv2d):
            assert conv_rule(m), name
        else:
            continue
        seen.add(type(m))
    assert seen == {nn.Linear, nn.LayerNorm, nn.Conv2d}


def check_conv_module(name, m):
    assert isinstance(m, ConvModule) and m.conv.bias is None, name
    assert normal(m.conv.weight, math.sqrt(2 / fan_out(m.conv))), name
    assert torch.equal(m.bn.weight.detach(), torch.ones_like(m.bn.weight)) and not m.bn.bias.detach().any(), name


@torch.no_grad()
def test_mit_encoder_init_is_segformers_rule():
    torch.manual_seed(0)
    net = MixTransformer(dims=(32, 64, 160, 256), depths=(1, 1, 1, 1))           # MiT-B0 widths, one block a stage
    check_vit(net, lambda c: normal(c.weight, math.sqrt(2 / fan_out(c))) and not c.bias.any())
    depthwise = [m for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(fan_out(m) == 9 for m in depthwise)                # 3x3, one channel a group


@torch.no_grad()
def test_segformer_decoder_init_is_pytorchs_linear_and_mmcvs_conv_module():
    torch.manual_seed(0)
    dec = MLPDecoder([32, 64, 160, 256], 256)
    for i, cin in enumerate([32, 64, 160, 256]):
        proj = getattr(dec, f"linear_c{i + 1}").proj
        assert pytorch_default(proj.weight, cin) and pytorch_default(proj.bias, cin), i
    check_conv_module("linear_fuse", dec.linear_fuse)
    assert fan_out(dec.linear_fuse.conv) == 256                                 # 1x1, 4E -> E: fan_out is E


@torch.no_grad()
def test_swin_encoder_init_is_swins_rule():
    torch.manual_seed(0)
    net = SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=7)
    check_vit(net, lambda c: pytorch_default(c.weight, 3 * 4 * 4) and pytorch_default(c.bias, 3 * 4 * 4))
    tables = [p for n, p in net.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 8 and normal(torch.cat([t.flatten() for t in tables]), 0.02)


@torch.no_grad()
def test_upernet_init_is_mmcvs_conv_module_and_the_aux_classifier_n_0_0p01():
    torch.manual_seed(0)
    neck = UperNet([16, 32, 64, 128], channels=64, aux_classes=5)
    modules = [(n, m) for n, m in neck.named_modules() if isinstance(m, ConvModule)]
    assert len(modules) == 4 + 1 + 3 + 3 + 1 + 1                                # psp, bottleneck, lateral, fpn, fuse, aux
    for name, m in modules:
        check_conv_module(name, m)
    seg = neck.aux_head.conv_seg
    assert normal(seg.weight, 0.01) and not seg.bias.any()


@pytest.mark.parametrize("backbone", ["hrnet_tiny", "resnet18"])
@torch.no_grad()
def test_hrnet_and_resnet_convs_are_he_normal_fan_out_and_bn_1_0(backbone):
    torch.manual_seed(0)
    net = models.build_backbone(backbone)
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for name, m in convs:
        assert normal(m.weight, math.sqrt(2 / fan_out(m))), name
    assert all(unit_norm(m) for m in net.modules() if isinstance(m, nn.BatchNorm2d))


@torch.no_grad()
def test_heads_keep_pytorchs_default_and_draw_unit_prototypes_and_small_queries():
    torch.manual_seed(0)
    head = models.HEADS["protoseg"](48, 5, embed_dim=32, num_prototypes=4, embed_layernorm=True)
    convs = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for name, m in convs:
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        assert pytorch_default(m.weight, fan_in) and pytorch_default(m.bias, fan_in), name
    assert all(unit_norm(m) for m in head.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)))
    protos = head.prototypes
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(5, 4))
    assert normal(models.HEADS["query"](48, 5, embed_dim=200).queries, 0.02)       # Eq. 2's queries: N(0, 0.02^2)
    assert abs(float((protos @ protos.flatten(0, 1).T).triu(1).mean())) < 0.1   # random directions, no common one


# ----------------------------------------------------------------------------- DropPath, its schedule, labels_to

def test_drop_path_drops_whole_samples_and_scales_the_kept_by_1_over_keep():
    torch.manual_seed(0)
    x = torch.randn(400, 3, 2, 2) + 5
    layer = DropPath(0.25).train()
    y = layer(x)
    kept = (y != 0).flatten(1).all(1)
    assert torch.equal(kept, (y != 0).flatten(1).any(1))                      # a sample is kept or dropped whole
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(float((~kept).float().mean()) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 400)
    assert layer.eval()(x) is x and DropPath(0.0).train()(x) is x


def test_drop_path_rates_are_linear_from_0_to_the_rate():
    assert drop_path_rates(5, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(1, 0.3) == [0.0]


def test_labels_to_a_grid_takes_the_nearest_source_pixel():
    labels = torch.arange(7 * 11).reshape(1, 7, 11)
    out = labels_to(labels, (3, 4))
    assert out.dtype == torch.long and out.tolist() == [[[int(labels[0, y * 7 // 3, x * 11 // 4]) for x in range(4)]
                                                         for y in range(3)]]
    assert labels_to(labels, (7, 11)) is labels


@pytest.mark.parametrize("backbone, align_corners", [("hrnet_tiny", True), ("resnet18", True), ("mit_b0", False),
                                                     ("swin_tiny", False)])
def test_each_familys_resizes_follow_its_official_code(backbone, align_corners):
    """HRNet-seg and openseg (ProtoSeg's code, its ResNet models too) resize with align_corners=True; mmseg's
    SegFormerHead and UPerHead with False. The model's scores are its head's, resized so."""
    with torch.device("meta"):
        assert models.build_model(backbone, "softmax", 5).align_corners is align_corners
    if backbone == "resnet18":
        torch.manual_seed(0)
        net, image = models.build_model(backbone, "softmax", 5).eval(), torch.randn(1, 3, 40, 56)
        with torch.no_grad():
            head = net.head(net.features(image))["scores"]
            expected = torch.nn.functional.interpolate(head, (40, 56), mode="bilinear", align_corners=True)
            torch.testing.assert_close(net(image)["scores"], expected)
