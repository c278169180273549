"""Backbones and the segmentation model: HRNetV2 (W18-small-v2/18/32/48, tiny), dilated ResNet-18/50/101;
the MiT + all-MLP decoder (segformer.py) and Swin + UperNet (swin.py) presets are built here too.

Parameter names follow the checkpoints people load: HRNet-Semantic-Segmentation's `seg_hrnet` backbone
(= `backbone.*` in the official ProtoSeg checkpoint), torchvision's ResNet, NVlabs' mit_bN.pth and
microsoft/Swin-Transformer's releases. `load_pretrained` matches them strictly. A model is backbone -> neck ->
head (protoseg.py); `SegModel` returns scores at input size.
"""

import torch
import torch.nn as nn

from layers import ALIGN_CORNERS, upsample
from protoseg import HEADS
from segformer import MIT_PRESETS, MixTransformer, MLPDecoder
from swin import SWIN_PRESETS, SwinTransformer, UperNet


def conv3x3(cin, cout, stride=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        # both 3x3 convs take the dilation (torchvision has no dilated BasicBlock; needed for ResNet-18 at stride 8)
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride, dilation), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, 1, dilation), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        # stride on the 3x3 conv (ResNet v1.5), as both torchvision and HRNet do
        self.conv1, self.bn1 = conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride, dilation), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def conv_bn(cin, cout, kernel, stride=1, relu=True):
    """Sequential(conv, bn[, relu]): the `<i>.0` / `<i>.1` layout of HRNet transitions and fuse layers."""
    conv = conv3x3(cin, cout, stride) if kernel == 3 else conv1x1(cin, cout, stride)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), *([nn.ReLU(inplace=True)] if relu else []))


# ---------------------------------------------------------------------------------------------- HRNetV2

