"""swin.py: key/shape parity with microsoft/Swin-Transformer's releases, the shifted-window mask and relative position
index against slow direct constructions, strict loading, the recipe, and Swin-T + UperNet under each head (odd
sizes, eval determinism, one CPU training step with the auxiliary head). Large variants: meta device."""
import fnmatch
import json
import os

import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_pretrained
from conftest import recipe_facts_where_used
from models import SegModel, build_backbone, build_model
from protoseg import HEADS, seg_loss, update_prototypes
from swin import (RECIPES, SWIN_PRESETS, SwinBlock, SwinTransformer, no_weight_decay,
                  relative_position_index, shift_mask, window_merge, window_partition)

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")  # see testdata/README.md
FILES = {"swin_tiny": "swin_tiny", "swin_small": "swin_small", "swin_base": "swin_base_w7",
         "swin_base_w12": "swin_base", "swin_large_w12": "swin_large"}


def reference(preset):
    with open(os.path.join(REF, f"{FILES[preset]}_keys.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny():
    """Swin-T + UperNet (+ the auxiliary head) with a ProtoSeg head, built once for this file (2-core CPU budget)."""
    torch.manual_seed(0)
    return build_model("swin_tiny", "protoseg", 5, num_prototypes=2, aux_head=True)


@pytest.mark.parametrize("preset", list(SWIN_PRESETS))
def test_swin_keys_shapes_order_and_count_equal_released_checkpoint_plus_norm0_3(preset):
    ref = reference(preset)
    assert ref["config"]["window_size"] == SWIN_PRESETS[preset]["window"]
    with torch.device("meta"):
        net = build_backbone(preset)
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    used = [e for e in ref["state_dict"] if not any(fnmatch.fnmatchcase(e[0], p) for p in net.skipped_keys)]
    assert ours == used + ref["uper_seg_backbone"]["seg_backbone_only_keys_not_loaded"]
    used_keys = {k for k, _ in used}                                       # skipped = what the official seg
    skipped = [k for k, _ in ref["state_dict"] if k not in used_keys]       # backbone ignores + index buffers
    assert skipped == [k for k, _ in ref["state_dict"] if k.endswith("relative_position_index")
                       or k in ref["uper_seg_backbone"]["checkpoint_keys_ignored_by_seg_backbone"]]
    count = ref["uper_seg_backbone"]["seg_backbone_num_params_out_indices_0123"]
    assert sum(p.numel() for p in net.parameters()) == count


@pytest.mark.parametrize("ws", [7, 12])
def test_relative_position_index_matches_direct_construction(ws):
    tokens = [(y, x) for y in range(ws) for x in range(ws)]                # row-major in the window
    slow = torch.tensor([[(yi - yj + ws - 1) * (2 * ws - 1) + (xi - xj + ws - 1) for yj, xj in tokens]
                         for yi, xi in tokens])
    assert torch.equal(relative_position_index(ws), slow)
    assert slow.min() == 0 and slow.max() == (2 * ws - 1) ** 2 - 1                      # the whole table is used


@pytest.mark.parametrize("Hp,Wp,ws", [(14, 21, 7), (24, 12, 12), (7, 7, 7)])
def test_shift_mask_matches_direct_construction(Hp, Wp, ws):
    """-100 exactly between tokens of one shifted window that were not neighbours before the cyclic roll (one of
    them wrapped around the bottom / right edge and the other did not)."""
    s = ws // 2
    mask = shift_mask(Hp, Wp, ws, s)
    nW = (Hp // ws) * (Wp // ws)
    assert mask.shape == (nW, ws * ws, ws * ws)
    slow = torch.zeros(nW, ws * ws, ws * ws)
    for w in range(nW):
        top, left = (w // (Wp // ws)) * ws, (w % (Wp // ws)) * ws
        pos = [(top + i // ws, left + i % ws) for i in range(ws * ws)]
        for i, (yi, xi) in enumerate(pos):
            for j, (yj, xj) in enumerate(pos):
                wrapped = (yi >= Hp - s) != (yj >= Hp - s) or (xi >= Wp - s) != (xj >= Wp - s)
                slow[w, i, j] = -100.0 if wrapped else 0.0
    assert torch.equal(mask, slow)
    if Hp > ws and Wp > ws:
        assert (mask[0] == 0).all()                                         # a window away from the edges: unsplit


def test_window_partition_and_merge_are_inverse():
    x = torch.randn(2, 14, 21, 3)
    win = window_partition(x, 7)
    assert win.shape == (2 * 2 * 3, 49, 3) and torch.equal(win[1], x[0, :7, 7:14].reshape(49, 3))
    assert torch.equal(window_merge(win, 7, 14, 21), x)


def test_strict_load_of_synthesized_official_swin_tiny_file(tmp_path):
    torch.manual_seed(0)                                                   # the official format: {"model": sd}
    sd = {k: torch.randn(s) for k, s in reference("swin_tiny")["state_dict"]}
    path = str(tmp_path / "swin_tiny_patch4_window7_224.pth")
    torch.save({"model": sd}, path)
    net = build_backbone("swin_tiny")
    summary = load_pretrained(net, path)
    for part in ("ignored 21 unused keys", "2 head.* (ImageNet classifier)", "2 norm.* (final LayerNorm",
                 "5 *.attn_mask (shift masks", "12 *.relative_position_index", "kept the init of 8 keys norm[0-3].*"):
        assert part in summary, (part, summary)
    own = net.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in own.items() if not k.startswith("norm"))
    assert torch.equal(own["norm2.weight"], torch.ones(384)) and torch.equal(own["norm3.bias"], torch.zeros(768))
    del sd["layers.2.blocks.4.attn.qkv.bias"]
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"missing 1 \(layers.2.blocks.4.attn.qkv.bias\)"):
        load_pretrained(build_backbone("swin_tiny"), path)


def test_checkpoint_of_another_window_is_a_clear_error(tmp_path):
    ref = reference("swin_base_w12")                                        # 23 x 23 = (2 * 12 - 1)^2 table rows
    path = str(tmp_path / "swin_base_patch4_window12_384.pth")
    torch.save({"model": {k: torch.zeros(s) for k, s in ref["state_dict"] if k.endswith("bias_table")}}, path)
    net = SwinTransformer(embed_dim=8, depths=(2, 2, 2, 2), heads=(1, 1, 2, 2), window=7)
    with pytest.raises(ValueError, match="is for 12x12 windows but this model has 7x7 windows"):
        load_pretrained(net, path)


@pytest.mark.parametrize("head", list(HEADS))
def test_each_head_builds_and_segments_97x131_to_97x131_scores(tiny, head):
    with torch.device("meta"):
        built = build_model("swin_tiny", head, 5)
    assert built.head.trunk.cls_head[0].in_channels == 512                 # the head sits where conv_seg was
    torch.manual_seed(0)
    model = SegModel(tiny.backbone, tiny.neck, HEADS[head](512, 5)).eval()  # same backbone + UperNet, other head
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131))["scores"].shape == (1, 5, 97, 131)


def test_backbone_pads_to_windows_and_crops_back():
    torch.manual_seed(0)
    net = SwinTransformer(embed_dim=8, depths=(2, 2, 2, 2), heads=(1, 1, 2, 2), window=7).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 97, 131))                              # 25 x 33 tokens: not multiples of 7
    assert [tuple(o.shape[1:]) for o in outs] == [(8, 25, 33), (16, 13, 17), (32, 7, 9), (64, 4, 5)]


