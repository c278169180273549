"""Swin Transformer (Liu et al., ICCV 2021) as a segmentation backbone, and UperNet (Xiao et al., ECCV 2018).

Parameter names follow microsoft/Swin-Transformer: the backbone's state dict is the released ImageNet checkpoint
(`{"model": state_dict}`) minus `head.*` and `norm.*` (the classifier and its final LayerNorm), plus the per-stage
output LayerNorms `norm0..norm3` of the segmentation backbone (Swin-Transformer-Semantic-Segmentation), which ImageNet
files do not have. `attn_mask` and `relative_position_index` are recomputed, not loaded. UperNet's modules are named as
mmseg's UPerHead (psp_modules, bottleneck, lateral_convs, fpn_convs, fpn_bottleneck) without its classifier
(dropout, conv_seg): the ProtoSeg, softmax or query head takes the fused 512-channel features there.

Facts read from swin_transformer.py (both repositories) and mmseg's uper_head.py / psp_head.py / fcn_head.py:
  - every LayerNorm has eps 1e-5; attention: softmax(q * d^-0.5 k^T + B) v, B the relative position bias of a
    window from a (2M-1)^2 x heads table, d = C / heads; qkv with bias.
  - odd blocks shift the windows by M // 2 (cyclic roll), with a 0 / -100 mask between tokens from different regions.
  - segmentation backbone: each block pads its normed tokens with zeros to a multiple of the window (M) and crops
    back; the mask is built for the padded size; windows never shrink. Patch embedding pads the image to a multiple
    of 4, patch merging pads odd sizes with zeros.
  - drop path on both residual branches, rates linear from 0 to 0.3 over all blocks.
  - init: Linear trunc-normal(0.02), bias 0; LayerNorm (1, 0); bias tables trunc-normal(0.02); patch conv: default.
  - UperNet: PPM (adaptive average pools 1, 2, 3, 6, 1x1 conv-BN-ReLU, upsampled) on stage 4 -> 3x3 bottleneck;
    1x1 laterals on stages 1-3; top-down sum; 3x3 FPN convs; upsample all to stride 4, concat, 3x3 conv-BN-ReLU.
  - every resize of UperNet and its aux loss has align_corners=False (layers.ALIGN_CORNERS["swin"]), as mmseg.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import ALIGN_CORNERS, ConvModule, DropPath, drop_path_rates, upsample, vit_init

AC = ALIGN_CORNERS["swin"]   # False: every resize of UperNet and its aux head, as mmseg

# Swin-T/S/B with 7 x 7 windows (ImageNet-1K 224 checkpoints), Swin-B/L with 12 x 12 (the 384 checkpoints).
SWIN_PRESETS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24), window=7),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=7),
    "swin_base_w12": dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=12),
    "swin_large_w12": dict(embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48), window=12),
}

# Swin-Transformer-Semantic-Segmentation's UperNet recipe (tests/testdata/transformer_recipes.json) as settings.Config
# values; the lr schedule is SegFormer's (poly power 1 to 0 after a linear warm-up from 1e-6 x lr). AdamW's betas are
# torch's default; drop path 0.3 is SwinTransformer's default; the decode head's dropout 0.1 is Config.dropout, the
# auxiliary head's FCNHead's. No lr multiplier; weight decay except no_weight_decay().
RECIPES = {
    "ade20k": dict(optimizer="adamw", lr=6e-5, weight_decay=0.01, head_lr_mult=1.0, lr_power=1.0, warmup_iters=1500,
                   iters=160000, batch_size=16, crop=(512, 512), scale=(0.5, 2.0), aux_loss_weight=0.4,
                   pipeline="mmseg", img_scale=(2048, 512), cat_max_ratio=0.75, eval_resize=(2048, 512),
                   eval_divisor=0, eval_crop=(0, 0), eval_stride=(0, 0)),
}
# Not in the official Swin seg repo (ADE20K only): the ADE20K recipe with SegFormer's Cityscapes crop, batch,
# pipeline and test (mmseg's cityscapes_1024x1024: img_scale 2048 x 1024, windows 1024, stride 768).
RECIPES["cityscapes"] = dict(RECIPES["ade20k"], batch_size=8, crop=(1024, 1024), img_scale=(2048, 1024),
                             eval_resize=(2048, 1024), eval_crop=(1024, 1024), eval_stride=(768, 768))


def no_weight_decay(name):
    """mmcv custom_keys (substring of the full name): relative_position_bias_table, absolute_pos_embed (unused
    here) and 'norm' (every LayerNorm) get no weight decay; UperNet's BatchNorms (`.bn.`) and biases keep it."""
    return any(key in name for key in ("relative_position_bias_table", "absolute_pos_embed", "norm"))