class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every branch i receives the sum over all branches j (exchange unit)."""

    def __init__(self, num_blocks, channels):
        super().__init__()
        nb = len(channels)
        # stages 2-4 use BasicBlocks whose input already has `channels[i]`, so no branch needs a downsample
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)]) for c in channels)
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse(j, i, channels) for j in range(nb)) for i in range(nb))
        self.relu = nn.ReLU()

    @staticmethod
    def _fuse(j, i, ch):
        """Map branch j to branch i: j > i 1x1 conv (+ upsample in forward); j < i (i-j) stride-2 3x3 convs."""
        if j > i:
            return conv_bn(ch[j], ch[i], 1, relu=False)
        if j == i:
            return None
        n = i - j  # intermediate convs keep ch[j] and end in ReLU; the last one maps to ch[i] without ReLU
        return nn.Sequential(*[conv_bn(ch[j], ch[i] if k == n - 1 else ch[j], 3, 2, relu=k < n - 1)
                               for k in range(n)])

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, fuse in enumerate(self.fuse_layers):
            y = 0
            for j, f in enumerate(fuse):
                z = xs[j] if f is None else f(xs[j])
                y = y + (upsample(z, xs[i].shape[-2:], ALIGN_CORNERS["hrnet"]) if j > i else z)  # y_i = sum_j f_ij(x_j)
            out.append(self.relu(y))
        return out


# width, Bottlenecks in layer1, modules in stages 2/3/4, BasicBlocks per branch (stem: 64 channels unless given).
# Branch channels = width * [1, 2, 4, 8].
HRNET_PRESETS = {
    # CPU-sized, no checkpoint to match: 32-channel stem, one module per stage, branches 8/16/32/64
    "hrnet_tiny": dict(width=8, stem=32, layer1_blocks=1, num_modules=(1, 1, 1), num_blocks=2),
    "hrnet18_small_v2": dict(width=18, layer1_blocks=2, num_modules=(1, 3, 2), num_blocks=2),
    "hrnet18": dict(width=18, layer1_blocks=4, num_modules=(1, 4, 3), num_blocks=4),
    "hrnet32": dict(width=32, layer1_blocks=4, num_modules=(1, 4, 3), num_blocks=4),
    "hrnet48": dict(width=48, layer1_blocks=4, num_modules=(1, 4, 3), num_blocks=4),
}


class HRNet(nn.Module):
    """HRNetV2 backbone; returns 4 maps at strides 4, 8, 16, 32 with width * [1, 2, 4, 8] channels."""
    family = "hrnet"   # models.family of every HRNet preset; its resizing: layers.ALIGN_CORNERS
    # checkpoint keys not used here (pattern -> why), reported by load_pretrained
    skipped_keys = {"incre_modules.*": "ImageNet classification neck",
                    "downsamp_modules.*": "ImageNet classification neck",
                    "final_layer.*": "ImageNet classification neck", "classifier.*": "ImageNet classifier",
                    "last_layer.*": "HRNet-seg classifier"}

    def __init__(self, width=48, layer1_blocks=4, num_modules=(1, 4, 3), num_blocks=4, stem=64):
        super().__init__()
        self.channels = [width * 2 ** i for i in range(4)]
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem)
        self.conv2, self.bn2 = nn.Conv2d(stem, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(conv1x1(stem, 4 * stem), nn.BatchNorm2d(4 * stem))
        self.layer1 = nn.Sequential(Bottleneck(stem, stem, downsample=down),
                                    *[Bottleneck(4 * stem, stem) for _ in range(layer1_blocks - 1)])
        prev = [4 * stem]
        for s in range(3):  # transition{1,2,3}, stage{2,3,4}
            cur = self.channels[:s + 2]
            setattr(self, f"transition{s + 1}", self._transition(prev, cur))
            setattr(self, f"stage{s + 2}", nn.Sequential(
                *[HighResolutionModule(num_blocks, cur) for _ in range(num_modules[s])]))
            prev = cur
        # He init (not HRNet-seg's N(0, 0.001), which only waits for ImageNet weights and trains badly from scratch)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _transition(prev, cur):
        """Existing branches: 3x3 conv if the width changes, else None. A new branch: stride-2 3x3 convs from the last."""
        layers = []
        for i, c in enumerate(cur):
            if i < len(prev):
                layers.append(conv_bn(prev[i], c, 3) if prev[i] != c else None)
            else:
                n = i + 1 - len(prev)
                layers.append(nn.Sequential(*[conv_bn(prev[-1], c if k == n - 1 else prev[-1], 3, 2)
                                              for k in range(n)]))
        return nn.ModuleList(layers)

    def forward(self, x):
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))  # stride 4
        xs = [self.layer1(x)]
        for s in range(3):
            trans, stage = getattr(self, f"transition{s + 1}"), getattr(self, f"stage{s + 2}")
            src = xs + xs[-1:] * (len(trans) - len(xs))  # a new branch starts from the lowest-resolution one
            xs = [x if t is None else t(x) for t, x in zip(trans, src)]
            xs = stage(xs)
        return xs


class HRNetNeck(nn.Module):
    """HRNetV2 representation: upsample branches 2-4 to branch 1 and concatenate -> (B, 15 * width, H/4, W/4)."""

    def __init__(self, channels):
        super().__init__()
        self.out_channels = sum(channels)

    def forward(self, xs):
        size = xs[0].shape[-2:]
        return torch.cat([xs[0]] + [upsample(x, size, ALIGN_CORNERS["hrnet"]) for x in xs[1:]], dim=1)


# ---------------------------------------------------------------------------------------------- ResNet

RESNET_PRESETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3)),
                  "resnet101": (Bottleneck, (3, 4, 23, 3))}


class ResNet(nn.Module):
    """torchvision ResNet without avgpool/fc; layer3/4 strides become dilations for output stride 8 or 16.
    Returns the layer4 map (B, 512 * expansion, H/os, W/os)."""
    family = "resnet"   # models.family of every ResNet preset; its resizing: layers.ALIGN_CORNERS
    skipped_keys = {"fc.*": "torchvision ImageNet classifier"}  # unused for segmentation

    def __init__(self, block, layers, output_stride=8):
        super().__init__()
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        self.inplanes, self.dilation = 64, 1
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[2])
        self.out_channels = 512 * block.expansion
        for m in self.modules():  # torchvision init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, n, stride=1, dilate=False):
        prev_dilation = self.dilation
        if dilate:  # as torchvision's replace_stride_with_dilation: first block keeps the previous dilation
            self.dilation, stride = self.dilation * stride, 1
        out = planes * block.expansion
        down = None
        if stride != 1 or self.inplanes != out:
            down = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, prev_dilation, down)]
        layers += [block(out, planes, dilation=self.dilation) for _ in range(n - 1)]
        self.inplanes = out
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


FAMILIES = {"hrnet": HRNET_PRESETS, "resnet": RESNET_PRESETS, "mit": MIT_PRESETS, "swin": SWIN_PRESETS}
BACKBONES = {"hrnet": HRNet, "resnet": ResNet, "mit": MixTransformer, "swin": SwinTransformer}


def backbone_names():
    return [name for presets in FAMILIES.values() for name in presets]


def family(backbone):
    """The family of a backbone preset: hrnet | resnet | mit | swin. It decides the neck, the resizing convention
    (layers.ALIGN_CORNERS) and, for mit / swin, the published recipe (settings.RECIPE_FILES)."""
    for name, presets in FAMILIES.items():
        if backbone in presets:
            return name
    raise ValueError(f"unknown backbone {backbone!r}; choose from {backbone_names()}")


def build_backbone(name, output_stride=8):
    """HRNet / ResNet presets here; MiT (segformer.py) and Swin (swin.py) presets in their files."""
    fam = family(name)
    if fam == "resnet":
        return ResNet(*RESNET_PRESETS[name], output_stride=output_stride)
    return BACKBONES[fam](**FAMILIES[fam][name])


def build_neck(net, num_classes=0, aux_head=False):
    """The decoder up to its classifier, by the backbone's family: HRNetV2 concat, SegFormer's all-MLP decoder,
    UperNet (+ its optional auxiliary FCN head); ResNet feeds the head directly."""
    if aux_head and net.family != "swin":
        raise ValueError("aux_head: the auxiliary FCN head belongs to UperNet (Swin backbones)")
    if net.family == "hrnet":
        return HRNetNeck(net.channels)
    if net.family == "mit":
        return MLPDecoder(net.channels, net.decoder_dim)
    if net.family == "swin":
        return UperNet(net.channels, aux_classes=num_classes if aux_head else 0)
    return nn.Identity()


# ---------------------------------------------------------------------------------------------- model

class SegModel(nn.Module):
    """images (B, 3, H, W) -> backbone -> neck (B, D, h, w) -> head -> class scores upsampled to (B, C, H, W)."""

    def __init__(self, backbone, neck, head, family=None):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.family = family or backbone.family                     # hrnet, resnet, mit or swin
        self.align_corners = ALIGN_CORNERS[self.family]             # every resize outside the network too

    def features(self, images):
        """(B, 3, H, W) -> the head's input (B, Din, h, w)."""
        return self.neck(self.backbone(images))

    def embed(self, images):
        """(B, 3, H, W) -> pixel embeddings (B, h, w, D) of the head (l2-normalised for ProtoSeg)."""
        return self.head.embed(self.features(images))

    def forward(self, images, labels=None):
        """-> {"scores": (B, C, H, W)} and, in training with labels, the head's other entries (at the feature
        resolution) plus 'aux_scores' (B, C, H, W) when the neck has UperNet's aux head (torchvision's output
        dict)."""
        feats = self.backbone(images)
        out = dict(self.head(self.neck(feats), labels))
        size = images.shape[-2:]
        out["scores"] = upsample(out["scores"], size, self.align_corners)
        aux_head = getattr(self.neck, "aux_head", None)
        if aux_head is not None and self.training and labels is not None:
            out["aux_scores"] = upsample(aux_head(feats[self.neck.aux_index]), size, self.align_corners)
        return out


