"""Parity with the official code: outputs of the official networks on seeded weights (testdata/golden/, source in
testdata/README.md). Each model is filled by the same weight rule from its tensors' names, run on the stored input,
and every stored array is compared: rel = max|ours - golden| / max|golden| <= 1e-5 (the backbones 3e-6, strict
enough for a LayerNorm eps slip). Each test is named after the official function it checks.

  MiT-B0 + SegFormerHead        NVlabs/SegFormer @65fa8cf   mix_transformer.py, segformer_head.py
  Swin-T + UPerHead + FCNHead   Swin-Transformer-Semantic-Segmentation @87e6f90   swin_transformer.py, uper_head.py
  HRNet-W18-small-v2            HRNet-Semantic-Segmentation (HRNet-OCR) @0bbb288   seg_hrnet.py
  HRNet_W48_Proto               tfzhou/ProtoSeg @1c4a778   lib/models/nets/hrnet.py
"""
import functools
import json
import zlib
from pathlib import Path

import numpy as np
import torch

import checkpoints
from models import build_model

GOLDEN = Path(__file__).parent / "testdata" / "golden"
STRICT, RECOMMENDED = 3e-6, 1e-5
NOT_DRAWN = ("relative_position_index", "attn_mask")          # computed by the model


def seeded(name, shape):
    """The weight rule: z ~ N(0, 1) seeded by crc32(name), then a transform by shape / name (float64, one rounding)."""
    last = name.rsplit(".", 1)[-1]
    if last == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    z = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape).astype(np.float32).astype(np.float64)
    if last == "running_var":
        w = np.exp(0.2 * z)
    elif last == "running_mean":
        w = 0.1 * z
    elif len(shape) >= 2:                                          # conv / linear weights, bias tables, prototypes
        w = z / np.sqrt(np.float64(np.prod(shape[1:])))
    elif last == "weight":                                         # norm scales
        w = 1 + 0.1 * z
    else:                                                          # biases
        w = 0.1 * z
    return torch.from_numpy(w.astype(np.float32))


def fill(module, name=lambda key: key):
    """Every state-dict entry of `module` set by the weight rule, hashing name(key); returns the module in eval."""
    sd = {k: v if k.rsplit(".", 1)[-1] in NOT_DRAWN else seeded(name(k), tuple(v.shape))
          for k, v in module.state_dict().items()}
    module.load_state_dict(sd, strict=True)
    return module.eval()


def official_protoseg_name(key):
    """Project key -> official HRNet_W48_Proto key (inverse of checkpoints.official_to_project)."""
    return key.removeprefix("head.").removeprefix("trunk.")


@functools.cache
def golden(file):
    with np.load(GOLDEN / f"{file}.npz") as f:
        return {k: f[k] for k in f.files}


def assert_equal_official(ours, file, name, tol):
    ref = golden(file)[name]
    ours = ours.detach().numpy()
    assert ours.shape == ref.shape, f"{file}/{name}: shape {ours.shape} vs official {ref.shape}"
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= tol, f"{file}/{name}: rel {rel:.3g} > {tol:g}"


def x_of(file):
    return torch.from_numpy(golden(file)["input"])


# ----------------------------------------------------------------------------- MiT-B0 + SegFormerHead

@functools.cache
def mit_b0():
    torch.manual_seed(0)
    model = build_model("mit_b0", "softmax", 150)
    fill(model.backbone), fill(model.neck)
    with torch.no_grad():
        stages = model.backbone(x_of("mit_b0"))
        return stages, model.neck(stages)


def test_mit_b0_stages_equal_official_mix_transformer():
    """mix_transformer.py MixVisionTransformer.forward_features: the four stage maps."""
    for i, y in enumerate(mit_b0()[0]):
        assert_equal_official(y, "mit_b0", f"stage{i + 1}", STRICT)


def test_segformer_head_linear_fuse_equals_official():
    """segformer_head.py SegFormerHead up to linear_fuse (align_corners=False), on the official stages."""
    assert_equal_official(mit_b0()[1], "mit_b0", "decoder", RECOMMENDED)


# ----------------------------------------------------------------------------- Swin-T + UPerHead + FCNHead

@functools.cache
def swin_tiny():
    torch.manual_seed(0)
    model = build_model("swin_tiny", "softmax", 150, aux_head=True)
    fill(model.backbone), fill(model.neck)
    with torch.no_grad():
        outs = model.backbone(x_of("swin_tiny"))
        return outs, model.neck(outs), model.neck.aux_head.convs(outs[2])


