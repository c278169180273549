"""checkpoints.py: the official ProtoSeg release (key mapping onto the model, its forward transcribed), strict loading
of ImageNet backbones (load_pretrained), the health check and save_checkpoint's refusal of a diverged model, and a
file that is not a checkpoint, or one without content, as one clear error."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import models
import settings
import train
from checkpoints import load_pretrained
from conftest import small_hrnet, tiny_checkpoint, user_error
from models import build_backbone, build_model, model_from_config

REF = Path(__file__).parent / "testdata"


def save(tmp_path, obj, name="w.pth"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------- the official checkpoint

def official_state(generator, shapes):
    """Random tensors in the official layout (running variances positive); mlp2 aliases proj, as there."""
    sd = {}
    for key, shape in shapes:
        if key.startswith("proj_head.mlp2."):
            sd[key] = sd[key.replace("mlp2", "proj")]
        elif key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=generator) * (0.05 if len(shape) > 1 else 0.5)
    return sd


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    shapes = json.loads((REF / "protoseg_official_hrnet48_keys.json").read_text())["state_dict"]
    sd = official_state(torch.Generator().manual_seed(0), shapes)
    path = tmp_path_factory.mktemp("official") / "hrnet_w48_proto_latest.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "config_dict": {"network": "hrnet_w48_proto"},
                "iters": 80000}, path)
    return path, sd


def test_official_keys_map_onto_the_model_exactly():
    shapes = json.loads((REF / "protoseg_official_hrnet48_keys.json").read_text())["state_dict"]
    with torch.device("meta"):
        sd = {k: torch.empty(s) for k, s in shapes}
        converted, cfg = checkpoints.official_to_project(sd)
        model = model_from_config(cfg)
    assert cfg["backbone"] == "hrnet48" and (cfg["num_classes"], cfg["num_prototypes"]) == (19, 10)
    ours = model.state_dict()
    assert set(converted) == set(ours) and len(converted) == 1850 - 4            # the 4 mlp2 aliases dropped
    assert all(converted[k].shape == ours[k].shape for k in ours)


def official_head_forward(sd, feats):
    """The official HRNet_W48_Proto head, transcribed: cls_head, proj_head ending in l2 over dim -1 of (B, D, H, W)
    (the width), (b h w) d, feat_norm, l2, max cosine over prototypes, mask_norm."""
    x = F.conv2d(feats, sd["cls_head.0.weight"], sd["cls_head.0.bias"], padding=1)
    x = F.relu(F.batch_norm(x, sd["cls_head.1.0.running_mean"], sd["cls_head.1.0.running_var"],
                            sd["cls_head.1.0.weight"], sd["cls_head.1.0.bias"], training=False, eps=1e-5))
    x = F.relu(F.conv2d(x, sd["proj_head.proj.0.weight"], sd["proj_head.proj.0.bias"]))
    x = F.conv2d(x, sd["proj_head.proj.2.weight"], sd["proj_head.proj.2.bias"])
    x = F.normalize(x, p=2, dim=-1)
    B, D, H, W = x.shape
    c = x.permute(0, 2, 3, 1).reshape(-1, D)
    c = F.normalize(F.layer_norm(c, (D,), sd["feat_norm.weight"], sd["feat_norm.bias"]), dim=-1)
    masks = torch.einsum("nd,kmd->nmk", c, F.normalize(sd["prototypes"], dim=-1))
    seg = masks.amax(1)
    seg = F.layer_norm(seg, (seg.shape[1],), sd["mask_norm.weight"], sd["mask_norm.bias"])
    return seg.reshape(B, H, W, -1).permute(0, 3, 1, 2)


def test_official_checkpoint_computes_what_the_official_model_computes(official_file):
    path, sd = official_file
    model, cfg = checkpoints.load_model(path)
    assert cfg["normalize_width"] and cfg["class_layernorm"] and cfg["embed_layernorm"]
    feats = torch.randn(1, 720, 12, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, official = model.head(feats)["scores"], official_head_forward(sd, feats)
        torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-4)
        model.head.normalize_width = False                       # l2 over D instead: the answer changes
        assert (model.head(feats)["scores"].argmax(1) != official.argmax(1)).float().mean() > 0.05


# ----------------------------------------------------------------------------- strict loading (load_pretrained)

def test_saved_backbone_reloads_to_identical_outputs(tmp_path):
    src, dst = small_hrnet(0), small_hrnet(1)
    for m in src.modules():                                           # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = save(tmp_path, src.state_dict())
    summary = load_pretrained(dst, path)
    assert "loaded 864" in summary
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src(x), dst(x)))


def test_load_accepts_state_dict_wrapper_and_module_prefix(tmp_path):
    src, dst = small_hrnet(0), small_hrnet(1)
    path = save(tmp_path, {"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3})
    load_pretrained(dst, path)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_load_accepts_backbone_prefix_and_ignores_head_of_full_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("hrnet18_small_v2", head="softmax", num_classes=3)
    dst = small_hrnet(1)
    summary = load_pretrained(dst, save(tmp_path, {"model": model.state_dict()}))
    assert "head" in summary
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(), dst.state_dict().values()))


def test_load_works_without_num_batches_tracked(tmp_path):
    src, dst = small_hrnet(0), small_hrnet(1)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 864 - 144
    load_pretrained(dst, save(tmp_path, sd))
    assert torch.equal(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_load_ignores_only_the_imagenet_keys_listed_in_reference(tmp_path):
    ref = json.loads((REF / "hrnet_w18_small_v2_keys.json").read_text())
    extra = ref["consumed_from_imagenet_checkpoint"]["checkpoint_only_keys_ignored"]
    src, dst = small_hrnet(0), small_hrnet(1)
    sd = dict(src.state_dict(), **{k: torch.zeros(s) for k, s in extra})
    summary = load_pretrained(dst, save(tmp_path, sd))
    assert f"ignored {len(extra)}" in summary
    assert all(p in summary for p in ("incre_modules", "downsamp_modules", "final_layer", "classifier"))


def test_load_resnet_drops_torchvision_fc(tmp_path):
    torch.manual_seed(0)
    src, dst = build_backbone("resnet18"), build_backbone("resnet18")
    sd = dict(src.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    assert "ignored 2" in load_pretrained(dst, save(tmp_path, sd))
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_load_misnamed_key_fails_naming_file_and_key(tmp_path):
    sd = small_hrnet(0).state_dict()
    sd["stage3.0.branches.0.0.conv1.weigth"] = sd.pop("stage3.0.branches.0.0.conv1.weight")
    path = save(tmp_path, sd)
    with pytest.raises(ValueError) as err:
        load_pretrained(small_hrnet(1), path)
    msg = str(err.value)
    assert path in msg and "stage3.0.branches.0.0.conv1.weigth" in msg and "stage3.0.branches.0.0.conv1.weight" in msg


def test_load_shape_mismatch_fails(tmp_path):
    sd = small_hrnet(0).state_dict()                                  # W32 weights into W18-small-v2: same names
    wide = {k: v for k, v in build_backbone("hrnet32").state_dict().items() if k in sd}
    with pytest.raises(ValueError, match=r"transition1\.0\.0\.weight \(32, 256, 3, 3\) vs ours \(18, 256, 3, 3\)"):
        load_pretrained(small_hrnet(1), save(tmp_path, wide))


# ----------------------------------------------------------------------------- writing: health, divergence

def test_a_diverged_model_is_never_checkpointed(tmp_path, capsys):
    cfg = settings.Config(out_dir=str(tmp_path))
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(enabled=False)
    assert checkpoints.save_checkpoint(cfg, net, opt, scaler, 5, 0) == 5
    before = (tmp_path / "last.pt").read_bytes()
    for bad in (float("nan"), 1.9e22):
        with torch.no_grad():
            net.weight[0, 0] = bad
        with pytest.raises(SystemExit):
            checkpoints.save_checkpoint(cfg, net, opt, scaler, 6, 5)
        err = capsys.readouterr().err
        assert "diverged by iteration 6: weight" in err and "last good checkpoint, after iteration 5" in err
        assert (tmp_path / "last.pt").read_bytes() == before


def test_health_check_looks_at_buffers_too():
    """checkpoints.unhealthy: prototypes and BatchNorm running statistics are buffers, not parameters."""
    net = models.model_from_config(dataclasses.replace(settings.Config(), backbone="hrnet_tiny", num_classes=3,
                                                      num_prototypes=2))
    assert checkpoints.unhealthy(net) is None
    for name, bad in (("head.prototypes", float("nan")), ("backbone.bn1.running_var", float("inf")),
                      ("backbone.bn1.running_mean", 1e30)):
        t = dict(net.named_buffers())[name]
        keep = t.clone()
        t.view(-1)[0] = bad
        assert checkpoints.unhealthy(net).startswith(name)
        t.copy_(keep)


# ----------------------------------------------------------------------------- reading: one clear error

def test_a_checkpoint_for_other_classes_or_a_plain_state_dict_is_one_clear_error(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "last.pt", it=5, dataset="cityscapes", backbone="hrnet_tiny", num_classes=19,
                           num_prototypes=3, out_dir=str(tmp_path / "run"))
    with pytest.raises(SystemExit):
        train.main(["--eval-only", "--resume", str(path), "--dataset", "synthetic", "--val-size", "1"])
    assert "predicts 19 classes (cityscapes); --dataset synthetic has 5" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(path, weights_only=True)["model"], plain)
    with pytest.raises(checkpoints.CheckpointError, match="plain.pt has .*expected train.py's"):
        checkpoints.load_model(plain)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match="cannot read checkpoint .*cut.pt"):
        checkpoints.load_model(tmp_path / "cut.pt")


def test_checkpoint_with_the_right_keys_but_no_content_is_one_error(tmp_path, capsys):
    cases = {"empty": {"model": {}, "config": {}, "iter": 1},
             "no_backbone": {"model": {"head.prototypes": torch.zeros(2, 1, 3)}, "config": {"head": "protoseg"}},
             "no_head": {"model": {"backbone.w": torch.zeros(1)}, "config": {"backbone": "hrnet_tiny", "head": "protoseg"}}}
    for name, content in cases.items():
        torch.save(content, tmp_path / f"{name}.pt")
        with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint .*{name}.pt: its"):
            checkpoints.load_checkpoint(tmp_path / f"{name}.pt")
    assert "its model holds no weights" in user_error(capsys, train.main, ["--eval-only", "--resume", str(tmp_path / "empty.pt")])
