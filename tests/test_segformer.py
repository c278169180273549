"""segformer.py: key/shape parity with NVlabs' mit_bN.pth, strict loading, the recipe, and MiT-B0 + the all-MLP
decoder under each head (odd sizes, eval determinism, one CPU training step). Large variants: meta device."""
import json
import os

import pytest
import torch

import settings
from checkpoints import load_pretrained
from conftest import recipe_facts_where_used
from models import SegModel, build_backbone, build_model
from protoseg import HEADS, seg_loss, update_prototypes
from segformer import MIT_PRESETS, RECIPES, no_weight_decay
import train

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")  # see testdata/README.md


def reference(name):
    with open(os.path.join(REF, f"{name}_keys.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def b0():
    """MiT-B0 + the all-MLP decoder with a softmax head, built once for this file; tests swap the head."""
    torch.manual_seed(0)
    return build_model("mit_b0", "softmax", 5)


def with_head(model, head):
    torch.manual_seed(0)
    kw = dict(num_prototypes=2) if head == "protoseg" else {}
    return SegModel(model.backbone, model.neck, HEADS[head](model.neck.out_channels, 5, **kw))


@pytest.mark.parametrize("name", list(MIT_PRESETS))
def test_mit_keys_shapes_order_and_count_equal_released_checkpoint(name):
    ref = reference(name)
    with torch.device("meta"):
        net = build_backbone(name)
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert ours == [e for e in ref["state_dict"] if not e[0].startswith("head.")]    # only the classifier differs
    assert sum(p.numel() for p in net.parameters()) == ref["num_params_without_head"]


def test_mit_layernorm_eps_as_official():
    net = build_backbone("mit_b0")
    eps = {k: m.eps for k, m in net.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for k, e in eps.items():                              # norm_layer(eps=1e-6) vs plain nn.LayerNorm
        plain = k.startswith("patch_embed") or k.endswith("attn.norm")
        assert e == (1e-5 if plain else 1e-6), k
    assert eps["norm4"] == 1e-6 and eps["block1.0.norm1"] == 1e-6 and eps["block1.0.attn.norm"] == 1e-5


def test_mit_drop_path_linear_from_0_to_0p1_and_spatial_reduction_8_4_2_1():
    net = build_backbone("mit_b0")
    rates = [b.drop_path.p for i in range(1, 5) for b in getattr(net, f"block{i}")]
    assert rates[0] == 0 and abs(rates[-1] - 0.1) < 1e-12 and rates == sorted(rates) and len(rates) == 8
    assert [getattr(net, f"block{i}")[0].attn.sr.stride[0] for i in range(1, 4)] == [8, 4, 2]
    assert net.block4[0].attn.sr is None


@pytest.mark.parametrize("name,dim", [("mit_b0", 256), ("mit_b1", 256), ("mit_b2", 768), ("mit_b5", 768)])
def test_decoder_width_256_for_b0_b1_and_768_otherwise(name, dim):
    with torch.device("meta"):
        model = build_model(name, "softmax", 150)
    assert model.neck.out_channels == dim
    assert model.neck.linear_fuse.conv.weight.shape == (dim, 4 * dim, 1, 1)
    assert model.neck.linear_c4.proj.weight.shape == (dim, MIT_PRESETS[name]["dims"][3])
    assert model.head.trunk.cls_head[0].in_channels == dim               # the head sits where linear_pred was


def test_strict_load_of_synthesized_official_mit_b0_file(tmp_path):
    ref = reference("mit_b0")
    torch.manual_seed(0)
    sd = {k: torch.randn(s) for k, s in ref["state_dict"]}                # as released: a plain state dict
    path = str(tmp_path / "mit_b0.pth")
    torch.save(sd, path)
    net = build_backbone("mit_b0")
    summary = load_pretrained(net, path)
    assert "loaded 176 tensors" in summary and "ignored 2" in summary and "head.* (ImageNet classifier" in summary
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    del sd["block2.1.mlp.dwconv.dwconv.weight"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="block2.1.mlp.dwconv.dwconv.weight"):
        load_pretrained(build_backbone("mit_b0"), path)


@pytest.mark.parametrize("head", list(HEADS))
def test_each_head_builds_and_segments_97x131_to_97x131_scores(b0, head):
    with torch.device("meta"):
        assert type(build_model("mit_b0", head, 5).head) is HEADS[head]
    model = with_head(b0, head).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131))["scores"].shape == (1, 5, 97, 131)


def test_eval_mode_is_deterministic_and_drop_path_only_trains(b0):
    model = b0.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["scores"], model(x)["scores"])
        block = model.backbone.block4[1]
        tokens = torch.randn(2, 4, 256)
        assert torch.equal(block.drop_path(tokens), tokens)
        block.drop_path.train()
        kept = block.drop_path(tokens)                                     # p = 0.1: each sample 0 or x / 0.9
        assert all(torch.equal(k, torch.zeros_like(k)) or torch.allclose(k, t / 0.9) for k, t in zip(kept, tokens))


