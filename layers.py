"""Leaf layers shared by the model files (imports nothing of the project).

ALIGN_CORNERS is the one place where each family's resizing convention lives, as each official code has it:
every bilinear resize of a family (inside the network, its output to the image, test-time input rescaling and
the aux loss) reads its family's entry.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

# per backbone family (models.family): HRNet-seg / openseg (ProtoSeg) True; mmseg's SegFormer head (mit), UperNet
# and its FCNHead (swin) False
ALIGN_CORNERS = {"hrnet": True, "resnet": True, "mit": False, "swin": False}


def upsample(x, size, align_corners):
    """Bilinear resize of (B, C, h, w) to size (H, W)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def labels_to(labels, size):
    """Labels (B, H, W) brought to a feature map's size (h, w) by nearest neighbour, as the official code does."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def drop_path_rates(total, rate):
    """Stochastic-depth rate of each of `total` blocks: linear from 0 to `rate` (timm / both official repos)."""
    return [rate * i / max(total - 1, 1) for i in range(total)]


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability p, scale the kept ones by 1 / (1 - p)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # one draw per sample
        return x * mask / keep


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, named as mmcv's ConvModule (`conv`, `bn`); mmcv's init:
    Kaiming normal (fan_out, relu) for the conv, BN weight 1 and bias 0."""

    def __init__(self, cin, cout, kernel=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def vit_init(m, conv=True):
    """The official transformer init: Linear trunc-normal(0.02) with bias 0, LayerNorm (1, 0); MiT also draws
    convs from N(0, 2 / fan_out) (conv=False keeps PyTorch's default, as Swin does)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif conv and isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