def test_swin_tiny_stages_equal_official_swin_transformer():
    """swin_transformer.py SwinTransformer.forward: the four normed stage outputs (odd input: every pad path)."""
    for i, y in enumerate(swin_tiny()[0]):
        assert_equal_official(y, "swin_tiny", f"out{i}", STRICT)


def test_upernet_fpn_bottleneck_equals_official():
    """uper_head.py UPerHead (PPM of psp_head.py) up to fpn_bottleneck, align_corners=False."""
    assert_equal_official(swin_tiny()[1], "swin_tiny", "decoder", RECOMMENDED)


def test_fcn_aux_head_convs_equal_official():
    """fcn_head.py FCNHead.convs on stage 3 (in_index 2), before cls_seg."""
    assert_equal_official(swin_tiny()[2], "swin_tiny", "aux", STRICT)


# ----------------------------------------------------------------------------- HRNet-W18-small-v2

@functools.cache
def hrnet18_small_v2():
    torch.manual_seed(0)
    model = build_model("hrnet18_small_v2", "softmax", 19)
    fill(model.backbone)
    with torch.no_grad():
        branches = model.backbone(x_of("hrnet18_small_v2"))
        return branches, model.neck(branches)


def test_hrnet_w18_small_v2_branches_equal_official_stage4():
    """seg_hrnet.py HighResolutionNet: the list stage4 returns (fuse layers resize with align_corners=True)."""
    for i, y in enumerate(hrnet18_small_v2()[0]):
        assert_equal_official(y, "hrnet18_small_v2", f"branch{i}", STRICT)


def test_hrnet_neck_equals_official_last_layer_input():
    """seg_hrnet.py HighResolutionNet.forward: branch 0 with branches 1-3 resized and concatenated."""
    assert_equal_official(hrnet18_small_v2()[1], "hrnet18_small_v2", "neck", STRICT)


# ----------------------------------------------------------------------------- ProtoSeg HRNet_W48_Proto

@functools.cache
def protoseg_hrnet48():
    torch.manual_seed(0)
    model = fill(build_model("hrnet48", "protoseg", 19, class_layernorm=True, embed_layernorm=True,
                             normalize_width=True), official_protoseg_name)
    with torch.no_grad():
        feats = model.features(x_of("protoseg_hrnet48"))                 # one backbone pass for both arrays
        return model, model.head(feats)["scores"], model.head.embed(feats)


def official_release(model):
    """The filled model's weights in the official release layout: {"state_dict": {"module." + official key}},
    with proj_head.mlp2.* the same tensors as proj_head.proj.*."""
    sd = {official_protoseg_name(k): v for k, v in model.state_dict().items()}
    sd.update({k.replace("proj_head.proj.", "proj_head.mlp2."): v for k, v in sd.items()
               if k.startswith("proj_head.proj.")})
    return {"state_dict": {"module." + k: v for k, v in sd.items()}}


def test_protoseg_hrnet48_scores_and_embed_equal_official():
    """lib/models/nets/hrnet.py HRNet_W48_Proto.forward in eval: class scores (mask_norm of max over prototypes)
    and the l2-normalised pixel embeddings _c (proj_head -> feat_norm -> l2), channels last."""
    _, scores, embed = protoseg_hrnet48()
    assert_equal_official(scores, "protoseg_hrnet48", "scores", RECOMMENDED)
    assert_equal_official(embed, "protoseg_hrnet48", "embed", RECOMMENDED)


def test_official_release_file_read_by_load_model_gives_official_scores(tmp_path):
    """The same weights written as the official release (state_dict wrapper, module. prefix, mlp2 alias) and read
    through checkpoints.load_model give the official scores."""
    release = official_release(protoseg_hrnet48()[0])
    layout = json.loads((GOLDEN.parent / "protoseg_official_hrnet48_keys.json").read_text())["state_dict"]
    assert {k: list(v.shape) for k, v in release["state_dict"].items()} == {"module." + k: s for k, s in layout}
    path = tmp_path / "hrnet_w48_proto_latest.pth"
    torch.save(release, path)
    model, cfg = checkpoints.load_model(path)
    assert cfg["backbone"] == "hrnet48" and cfg["normalize_width"]
    x = x_of("protoseg_hrnet48")
    with torch.no_grad():
        assert_equal_official(model.head(model.features(x))["scores"], "protoseg_hrnet48", "scores", RECOMMENDED)