def build_model(backbone="hrnet48", head="protoseg", num_classes=19, output_stride=8, aux_head=False, **head_kwargs):
    """e.g. build_model("hrnet48", "protoseg", 19, num_prototypes=10). `output_stride` applies to ResNets only;
    `aux_head` (Swin + UperNet only) adds UperNet's auxiliary FCN head, see swin.UperNet."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {list(HEADS)}")
    net = build_backbone(backbone, output_stride)
    neck = build_neck(net, num_classes, aux_head)
    in_channels = getattr(neck, "out_channels", getattr(net, "out_channels", None))
    return SegModel(net, neck, HEADS[head](in_channels, num_classes, **head_kwargs))


def model_from_config(cfg):
    """The model a config describes (a dict or settings.Config): backbone, head, classes and the head's switches."""
    cfg = cfg if isinstance(cfg, dict) else vars(cfg)
    kw = dict(dropout=cfg.get("dropout", 0.1))
    if cfg["head"] == "protoseg":
        kw.update(num_prototypes=cfg["num_prototypes"], kappa=cfg["kappa"], sinkhorn_iters=cfg["sinkhorn_iters"],
                  class_layernorm=cfg["class_layernorm"],
                  embed_layernorm=cfg["embed_layernorm"], normalize_width=cfg.get("normalize_width", False),
                  update_correct_only=cfg["update_correct_only"], local_stats=cfg["local_stats"])
    aux = cfg.get("aux_loss_weight", 0) > 0
    return build_model(cfg["backbone"], cfg["head"], cfg["num_classes"], aux_head=aux, **kw)
