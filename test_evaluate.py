"""evaluate.py: Cityscapes metrics against a transcription of cityscapesScripts, the official ProtoSeg checkpoint
(key mapping, its forward transcribed, both scripts), evaluation from a checkpoint alone, submissions."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import evaluate
import predict
import train
from models import model_from_config

REF = Path(__file__).parent / "testdata"
SAMPLE = REF / "cityscapes_sample"
FRAME = "val/frankfurt/frankfurt_000000_000294"


# ----------------------------------------------------------------------------- Cityscapes metrics

def cityscapes_scripts_scores(pred_ids, gt_ids, inst):
    """Slow transcription of cityscapesScripts' evalPixelLevelSemanticLabeling in labelId space."""
    labels = [l for l in json.loads((REF / "cityscapes_labels.json").read_text())["labels"] if l["id"] >= 0]
    by_id = {l["id"]: l for l in labels}
    eval_ids = [l["id"] for l in labels]
    conf = np.zeros((max(eval_ids) + 1,) * 2, np.int64)
    np.add.at(conf, (gt_ids.ravel(), pred_ids.ravel()), 1)
    avg = dict(zip(["bicycle", "caravan", "motorcycle", "rider", "bus", "train", "car", "person", "truck", "trailer"],
                   [4672.3249222261, 36771.8241758242, 6298.7200839748, 3930.4788056518, 35732.1511111111,
                    67583.7075812274, 12794.0202738185, 3462.4756337644, 27855.1264367816, 16926.9763313609]))
    cats = {}
    for l in labels:
        cats.setdefault(l["category"], []).append(l)
    inst_cats = {c: [l["id"] for l in ls] for c, ls in cats.items() if all(l["hasInstances"] for l in ls)}
    wtp, wfn, ctp, cfn = {}, {}, {c: 0.0 for c in inst_cats}, {c: 0.0 for c in inst_cats}
    for i in np.unique(inst[inst > 1000]):
        lab = by_id[int(i // 1000)]
        if lab["ignoreInEval"]:
            continue
        mask = inst == i
        size, tp = mask.sum(), (pred_ids[mask] == lab["id"]).sum()
        w = avg[lab["name"]] / size
        wtp[lab["name"]] = wtp.get(lab["name"], 0) + tp * w
        wfn[lab["name"]] = wfn.get(lab["name"], 0) + (size - tp) * w
        if lab["category"] in inst_cats:
            t = np.isin(pred_ids[mask], inst_cats[lab["category"]]).sum()
            ctp[lab["category"]] += t * w
            cfn[lab["category"]] += (size - t) * w
    valid = [i for i in eval_ids if not by_id[i]["ignoreInEval"]]
    iiou = {}
    for i in valid:
        name = by_id[i]["name"]
        if by_id[i]["hasInstances"]:
            fp = conf[[l for l in valid if l != i], i].sum()
            tp, fn = wtp.get(name, 0.0), wfn.get(name, 0.0)
            iiou[name] = tp / (tp + fp + fn) if tp + fp + fn else float("nan")
    cat_iou, cat_iiou = {}, {}
    for c, ls in cats.items():
        ids = [l["id"] for l in ls if not l["ignoreInEval"]]
        if not ids:
            continue
        other = [l for l in valid if by_id[l]["category"] != c]
        tp = conf[np.ix_(ids, ids)].sum()
        fn, fp = conf[ids].sum() - tp, conf[np.ix_(other, ids)].sum()
        cat_iou[c] = tp / (tp + fn + fp)
        if c in inst_cats:
            fp = conf[np.ix_(other, inst_cats[c])].sum()
            cat_iiou[c] = ctp[c] / (ctp[c] + fp + cfn[c])
    return iiou, cat_iou, cat_iiou


def test_cityscapes_iiou_and_categories_equal_a_transcription_of_cityscapesscripts():
    gt_ids = np.array(Image.open(SAMPLE / f"gtFine/{FRAME}_gtFine_labelIds.png"))
    inst = np.array(Image.open(SAMPLE / f"gtFine/{FRAME}_gtFine_instanceIds.png")).astype(np.int64)
    gt = data.CITYSCAPES_LUT[gt_ids]
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, 19, gt.shape), np.maximum(gt, 0))
    pred[40:80, 100:180] = 11                                      # a block called person, over cars and others
    iiou, cat_iou, cat_iiou = cityscapes_scripts_scores(data.trainid_to_labelid(pred).astype(np.int64), gt_ids, inst)
    conf = evaluate.confusion_matrix(torch.from_numpy(pred).flatten(), torch.from_numpy(gt).long().flatten(), 19)
    ours = evaluate.cityscapes_scores(conf, *evaluate.instance_counts(pred, inst))
    assert set(ours["category_iou"]) == set(cat_iou) and len(cat_iou) == 7
    for name in cat_iou:
        assert ours["category_iou"][name] == pytest.approx(cat_iou[name], rel=1e-12)
    assert set(ours["iiou"]) == set(iiou) and len(iiou) == 8
    for name in iiou:
        assert ours["iiou"][name] == pytest.approx(iiou[name], rel=1e-9, nan_ok=True)
    assert sum(v > 0 for v in iiou.values()) >= 2                  # persons and cars are there
    for name in cat_iiou:
        assert ours["category_iiou"][name] == pytest.approx(cat_iiou[name], rel=1e-9)


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
        ours, official = model.head(feats), official_head_forward(sd, feats)
        torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-4)
        model.head.normalize_width = False                       # without official item 7 the answer changes
        assert (model.head(feats).argmax(1) != official.argmax(1)).float().mean() > 0.05


