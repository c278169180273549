"""evaluate.py: the confusion matrix and mIoU / mAcc by hand, Cityscapes metrics against a transcription of
cityscapesScripts (also through evaluate()), the printed report, the official ProtoSeg checkpoint through both
scripts (its key mapping and forward: test_checkpoints.py), evaluation from a checkpoint alone, submissions. The test
options (scales, flip, sliding windows): test_eval_options.py."""
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
import labels
import predict
import settings
import train
from conftest import save_image, tiny_checkpoint, user_error
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
    gt = labels.CITYSCAPES_LUT[gt_ids]
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


class Fixed(torch.nn.Module):
    """A 'model' whose scores are one-hot of a given prediction (1 x H x W train ids), whatever the image."""

    def __init__(self, pred):
        super().__init__()
        self.scores, self.head, self.align_corners = torch.nn.Parameter(
            F.one_hot(torch.as_tensor(pred).long(), 19).permute(2, 0, 1)[None].float()), torch.nn.Identity(), True

    def forward(self, x):
        return {"scores": self.scores}


def test_evaluate_gives_cityscapesscripts_iiou_and_categories_and_none_without_instance_maps():
    """evaluate() on the sample frame with a known prediction: every Cityscapes number equals the transcription of
    cityscapesScripts; a 19-class dataset without instanceIds maps has none of them."""
    gt_ids = np.array(Image.open(SAMPLE / f"gtFine/{FRAME}_gtFine_labelIds.png"))
    inst = np.array(Image.open(SAMPLE / f"gtFine/{FRAME}_gtFine_instanceIds.png")).astype(np.int64)
    gt = labels.CITYSCAPES_LUT[gt_ids]
    pred = np.where(np.random.default_rng(1).random(gt.shape) < 0.3, 11, np.maximum(gt, 0))   # persons made up
    iiou, cat_iou, cat_iiou = cityscapes_scripts_scores(data.trainid_to_labelid(pred).astype(np.int64), gt_ids, inst)
    val = data.build_dataset("cityscapes", SAMPLE, "val")
    m = evaluate.evaluate(Fixed(pred), val, settings.Config(workers=0), log=lambda *a, **k: None)
    assert m["category_iou"] == pytest.approx(cat_iou, rel=1e-9)
    assert m["iiou"] == pytest.approx(iiou, rel=1e-9, nan_ok=True) and m["category_iiou"] == pytest.approx(cat_iiou)
    assert 0 < m["category_iiou"]["human"] < 1 and 0 < m["category_iiou"]["vehicle"] < 1

    class NoInstanceMaps(torch.utils.data.Dataset):                      # the same frame, its labels only
        num_classes = 19

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return val[i]
    m = evaluate.evaluate(Fixed(pred), NoInstanceMaps(), settings.Config(workers=0), log=lambda *a, **k: None)
    assert not {"iiou", "category_iou", "mean_iiou"} & set(m) and m["miou"] > 0


# ----------------------------------------------------------------------------- the official checkpoint, both scripts

def small_official_file(tmp_path):
    """An official-format file around HRNet-W18-small-v2 (D = 270): the same layout as the W48 release, smaller."""
    cfg = {**vars(settings.Config()), "backbone": "hrnet18_small_v2", "num_classes": 19, "embed_layernorm": True}
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
    assert set(report["classes"]) == set(labels.CITYSCAPES_CLASSES) and "category_iou" in report
    out = tmp_path / "results"
    predict.main(["--checkpoint", str(path), str(SAMPLE / "leftImg8bit/val"), "--labelids", "--out", str(out)])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["frankfurt/frankfurt_000000_000294_leftImg8bit.png"]         # one labelId PNG per frame
    ids = np.array(Image.open(out / written[0]))
    assert ids.shape == (128, 256) and set(np.unique(ids)) <= set(labels.CITYSCAPES_LABEL_IDS)


