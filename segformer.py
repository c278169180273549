"""SegFormer (Xie et al., NeurIPS 2021): the Mix Transformer encoders MiT-B0...B5 and the all-MLP decoder.

Parameter names follow NVlabs/SegFormer: the encoder's state dict is the released ImageNet `mit_bN.pth` minus its
`head.*` classifier, and the decoder's modules are named as `decode_head.*` in the released segmentation checkpoints
(linear_c1..4.proj, linear_fuse.conv/bn) without the classifier (dropout, linear_pred): in this project the ProtoSeg,
softmax or query head takes the decoder's fused features where linear_pred was.

Facts read from mix_transformer.py and segformer_head.py (NVlabs/SegFormer):
  - LayerNorm eps: 1e-6 for blockN.*.norm1/norm2 and normN; 1e-5 (plain nn.LayerNorm) for patch_embedN.norm and
    the spatial-reduction blockN.*.attn.norm.
  - attention: softmax(q k^T * d^-0.5) v, d = C / heads; k, v from the tokens reduced by a stride-R conv (R = 8/4/2/1).
  - Mix-FFN: fc1 -> 3x3 depth-wise conv (bias) -> GELU -> fc2. Pre-norm residuals; drop path on both branches,
    rates linear in the block index from 0 to 0.1 over all blocks.
  - init: Linear trunc-normal(0.02), bias 0; conv normal(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups, bias 0.
  - decoder: Linear(C_i, E) per stage, resize to stride 4, concat in the order c4, c3, c2, c1, 1x1 conv (no bias)
    -> BN -> ReLU. E = 256 (B0, B1) or 768 (B2-B5).
  - every resize of this family (decoder, output to the image, test-time rescale) has align_corners=False
    (layers.ALIGN_CORNERS["mit"]), as mmseg's SegFormerHead.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import ALIGN_CORNERS, ConvModule, DropPath, drop_path_rates, upsample, vit_init

# Per stage: widths, depths. Shared by all: heads 1/2/5/8, spatial reduction 8/4/2/1, MLP ratio 4, patch
# embeddings 7x7/4 then 3x3/2, drop path 0.1. `decoder_dim` is the all-MLP decoder's E.
MIT_PRESETS = {
    "mit_b0": dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "mit_b1": dict(dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_dim=256),
    "mit_b2": dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_dim=768),
    "mit_b3": dict(dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_dim=768),
    "mit_b4": dict(dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_dim=768),
    "mit_b5": dict(dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_dim=768),
}

# Training recipes of NVlabs/SegFormer's local_configs (tests/testdata/transformer_recipes.json), as settings.Config values
# (settings.preset lays them over the dataset's preset). Poly schedule: lr = base * (1 - it / iters) ** power (to 0,
# the recipe's min_lr), times 1 - (1 - it / warmup_iters) * (1 - 1e-6) during warm-up (train.learning_rate).
# AdamW's betas (0.9, 0.999) are torch's default; drop path 0.1 is MiT's (MixTransformer); the decoder's dropout
# 0.1 is Config.dropout. Weight decay everywhere except the names no_weight_decay() picks (biases keep it); lr x10
# on the decoder and head (train.make_optimizer).
_COMMON = dict(optimizer="adamw", lr=6e-5, weight_decay=0.01, head_lr_mult=10.0, lr_power=1.0, warmup_iters=1500,
               iters=160000)
# The pipelines (mmseg 0.x, transforms.py): train Resize(img_scale, ratio 0.5-2) -> RandomCrop(cat_max_ratio 0.75)
# -> flip -> PhotoMetricDistortion; test ADE20K: AlignedResize(2048 x 512, keep ratio, size divisor 32), whole
# image; Cityscapes: Resize(2048 x 1024, keep ratio), 1024 x 1024 windows, stride 768.
RECIPES = {
    # 8 GPUs x 2; B5 uses 640 x 640 crops and img_scale 2048 x 640 (MIT_B5)
    "ade20k": dict(_COMMON, batch_size=16, crop=(512, 512), scale=(0.5, 2.0), pipeline="mmseg",
                   img_scale=(2048, 512), cat_max_ratio=0.75, eval_resize=(2048, 512), eval_divisor=32,
                   eval_crop=(0, 0), eval_stride=(0, 0)),
    # 8 GPUs x 1
    "cityscapes": dict(_COMMON, batch_size=8, crop=(1024, 1024), scale=(0.5, 2.0), pipeline="mmseg",
                       img_scale=(2048, 1024), cat_max_ratio=0.75, eval_resize=(2048, 1024), eval_divisor=0,
                       eval_crop=(1024, 1024), eval_stride=(768, 768)),
}
MIT_B5 = {"ade20k": dict(crop=(640, 640), img_scale=(2048, 640), eval_resize=(2048, 640))}


def no_weight_decay(name):
    """mmcv custom_keys {'norm': decay 0, 'head': lr x10}, 'head' winning ties: every encoder LayerNorm (its name
    holds 'norm') has no weight decay; decoder and head parameters (our `neck.*`, `head.*`) keep it."""
    return "norm" in name and not name.startswith(("neck.", "head."))


# ----------------------------------------------------------------------------- MiT encoder

class OverlapPatchEmbed(nn.Module):
    """Overlapping patches: a k x k conv of stride s < k (padding k // 2), then LayerNorm (eps 1e-5).
    (B, Cin, H, W) -> tokens (B, h*w, C), h, w."""

    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from the tokens reduced R x R by a stride-R conv
    (SegFormer Eq. 2: N -> N / R^2), then LayerNorm (eps 1e-5). q: (B, heads, N, d), k, v: (B, heads, N/R^2, d)."""

    def __init__(self, dim, heads, sr_ratio):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    def forward(self, x, h, w):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        if self.sr is not None:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).view(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)           # (B, heads, N, N / R^2)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DWConv(nn.Module):
    """3x3 depth-wise conv on the token grid (the Mix-FFN's positional information); named `dwconv.dwconv`."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """SegFormer Eq. 3: x_out = MLP(GELU(Conv3x3(MLP(x_in)))) + x_in (the residual is the block's)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = nn.Linear(dim, hidden), DWConv(hidden), nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class MiTBlock(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x))); both LayerNorms eps 1e-6."""

    def __init__(self, dim, heads, sr_ratio, mlp_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """MiT encoder; returns 4 maps at strides 4, 8, 16, 32 with `dims` channels. Any input size (the convs are
    padded; the reduction conv floors, as the official code), inputs of at least 32 x 32."""
    family = "mit"   # models.family of every MiT preset; its resizing: layers.ALIGN_CORNERS
    # checkpoint keys the encoder does not use (pattern -> why), reported by models.load_pretrained
    skipped_keys = {"head.*": "ImageNet classifier of mit_bN.pth"}

    def __init__(self, dims, depths, heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratio=4, drop_path=0.1,
                 decoder_dim=None):
        super().__init__()
        self.channels, self.decoder_dim = list(dims), decoder_dim
        n = sum(depths)
        rates = drop_path_rates(n, drop_path)
        for i in range(4):  # registration order = the checkpoint's key order
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(
                3 if i == 0 else dims[i - 1], dims[i], 7 if i == 0 else 3, 4 if i == 0 else 2))
        for i in range(4):
            first = sum(depths[:i])
            setattr(self, f"block{i + 1}", nn.ModuleList(
                MiTBlock(dims[i], heads[i], sr_ratios[i], mlp_ratio, rates[first + j]) for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=1e-6))
        self.apply(vit_init)

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            outs.append(x)                                                     # (B, C_i, H / 2^(i+1), W / 2^(i+1))
        return outs


# ----------------------------------------------------------------------------- all-MLP decoder

class MLP(nn.Module):
    """Linear(C_i, E) on every pixel; named `proj`. (B, C_i, h, w) -> (B, E, h, w)."""

    def __init__(self, cin, dim):
        super().__init__()
        self.proj = nn.Linear(cin, dim)

    def forward(self, x):
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MLPDecoder(nn.Module):
    """SegFormer's all-MLP decoder up to its classifier (SegFormer Eq. 4 without the last Linear):
    F_i = Upsample(Linear(C_i, E)(F_i)), F = ReLU(BN(Conv1x1(Concat(F_4, F_3, F_2, F_1)))) -> (B, E, H/4, W/4)."""

    def __init__(self, channels, dim):
        super().__init__()
        for i, c in enumerate(channels):
            setattr(self, f"linear_c{i + 1}", MLP(c, dim))
        self.linear_fuse = ConvModule(4 * dim, dim, 1)
        self.out_channels = dim

    def forward(self, xs):
        size = xs[0].shape[-2:]
        ys = [getattr(self, f"linear_c{i + 1}")(x) for i, x in enumerate(xs)]
        ys = [ys[0]] + [upsample(y, size, ALIGN_CORNERS["mit"]) for y in ys[1:]]
        return self.linear_fuse(torch.cat(ys[::-1], dim=1))                   # concat order c4, c3, c2, c1