def small_official_file(tmp_path):
    """An official-format file around HRNet-W18-small-v2 (D = 270): the same layout as the W48 release, smaller."""
    cfg = {**vars(train.Config()), "backbone": "hrnet18_small_v2", "num_classes": 19, "embed_layernorm": True}
    torch.manual_seed(0)
    ours = model_from_config(cfg).state_dict()
    sd = {k.removeprefix("head.").removeprefix("trunk."): v for k, v in ours.items()}
    sd.update({k.replace("proj_head.proj.", "proj_head.mlp2."): v for k, v in sd.items() if k.startswith("proj_head.proj.")})
    path = tmp_path / "hrnet_w18_small_proto.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return path


def test_official_checkpoint_evaluates_and_predicts_through_both_scripts(tmp_path):
    path = small_official_file(tmp_path)
    m = train.main(["--eval-only", "--resume", str(path), "--data-root", str(SAMPLE), "--out-dir", str(tmp_path),
                    "--workers", "0"])
    assert m["images"] == 1 and 0 <= m["miou"] <= 1 and "mean_iiou" in m
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())   # --out-dir DIR: DIR/eval/
    assert set(report["classes"]) == set(data.CITYSCAPES_CLASSES) and "category_iou" in report
    out = tmp_path / "results"
    predict.main(["--checkpoint", str(path), str(SAMPLE / "leftImg8bit/val"), "--labelids", "--out", str(out)])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["frankfurt/frankfurt_000000_000294_leftImg8bit.png"]         # one labelId PNG per frame
    ids = np.array(Image.open(out / written[0]))
    assert ids.shape == (128, 256) and set(np.unique(ids)) <= set(data.CITYSCAPES_LABEL_IDS)


# ----------------------------------------------------------------------------- this project's checkpoints

def cityscapes_checkpoint(tmp_path):
    cfg = {**vars(train.Config()), "dataset": "cityscapes", "backbone": "hrnet_tiny", "num_classes": 19,
           "num_prototypes": 3, "out_dir": str(tmp_path / "run")}
    torch.manual_seed(0)
    path = tmp_path / "last.pt"
    torch.save({"model": model_from_config(cfg).state_dict(), "config": cfg, "iter": 5}, path)
    return path


def test_eval_only_takes_the_model_from_the_checkpoint_and_needs_only_val(tmp_path):
    path = cityscapes_checkpoint(tmp_path)                           # the sample has a val split only
    m = train.main(["--eval-only", "--resume", str(path), "--data-root", str(SAMPLE), "--workers", "0"])
    assert m["images"] == 1 and len(m["iou"]) == 19 and len(m["prototypes_in_use"]) == 19
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())      # beside the checkpoint, in eval/
    assert report["classes"]["car"]["prototypes_in_use"] >= 1 and report["iiou"].keys() >= {"person", "car"}


def test_a_checkpoint_for_other_classes_or_a_plain_state_dict_is_one_clear_error(tmp_path, capsys):
    path = cityscapes_checkpoint(tmp_path)
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


def test_predict_names_every_output_uniquely(tmp_path):
    for name in ("a.jpg", "a.png", "sub/b.png"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "in" / name)
    names = predict.output_names([str(tmp_path / "in")])
    assert sorted(str(s) for _, s in names) == ["a_jpg", "a_png", "sub/b"]


# ----------------------------------------------------------------------------- scales and metrics

class StridedConv(torch.nn.Module):
    """A 3x3 stride-2 conv (not pointwise: its output depends on the scale), with a family's align_corners."""

    def __init__(self, align_corners):
        super().__init__()
        self.conv, self.align_corners = torch.nn.Conv2d(3, 4, 3, 2, 1), align_corners

    def forward(self, x):
        return self.conv(x)


def scales_transcribed(model, image, scales):
    """sum_s resize(model(resize(image, s)), H x W), every resize with the model's align_corners."""
    H, W = image.shape[-2:]
    ac, total = model.align_corners, 0
    for s in scales:
        x = F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=ac)
        total = total + F.interpolate(model(x), (H, W), mode="bilinear", align_corners=ac)
    return total