@pytest.mark.parametrize("head", list(HEADS))
def test_one_cpu_training_step_moves_encoder_decoder_and_head(b0, head):
    model = with_head(b0, head).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(images, labels)
    loss, terms = seg_loss(out, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if head == "protoseg":
        model.head.prototypes.copy_(update_prototypes(model.head.prototypes, out["embed"], out["update_target"], 0.9))
    assert torch.isfinite(loss) and ("ppc" in terms) == (head == "protoseg")
    after = model.state_dict()
    for k in ("backbone.patch_embed1.proj.weight", "backbone.block4.1.mlp.fc2.weight",
              "neck.linear_c1.proj.weight", "neck.linear_fuse.conv.weight"):
        assert not torch.equal(before[k], after[k]), k
    if head == "protoseg":                                                 # Eq. 14 moved the prototypes
        assert not torch.equal(before["head.prototypes"], after["head.prototypes"])


def test_recipe_equals_reference_and_no_decay_on_encoder_norms_only():
    ref = json.load(open(os.path.join(REF, "transformer_recipes.json")))["segformer"]
    opt, sched = ref["optimizer"], ref["lr_schedule"]
    for dataset, key in (("ade20k", "ADE20K"), ("cityscapes", "Cityscapes")):
        r = RECIPES[dataset]
        assert (r["lr"], r["weight_decay"]) == (opt["lr"], opt["weight_decay"])
        assert r["head_lr_mult"] == opt["paramwise_cfg.custom_keys"]["head"]["lr_mult"]
        assert (r["warmup_iters"], r["lr_power"]) == (sched["warmup_iters"], sched["power"])
        assert r["iters"] == ref["runner"]["max_iters"] and r["batch_size"] == ref["batch"]["total"][key]
        cfg, net = recipe_facts_where_used(dataset, "mit_b0", ref)               # where the other facts live
        drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout2d)]
        assert drops == [ref["decode_head"]["dropout_ratio"]]                # the one before the classifier
    assert list(RECIPES["ade20k"]["crop"]) == ref["data"]["ADE20K"]["crop_size"]["b0-b4"]
    assert list(RECIPES["cityscapes"]["crop"]) == ref["data"]["Cityscapes_1024x1024"]["crop_size"]
    with torch.device("meta"):
        names = [k for k, _ in build_model("mit_b0", "protoseg", 5, class_layernorm=True).named_parameters()]
    no_decay = {k for k in names if no_weight_decay(k)}
    assert no_decay == {k for k in names if k.startswith("backbone.") and ".norm" in "." + k.split("backbone.")[1]}
    assert "backbone.block1.0.attn.norm.weight" in no_decay and "backbone.norm4.bias" in no_decay
    assert "neck.linear_fuse.bn.weight" not in no_decay and "head.mask_norm.weight" not in no_decay
    cfg, _ = settings.parse_args(["--dataset", "ade20k", "--backbone", "mit_b0"])   # the optimiser train.py builds
    with torch.device("meta"):
        net = build_model("mit_b0", "protoseg", 5)
    group = {id(p): g for g in train.make_optimizer(cfg, net).param_groups for p in g["params"]}
    for k, p in net.named_parameters():
        assert group[id(p)]["lr_mult"] == (10 if k.startswith(("neck.", "head.")) else 1), k      # 'head' lr x10
        assert (group[id(p)]["weight_decay"] == 0) == (k in no_decay), k