def test_training_from_an_official_checkpoint_is_refused_naming_eval_only_and_pretrained(tmp_path, capsys):
    """The release holds no optimizer state: --resume it to train is a user error; --eval-only of it is not (above)."""
    path = small_official_file(tmp_path)
    for split in ("train", "val"):                                       # a 19-class folder dataset
        save_image(tmp_path / "data/images" / split / "a.png", np.zeros((32, 32, 3)))
        save_image(tmp_path / "data/masks" / split / "a.png", np.arange(32 * 32).reshape(32, 32) % 19)
    msg = user_error(capsys, train.main, ["--resume", str(path), "--dataset", "folder", "--data-root",
                                          str(tmp_path / "data"), "--num-classes", "19", "--allow-changes", "--class-weights", "none", "--out-dir",
                                          str(tmp_path)])
    assert f"{path} is an official ProtoSeg checkpoint: it holds no optimizer state; use --eval-only" in msg


# ----------------------------------------------------------------------------- this project's checkpoints

def test_eval_only_takes_the_model_from_the_checkpoint_and_needs_only_val(tmp_path):
    path = tiny_checkpoint(tmp_path / "last.pt", it=5, dataset="cityscapes", backbone="hrnet_tiny", num_classes=19,
                           num_prototypes=3, out_dir=str(tmp_path / "run"))   # the sample has a val split only
    m = train.main(["--eval-only", "--resume", str(path), "--data-root", str(SAMPLE), "--workers", "0"])
    assert m["images"] == 1 and len(m["iou"]) == 19 and len(m["prototypes_in_use"]) == 19
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())      # beside the checkpoint, in eval/
    assert report["classes"]["car"]["prototypes_in_use"] >= 1 and report["iiou"].keys() >= {"person", "car"}


# ----------------------------------------------------------------------------- metrics

def test_metrics_equal_hand_computed_confusion_matrix():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, -1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])
    conf = evaluate.confusion_matrix(pred.flatten(), label.flatten(), 3)
    expected = torch.tensor([[1, 1, 0],            # gt 0: one right, one called 1
                             [1, 2, 0],            # gt 1: two right, one called 0 (ignore pixel skipped)
                             [1, 0, 1]])           # gt 2: one right, one called 0
    assert torch.equal(conf, expected)
    m = evaluate.metrics_from_confusion(conf)
    iou = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]
    assert m["iou"] == pytest.approx(iou) and m["miou"] == pytest.approx(sum(iou) / 3)
    assert m["aacc"] == pytest.approx(4 / 7)
    assert m["acc"] == pytest.approx([1 / 2, 2 / 3, 1 / 2]) and m["macc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


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


def test_evaluation_prints_n_a_and_says_when_val_has_no_labelled_pixel():
    nan = float("nan")
    m = {"miou": nan, "macc": nan, "aacc": nan, "images": 2, "iou": [nan, nan], "acc": [nan, nan],
         "prototypes_in_use": [None, 2]}
    text = evaluate.format_metrics(m, ["a", "b"])
    assert "prototypes in use n/a" in text and "None" not in text
    assert "val has no labelled pixel in its 2 images" in text


# ----------------------------------------------------------------------------- the release's input (BGR)

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
    seg = F.interpolate(net.head(net.features(x))["scores"], size=(h, w), mode="bilinear", align_corners=True)
    label_list = json.loads((REF / "cityscapes_labels.json").read_text())["train_classes"]["labelIds"]
    ref = np.array(label_list, np.uint8)[seg.argmax(1)[0].numpy()]
    assert np.array_equal(ours, ref)
    rgb = net(data.normalize(np.array(Image.open(SAMPLE / f"leftImg8bit/{FRAME}_leftImg8bit.png"), np.float32))[None])["scores"]
    assert (np.array(label_list, np.uint8)[rgb.argmax(1)[0].numpy()] != ref).mean() > 0.05   # RGB input differs