# ----------------------------------------------------------------------------- windows

def window_partition(x, ws):
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3)
    return x.reshape(-1, ws * ws, C)


def window_merge(windows, ws, H, W):
    """Inverse of window_partition: (B * nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).transpose(2, 3)
    return x.reshape(-1, H, W, C)


def relative_position_index(ws):
    """index[i, j] = (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1) for tokens i, j of a window, (dy, dx) = pos_i - pos_j:
    the row of the (2 ws - 1)^2 bias table. (ws*ws, ws*ws) int64."""
    pos = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, ws*ws)
    d = pos[:, :, None] - pos[:, None, :] + ws - 1                                                    # (2, N, N)
    return d[0] * (2 * ws - 1) + d[1]


def shift_mask(Hp, Wp, ws, shift, device=None):
    """Mask of the shifted windows on a padded Hp x Wp map (multiples of ws): (nW, ws*ws, ws*ws), 0 between tokens
    of one region, -100 across. After the roll by -shift, each axis has 3 bands: [0, n - ws), [n - ws, n - shift)
    and the wrapped-around [n - shift, n); a window never straddles the first boundary."""
    def bands(n):
        r = torch.arange(n, device=device)
        return (r >= n - ws).long() + (r >= n - shift).long()
    region = bands(Hp)[:, None] * 3 + bands(Wp)[None, :]                    # (Hp, Wp) region id
    region = window_partition(region[None, :, :, None], ws)[..., 0]         # (nW, ws*ws)
    across = region[:, :, None] != region[:, None, :]
    return torch.zeros(across.shape, device=device).masked_fill(across, -100.0)


# ----------------------------------------------------------------------------- Swin backbone

class WindowAttention(nn.Module):
    """W-MSA: Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V in each window (Swin Eq. 4)."""

    def __init__(self, dim, heads, ws):
        super().__init__()
        self.heads, self.ws, self.scale = heads, ws, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):                                            # x: (B * nW, N, C)
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).view(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)                           # (B * nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (N, N, heads)
        attn = attn + bias.permute(2, 0, 1)
        if mask is not None:                                                    # mask: (nW, N, N)
            nW = mask.shape[0]
            attn = (attn.view(-1, nW, self.heads, N, N) + mask[None, :, None]).view(Bw, self.heads, N, N)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin Eq. 3: z = x + DropPath((S)W-MSA(LN(x))); out = z + DropPath(MLP(LN(z))). Odd blocks shift by ws // 2."""

    def __init__(self, dim, heads, ws, shift, drop_path):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, ws)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, h, w, mask):                                           # x: (B, h*w, C)
        B, _, C = x.shape
        y = F.pad(self.norm1(x).view(B, h, w, C), (0, 0, 0, (-w) % self.ws, 0, (-h) % self.ws))  # zeros
        Hp, Wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, self.ws), mask if self.shift else None), self.ws, Hp, Wp)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w].reshape(B, h * w, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (x00, x10, x01, x11) -> LayerNorm(4C) -> Linear(4C, 2C, no bias); odd sizes are
    zero-padded. (B, h*w, C) -> (B, ceil(h/2)*ceil(w/2), 2C)."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)  # registered first: the checkpoint's key order
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, h, w):
        B, _, C = x.shape
        x = F.pad(x.view(B, h, w, C), (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.flatten(1, 2))), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Pad the image to a multiple of 4, 4x4 conv of stride 4, LayerNorm. (B, 3, H, W) -> (B, h*w, C), h, w."""

    def __init__(self, dim, patch=4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(F.pad(x, (0, (-x.shape[-1]) % self.patch, 0, (-x.shape[-2]) % self.patch)))
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Stage(nn.Module):
    """`depth` Swin blocks (even: regular windows, odd: shifted), then patch merging (not after the last stage)."""

    def __init__(self, dim, depth, heads, ws, rates, downsample):
        super().__init__()
        self.ws = ws
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, ws, 0 if j % 2 == 0 else ws // 2, rates[j])
                                    for j in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, h, w):
        mask = shift_mask(math.ceil(h / self.ws) * self.ws, math.ceil(w / self.ws) * self.ws, self.ws,
                          self.ws // 2, x.device)
        for block in self.blocks:
            x = block(x, h, w, mask)
        return x


class SwinTransformer(nn.Module):
    """Swin backbone; returns 4 LayerNormed maps (norm0..norm3) at strides 4, 8, 16, 32 with C * [1, 2, 4, 8] channels.
    Any input size: padded to the patch / window grid inside, cropped back."""
    family = "swin"   # models.family of every Swin preset; its resizing (UperNet): layers.ALIGN_CORNERS
    # checkpoint keys the segmentation backbone does not use (pattern -> why), reported by models.load_pretrained
    skipped_keys = {"head.*": "ImageNet classifier", "norm.*": "final LayerNorm of the classifier",
                    "*.attn_mask": "shift masks, recomputed for each input size",
                    "*.relative_position_index": "a function of the window size, recomputed"}
    # our keys that ImageNet checkpoints lack: they keep their init (weight 1, bias 0), and load_pretrained says so
    own_keys = {"norm[0-3].*": "per-stage output LayerNorms of the segmentation backbone"}

    def __init__(self, embed_dim, depths, heads, window, drop_path=0.3):
        super().__init__()
        self.window = window
        self.channels = [embed_dim * 2 ** i for i in range(4)]
        n = sum(depths)
        rates = drop_path_rates(n, drop_path)
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            Stage(self.channels[i], depths[i], heads[i], window, rates[sum(depths[:i]):sum(depths[:i + 1])], i < 3)
            for i in range(4))
        for i, c in enumerate(self.channels):
            setattr(self, f"norm{i}", nn.LayerNorm(c))
        self.apply(lambda m: vit_init(m, conv=False))

    def forward(self, x):
        x, h, w = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x, h, w)
            outs.append(getattr(self, f"norm{i}")(x).transpose(1, 2).reshape(x.shape[0], -1, h, w))
            if stage.downsample is not None:
                x, h, w = stage.downsample(x, h, w)
        return outs

    def check_checkpoint(self, sd):
        """A bias table of another window size cannot be loaded: name the file's window (None if it matches)."""
        for k, v in sd.items():
            if k.endswith("relative_position_bias_table") and v.shape[0] != (2 * self.window - 1) ** 2:
                ws = (math.isqrt(v.shape[0]) + 1) // 2
                return (f"{k} is for {ws}x{ws} windows but this model has {self.window}x{self.window} windows; "
                        f"choose the backbone preset with window {ws} (e.g. swin_base_w12 for *_window12_384.pth)")
        return None


