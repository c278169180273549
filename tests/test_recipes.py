"""Each preset's protocol against the official configs (testdata/transformer_recipes.json, the ProtoSeg and mmseg
facts in transforms.py), the test protocol of evaluate.py (window positions and stride, the multi-scale input
resize, the keep-ratio test resize and back), the optimiser's weight decay, and what --help shows."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import models
import settings
import train
import transforms as T

REF = json.loads((Path(__file__).parent / "testdata" / "transformer_recipes.json").read_text())


def numbers(text):
    return [int(n) for n in re.findall(r"\d+", text)]


def test_mit_recipes_take_the_official_pipelines_and_tests():
    d = REF["segformer"]["data"]
    cfg, _ = settings.parse_args(["--dataset", "cityscapes", "--backbone", "mit_b0"])
    city = d["Cityscapes_1024x1024"]
    assert cfg.pipeline == "mmseg" and list(cfg.img_scale) == numbers(city["train_pipeline"][2])[:2]
    assert [cfg.eval_crop, cfg.eval_stride] == [tuple(numbers(city["test"])[:2]), tuple(numbers(city["test"])[2:4])]
    assert "cat_max_ratio=0.75" in city["train_pipeline"][3] and cfg.cat_max_ratio == 0.75
    cfg, _ = settings.parse_args(["--dataset", "ade20k", "--backbone", "mit_b2"])
    assert cfg.eval_resize == (2048, 512) and cfg.eval_divisor == 32 and "size_divisor=32" in d["ADE20K"]["test"]
    assert list(cfg.img_scale) == numbers(d["ADE20K"]["train_pipeline"][2])[:2] and cfg.eval_crop == (0, 0)
    cfg, _ = settings.parse_args(["--dataset", "ade20k", "--backbone", "mit_b5"])
    assert cfg.crop == (640, 640) and cfg.img_scale == (2048, 640) and cfg.eval_resize == (2048, 640)
    cfg, _ = settings.parse_args(["--dataset", "ade20k", "--backbone", "swin_tiny"])
    swin = REF["swin_upernet_ade20k"]["data"]
    assert (cfg.pipeline, cfg.eval_resize, cfg.eval_divisor) == ("mmseg", (2048, 512), 0)
    assert list(cfg.img_scale) == numbers(swin["train_pipeline"][2])[:2] and "mode 'whole'" in swin["test"]


def test_hrnet_presets_take_openseg_on_cityscapes_and_mmseg_elsewhere():
    cfg, _ = settings.parse_args(["--dataset", "cityscapes"])
    assert (cfg.pipeline, cfg.aspect, cfg.norm_decay, cfg.channel_order) == ("openseg", (0.9, 1.1), True, "rgb")
    for name in ("ade20k", "coco_stuff"):
        cfg, _ = settings.parse_args(["--dataset", name])
        assert (cfg.pipeline, cfg.img_scale, cfg.eval_resize, cfg.norm_decay) == \
            ("mmseg", (2048, 512), (2048, 512), True)
    cfg, _ = settings.parse_args([])
    assert (cfg.pipeline, cfg.norm_decay, cfg.eval_resize) == ("project", False, (0, 0))   # synthetic


def test_help_shows_the_chosen_pipeline_test_protocol_and_channel_order():
    text = " ".join(settings.make_parser("cityscapes", "mit_b0").format_help().split())
    assert "How --dataset cityscapes --backbone mit_b0 trains and tests" in text and "mmseg's: resize to fit" in text
    assert "sliding window (1024, 1024), stride (768, 768)" in text and "input channel order rgb" in text
    assert "the recipe's no-decay groups" in text and "weight decay on every parameter" not in text   # MiT's groups
    text = " ".join(settings.make_parser("cityscapes").format_help().split())
    assert "openseg's" in text and "weight decay on every parameter" in text and "(default for cityscapes: openseg)" in text


def test_cityscapes_preset_decays_every_parameter_and_the_default_skips_norms():
    for args, skip in ((["--dataset", "cityscapes", "--backbone", "hrnet_tiny"], False), (["--backbone", "hrnet_tiny"], True)):
        cfg, _ = settings.parse_args(args)
        cfg.num_classes = 19
        net = models.model_from_config(cfg)
        group = {id(p): g for g in train.make_optimizer(cfg, net).param_groups for p in g["params"]}
        for name, p in net.named_parameters():
            assert group[id(p)]["weight_decay"] == (0.0 if skip and p.ndim == 1 else cfg.weight_decay), name


# ----------------------------------------------------------------------------- the test protocol

class Recorder(torch.nn.Module):
    """A pointwise model that records the inputs it sees; align_corners as a model family has it."""

    def __init__(self, align_corners=True, classes=4):
        super().__init__()
        self.conv, self.align_corners, self.seen = torch.nn.Conv2d(3, classes, 1), align_corners, []

    def forward(self, x):
        self.seen.append(x.clone())
        return {"scores": self.conv(x)}


def mmseg_windows(H, W, crop, stride):
    """mmseg EncoderDecoder.slide_inference: the top-left corners of its windows."""
    grids = lambda n, c, s: max(n - c + s - 1, 0) // s + 1
    out = []
    for i in range(grids(H, crop[0], stride[0])):
        for j in range(grids(W, crop[1], stride[1])):
            y2, x2 = min(i * stride[0] + crop[0], H), min(j * stride[1] + crop[1], W)
            out.append((max(y2 - crop[0], 0), max(x2 - crop[1], 0)))
    return out


@pytest.mark.parametrize("stride", [(6, 9), (0, 0)])
def test_sliding_windows_are_mmseg_slide_inference_at_the_given_stride(stride):
    H, W, crop = 29, 47, (12, 16)
    image = torch.stack(torch.meshgrid(torch.arange(H.__float__()), torch.arange(W.__float__()), indexing="ij") +
                        (torch.zeros(H, W),))[None]                           # channels: y, x, 0
    model = Recorder()
    evaluate.sliding_window(model, image, 4, crop, stride)
    corners = [(int(x[0, 0, 0, 0]), int(x[0, 1, 0, 0])) for x in model.seen]
    expect = stride if stride[0] else (crop[0] * 2 // 3, crop[1] * 2 // 3)
    assert sorted(corners) == sorted(mmseg_windows(H, W, crop, expect))


@pytest.mark.parametrize("ac", [True, False])
def test_multiscale_input_resize_uses_the_familys_align_corners(ac):
    image = torch.randn(1, 3, 21, 34)
    model = Recorder(ac)
    evaluate.predict_scores(model, image, 4, scales=(0.75,))
    h, w = int(21 * 0.75), int(34 * 0.75)                                     # the official int(h * scale)
    ref = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=True) if ac else \
        F.interpolate(image, scale_factor=0.75, mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.seen[0], ref)


def test_eval_resize_rescales_to_fit_and_scores_go_back_to_the_label():
    t = data.EvalTransform(resize=(64, 36), divisor=8)
    ds = data.SyntheticDataset("val", t, length=2, size=48)
    item = ds[0]
    (nw, nh), (aw, ah) = T.mmseg_test_size(48, 48, (64, 36), 8)
    assert (nw, nh) == (36, 36) and item["image"].shape[-2:] == (ah, aw) == (40, 40)   # fit, then a multiple of 8
    assert item["label"].shape == (48, 48)
    torch.manual_seed(0)
    model = Recorder(False, 5)
    model.head = torch.nn.Identity()
    m = evaluate.evaluate(model, ds, settings.Config(eval_scales=(1.0, 1.0), workers=0))   # predict_scores
    conf = torch.zeros(5, 5, dtype=torch.long)
    for i in range(2):
        it = ds[i]
        scores = F.interpolate(model.conv(it["image"][None]), size=(48, 48), mode="bilinear", align_corners=False)
        conf += evaluate.confusion_matrix(scores.argmax(1)[0], it["label"], 5)
    assert m["miou"] == pytest.approx(evaluate.metrics_from_confusion(conf)["miou"], nan_ok=True)