@pytest.mark.parametrize("align_corners", [True, False])
def test_predict_scores_over_scales_equals_a_transcription(align_corners):
    torch.manual_seed(0)
    model, image = StridedConv(align_corners).eval(), torch.randn(1, 3, 37, 53)
    scales = (0.5, 0.75, 1.0, 1.25)
    with torch.no_grad():
        expected = scales_transcribed(model, image, scales)
        torch.testing.assert_close(evaluate.predict_scores(model, image, 4, scales=scales), expected)
        model.align_corners = not align_corners                # the model's convention is the one used
        assert (evaluate.predict_scores(model, image, 4, scales=scales) - expected).abs().max() > 1e-2


def test_miou_and_macc_with_a_class_absent_from_the_ground_truth_or_never_predicted():
    """Rows = ground truth, columns = prediction. Class 2: never in the ground truth, predicted twice (IoU 0,
    no accuracy); class 3: in the ground truth, never predicted (IoU 0, accuracy 0); class 4: absent from both
    (no IoU, no accuracy). Means over the classes that have a value."""
    conf = torch.tensor([[5, 1, 2, 0, 0],
                         [0, 3, 0, 0, 0],
                         [0, 0, 0, 0, 0],
                         [2, 2, 0, 0, 0],
                         [0, 0, 0, 0, 0]])
    m = evaluate.metrics_from_confusion(conf)
    iou = [5 / (8 + 7 - 5), 3 / (3 + 6 - 3), 0 / 2, 0 / 4]
    acc = [5 / 8, 3 / 3, 0 / 4]
    assert m["iou"][:4] == pytest.approx(iou) and math.isnan(m["iou"][4])
    assert [m["acc"][c] for c in (0, 1, 3)] == pytest.approx(acc) and math.isnan(m["acc"][2]) and math.isnan(m["acc"][4])
    assert m["miou"] == pytest.approx(sum(iou) / 4) and m["macc"] == pytest.approx(sum(acc) / 3)
    assert m["aacc"] == pytest.approx(8 / 15)


# ----------------------------------------------------------------------------- the release's input (official item 9)

def official_input(path):
    """openseg's test input, transcribed: cv2.imread (BGR uint8), ToTensor, Normalize(div 255, mean, std) channel by
    channel in that (B, G, R) order. (1, 3, H, W)."""
    bgr = np.array(Image.open(path).convert("RGB"))[..., ::-1]
    x = torch.from_numpy(bgr.transpose(2, 0, 1).copy()).float().div(255.0)
    for t, m, s in zip(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]):
        t.sub_(m).div_(s)
    return x[None]


def test_release_model_input_equals_the_official_bgr_pipeline(tmp_path):
    import settings
    path = small_official_file(tmp_path)
    cfg, ckpt = settings.resolve(*settings.parse_args(["--eval-only", "--resume", str(path), "--data-root",
                                                       str(SAMPLE)]))
    assert cfg.channel_order == "bgr" and ckpt["config"]["channel_order"] == "bgr"
    _, val = train.make_datasets(cfg)
    ref = official_input(SAMPLE / f"leftImg8bit/{FRAME}_leftImg8bit.png")[0]
    torch.testing.assert_close(val[0]["image"], ref, rtol=0, atol=2e-6)
    rgb = train.make_datasets(settings.Config(dataset="cityscapes", data_root=str(SAMPLE), eval_only=True))[1]
    assert (rgb[0]["image"] - ref).abs().max() > 0.5                          # the project's default: RGB


@torch.no_grad()
def test_predict_labelids_of_the_release_equal_the_official_single_scale_test(tmp_path):
    path = small_official_file(tmp_path)
    out = tmp_path / "results"
    predict.main(["--checkpoint", str(path), str(SAMPLE / "leftImg8bit/val"), "--labelids", "--out", str(out)])
    ours = np.array(Image.open(out / f"frankfurt/frankfurt_000000_000294_leftImg8bit.png"))
    net, _ = checkpoints.load_model(path)                    # its forward equals the official one (test above)
    x = official_input(SAMPLE / f"leftImg8bit/{FRAME}_leftImg8bit.png")
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(int(h * 1), int(w * 1)), mode="bilinear", align_corners=True)   # ss_test, scale 1
    seg = F.interpolate(net.head(net.features(x)), size=(h, w), mode="bilinear", align_corners=True)
    label_list = json.loads((REF / "cityscapes_labels.json").read_text())["train_classes"]["labelIds"]
    ref = np.array(label_list, np.uint8)[seg.argmax(1)[0].numpy()]
    assert np.array_equal(ours, ref)
    rgb = net(data.normalize(np.array(Image.open(SAMPLE / f"leftImg8bit/{FRAME}_leftImg8bit.png"), np.float32))[None])
    assert (np.array(label_list, np.uint8)[rgb.argmax(1)[0].numpy()] != ref).mean() > 0.05   # RGB input differs