def test_eval_mode_is_deterministic_and_the_auxiliary_head_is_off_by_default(tiny):
    model = tiny.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert "aux_scores" not in model(x) and torch.equal(model(x)["scores"], model(x)["scores"])   # eval: no aux
    with torch.device("meta"):
        assert build_model("swin_tiny", "softmax", 5).neck.aux_head is None


def test_one_cpu_training_step_with_the_auxiliary_fcn_head(tiny):
    model = tiny.train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    watched = ("backbone.patch_embed.proj.weight", "backbone.layers.3.blocks.1.attn.relative_position_bias_table",
               "neck.fpn_bottleneck.conv.weight", "neck.psp_modules.3.1.conv.weight", "neck.aux_head.conv_seg.weight",
               "head.prototypes")
    before = {k: v.clone() for k, v in model.state_dict().items() if k in watched}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)                    # AdamW over 60M parameters: slow here
    torch.manual_seed(1)
    out = model(images, labels)
    weight = RECIPES["ade20k"]["aux_loss_weight"]
    loss, terms = seg_loss(out, labels, aux_weight=weight)
    without_aux, _ = seg_loss({k: v for k, v in out.items() if k != "aux_scores"}, labels)
    torch.manual_seed(1)                                                    # same dropout: the aux head by hand
    feats = model.backbone(images)
    model.head(model.neck(feats), labels)
    aux = F.interpolate(model.neck.aux_head(feats[2]), size=(64, 64), mode="bilinear", align_corners=False)
    assert out["aux_scores"].shape == (2, 5, 64, 64)                        # stage 3 (stride 16), resized as mmseg
    torch.testing.assert_close(terms["aux"], F.cross_entropy(aux, labels))
    torch.testing.assert_close(loss, without_aux + weight * terms["aux"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.head.prototypes.copy_(update_prototypes(model.head.prototypes, out["embed"], out["update_target"], 0.9))
    assert torch.isfinite(loss)
    after = model.state_dict()
    for k in watched:                                                       # prototypes: moved by Eq. 14
        assert not torch.equal(before[k], after[k]), k
    assert model.eval()(images)["scores"].shape == (2, 5, 64, 64)


def test_recipe_equals_reference_and_no_decay_on_norms_and_bias_tables():
    ref = json.load(open(os.path.join(REF, "transformer_recipes.json")))["swin_upernet_ade20k"]
    r, opt, sched = RECIPES["ade20k"], ref["optimizer"], ref["lr_schedule"]
    assert (r["lr"], r["weight_decay"]) == (opt["lr"], opt["weight_decay"])
    assert (r["warmup_iters"], r["lr_power"]) == (sched["warmup_iters"], sched["power"])
    assert (r["iters"], r["batch_size"], list(r["crop"])) == (ref["runner"]["max_iters"], ref["batch"]["total"],
                                                              ref["data"]["crop_size"])
    assert r["aux_loss_weight"] == ref["auxiliary_head"]["loss_decode"]["loss_weight"]
    assert RECIPES["cityscapes"]["crop"] == (1024, 1024)
    cfg, net = recipe_facts_where_used("ade20k", "swin_tiny", ref)                # where the other facts live
    assert [m.p for m in net.head.modules() if isinstance(m, torch.nn.Dropout2d)] == [ref["decode_head"]["dropout_ratio"]]
    assert net.neck.aux_head.dropout.p == ref["auxiliary_head"]["dropout_ratio"]
    with torch.device("meta"):
        names = [k for k, _ in build_model("swin_tiny", "softmax", 5, aux_head=True).named_parameters()]
    no_decay = {k for k in names if no_weight_decay(k)}
    tables = {k for k in names if k.endswith("relative_position_bias_table")}
    layernorms = {k for k in names if k.startswith("backbone.") and "norm" in k}
    assert no_decay == tables | layernorms and len(tables) == 12
    assert "backbone.norm0.weight" in no_decay and "backbone.layers.0.downsample.norm.bias" in no_decay
    assert not any(k.startswith(("neck.", "head.")) for k in no_decay)     # UperNet BNs (`.bn.`) keep weight decay


def test_shifted_block_equals_direct_attention_within_shifted_windows():
    """SW-MSA by roll + window partition + mask equals attention computed token by token: each token attends to the
    tokens of its shifted window that were its neighbours before the roll, with the bias of their offset."""
    torch.manual_seed(0)
    H = W = 6
    ws, s, dim, heads = 3, 1, 4, 2
    block = SwinBlock(dim, heads, ws, s, drop_path=0.0).eval()
    torch.nn.init.zeros_(block.mlp.fc2.weight)                             # out = x + attention(norm1(x))
    torch.nn.init.zeros_(block.mlp.fc2.bias)
    x = torch.randn(1, H * W, dim)
    with torch.no_grad():
        ours = block(x, H, W, shift_mask(H, W, ws, s)) - x
        a = block.attn
        q, k, v = a.qkv(block.norm1(x))[0].view(H * W, 3, heads, dim // heads).unbind(1)
        rolled = [((i // W - s) % H, (i % W - s) % W) for i in range(H * W)]   # position after the roll by -s
        direct = torch.zeros(H * W, dim)
        for p, (yp, xp) in enumerate(rolled):
            keys = [t for t, (yt, xt) in enumerate(rolled)
                    if (yt // ws, xt // ws) == (yp // ws, xp // ws)                           # same window
                    and (yt >= H - s) == (yp >= H - s) and (xt >= W - s) == (xp >= W - s)]    # same region
            rel = [(yp - rolled[t][0] + ws - 1) * (2 * ws - 1) + xp - rolled[t][1] + ws - 1 for t in keys]
            logits = (q[p] * a.scale)[:, None, :].mul(k[keys].transpose(0, 1)).sum(-1)        # (heads, keys)
            logits = logits + a.relative_position_bias_table[rel].T
            out = (logits.softmax(-1)[:, :, None] * v[keys].transpose(0, 1)).sum(1)          # (heads, d)
            direct[p] = a.proj(out.reshape(dim))
    assert torch.allclose(ours[0], direct, atol=1e-6)