# ----------------------------------------------------------------------------- UperNet

class FCNHead(nn.Module):
    """UperNet's auxiliary head on stage 3 (stride 16), training only: 3x3 conv-BN-ReLU (256) -> Dropout2d(0.1) ->
    1x1 conv to C class scores. Named as mmseg's FCNHead (convs.0, conv_seg); conv_seg ~ N(0, 0.01), bias 0."""

    def __init__(self, cin, num_classes, channels=256, dropout=0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cin, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class UperNet(nn.Module):
    """UperNet up to its classifier: (B, C_i, H/2^(i+2), W/2^(i+2)) x 4 -> (B, 512, H/4, W/4).

    aux_classes > 0 adds the auxiliary FCN head on stage aux_index (off by default); SegModel runs it in training
    and returns its scores as out["aux_scores"]; protoseg.seg_loss adds their weighted CE.
    """

    def __init__(self, in_channels, channels=512, pool_scales=(1, 2, 3, 6), aux_classes=0, aux_index=2):
        super().__init__()
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.out_channels, self.aux_index = channels, aux_index
        self.aux_head = FCNHead(in_channels[aux_index], aux_classes) if aux_classes else None

    def forward(self, xs):
        top = xs[-1]
        psp = [top] + [upsample(pool(top), top.shape[-2:], AC) for pool in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, xs)] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(len(laterals) - 1, 0, -1):                               # top-down: add the coarser level
            laterals[i - 1] = laterals[i - 1] + upsample(laterals[i], laterals[i - 1].shape[-2:], AC)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([outs[0]] + [upsample(x, size, AC) for x in outs[1:]], 1))

