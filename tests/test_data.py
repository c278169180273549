"""Tests for data.py: label tables against the reference facts, layouts, synthetic scenes, augmentation; bad input
and ADE20K-Full layouts are in test_bad_input.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import datafiles
import labels
from conftest import save_image

REF = Path(__file__).parent / "testdata"  # small facts and samples, see testdata/README.md


def ref(name):
    return json.loads((REF / name).read_text())


# ---- label tables ----------------------------------------------------------------------------------------

def test_cityscapes_tables_equal_official_labels():
    j = ref("cityscapes_labels.json")
    assert labels.CITYSCAPES_CLASSES == j["train_classes"]["names"]
    assert labels.CITYSCAPES_PALETTE.tolist() == j["train_classes"]["colors"]
    assert labels.CITYSCAPES_LABEL_IDS == j["train_classes"]["labelIds"]
    expect = np.full(256, labels.INVALID)  # values that are no labelId (34..255) are errors
    for k, v in j["labelId_to_trainId"].items():
        expect[int(k)] = v if v != 255 else labels.IGNORE_INDEX   # the file's 255 = ignore
    assert labels.CITYSCAPES_LUT[:256].tolist() == expect.tolist()
    for lab in j["labels"]:  # the full table agrees too (license plate has id -1, not in a PNG)
        if lab["id"] >= 0:
            assert labels.CITYSCAPES_LUT[lab["id"]] == (lab["trainId"] if 0 <= lab["trainId"] < 19 else labels.IGNORE_INDEX)


def test_ade20k_tables_equal_reference():
    j = ref("ade20k_labels.json")
    assert labels.ADE20K_CLASSES == j["classes"] and len(labels.ADE20K_CLASSES) == 150
    assert labels.ADE20K_PALETTE.tolist() == j["palette"]
    assert labels.ADE20K_LUT[0] == labels.IGNORE_INDEX and labels.ADE20K_LUT[1:151].tolist() == list(range(150))
    assert (labels.ADE20K_LUT[151:] == labels.INVALID).all()  # values above 150 are errors


def test_coco_stuff_tables_equal_reference():
    j = ref("coco_stuff_labels.json")
    assert labels.COCO_STUFF_CLASSES == j["classes"] and len(labels.COCO_STUFF_CLASSES) == 171
    assert labels.COCO_STUFF_PALETTE.tolist() == j["palette"]
    # the reference maps 182..254 to ignore (mmseg); here they are errors, as no stuffthingmap holds them
    expect = [labels.IGNORE_INDEX if v == 255 else v for v in j["lut_raw_to_train_id_256"]]
    expect[182:255] = [labels.INVALID] * 73
    assert labels.COCO_STUFF_LUT[:256].tolist() == expect
    assert labels.COCO_STUFF_RAW_IDS == j["train_id_to_raw_png_value"]
    assert {int(k): (labels.IGNORE_INDEX if v == 255 else v) for k, v in j["clsID_to_trID_164k"].items()} == \
        {v: int(labels.COCO_STUFF_LUT[v]) for v in labels.COCO_STUFF_RAW_IDS + [255]}


def test_ade20k_full_tables_equal_reference():
    j = ref("ade20k_full_847_labels.json")
    assert labels.ADE20K_FULL_CLASSES == j["classes"] and labels.ADE20K_FULL_RAW_IDS == j["raw_id"]
    assert [c["trainId"] for c in j["categories"]] == list(range(847))
    lut = labels.ADE20K_FULL_LUT
    assert [lut[c["id"]] for c in j["categories"]] == list(range(847))
    assert (np.delete(lut[:-1], j["raw_id"]) == labels.IGNORE_INDEX).all()  # every other raw id (0 too) is ignored
    assert len(lut) - 1 == 25 * 256 + 256  # R // 10 * 256 + G covers 0..6655
    assert len(set(map(tuple, labels.ADE20K_FULL_PALETTE.tolist()))) == 847


# ---- real layouts ----------------------------------------------------------------------------------------

def test_cityscapes_sample_labels_equal_labelids_through_official_table():
    ds = data.build_dataset("cityscapes", REF / "cityscapes_sample", "val")
    assert len(ds) == 1 and ds.num_classes == 19 and ds.ignore_index == labels.IGNORE_INDEX == -1
    s = ds[0]
    assert s["name"] == "frankfurt/frankfurt_000000_000294"
    assert s["image"].shape == (3, 128, 256) and s["image"].dtype == torch.float32
    frame = "val/frankfurt/frankfurt_000000_000294"
    raw = np.array(Image.open(REF / f"cityscapes_sample/gtFine/{frame}_gtFine_labelIds.png"))
    lut = ref("cityscapes_labels.json")["labelId_to_trainId"]
    expect = np.vectorize(lambda v: lut.get(str(v), 255))(raw)
    expect[expect == 255] = labels.IGNORE_INDEX
    assert s["label"].dtype == torch.int64 and (s["label"].numpy() == expect).all()
    rgb = np.array(Image.open(REF / f"cityscapes_sample/leftImg8bit/{frame}_leftImg8bit.png"))
    assert torch.allclose(s["image"], data.normalize(rgb))


@pytest.mark.parametrize("split,raw_value", [("train", 2), ("val", 3)])
def test_ade20k_sample_reduces_zero_label(split, raw_value):
    for root in (REF / "ade20k_sample", REF / "ade20k_sample/ADEChallengeData2016"):
        ds = data.build_dataset("ade20k", root, split)
        assert len(ds) == 1 and ds.num_classes == 150
        s = ds[0]
        assert s["image"].shape == (3, 128, 256)
        assert set(s["label"].unique().tolist()) == {labels.IGNORE_INDEX, raw_value - 1}


def test_coco_stuff_layout_maps_raw_ids(tmp_path):
    raw = np.array([[0, 10, 11, 12], [181, 255, 25, 90]], np.uint8)  # 11, 25 and 90 are unused thing ids
    save_image(tmp_path / "images/val2017/000001.jpg", np.zeros((2, 4, 3)))
    save_image(tmp_path / "annotations/val2017/000001.png", raw)
    s = data.build_dataset("coco_stuff", tmp_path, "val")[0]
    assert s["label"].tolist() == [[0, 10, -1, 11], [170, -1, -1, -1]]


def test_folder_layout_maps_ignore_value_and_uses_split_folders(tmp_path):
    for split in ("train", "val"):
        save_image(tmp_path / f"images/{split}/a.png", np.full((3, 5, 3), 100))
        save_image(tmp_path / f"masks/{split}/a.png", [[0, 1, 2, 7, 7], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    ds = data.build_dataset("folder", tmp_path, "val", num_classes=3, ignore_value=7)
    assert ds.num_classes == 3 and ds.palette.shape == (3, 3) and len(set(map(tuple, ds.palette.tolist()))) == 3
    assert ds[0]["label"][0].tolist() == [0, 1, 2, -1, -1] and ds[0]["name"] == "a"
    flat = tmp_path / "flat"
    save_image(flat / "images/x.jpg", np.zeros((3, 5, 3)))
    save_image(flat / "masks/x.png", np.ones((3, 5)))
    assert data.build_dataset("folder", flat, "train", num_classes=2)[0]["label"].eq(1).all()


# ---- synthetic scenes ------------------------------------------------------------------------------------

def test_synthetic_deterministic_per_seed_and_index():
    a, b = data.SyntheticDataset("train", seed=3), data.SyntheticDataset("train", seed=3)
    for k in ("image", "label", "modes"):
        assert torch.equal(a[5][k], b[5][k])
    assert not torch.equal(a[5]["image"], a[6]["image"])
    assert not torch.equal(a[5]["image"], data.SyntheticDataset("train", seed=4)[5]["image"])


def test_synthetic_train_and_val_differ():
    tr, va = data.build_dataset("synthetic", split="train"), data.build_dataset("synthetic", split="val")
    assert len(tr) == 2000 and len(va) == 100
    train_images = [tr[i]["image"] for i in range(20)]
    for i in range(20):
        assert all(not torch.equal(va[i]["image"], t) for t in train_images)


def test_synthetic_every_class_shows_all_its_modes_and_modes_agree_with_labels():
    ds = data.SyntheticDataset("val")
    assert ds.num_classes == len(labels.SYNTHETIC_MODES) == 5 and ds.palette.shape == (5, 3)
    seen = set()
    for i in range(40):
        s = ds[i]
        lab, modes = s["label"], s["modes"]
        assert s["image"].shape == (3, 160, 160) and lab.shape == modes.shape == (160, 160)
        assert ((lab == labels.IGNORE_INDEX) == (modes == labels.IGNORE_INDEX)).all()
        for c in range(5):
            assert (modes[lab == c] < labels.SYNTHETIC_MODES[c]).all()
        seen |= set(zip(lab.flatten().tolist(), modes.flatten().tolist()))
    assert seen == {(c, m) for c in range(5) for m in range(labels.SYNTHETIC_MODES[c])}


def test_synthetic_modes_fine_label_is_class_times_3_plus_mode():
    coarse, fine = data.build_dataset("synthetic", split="val"), data.build_dataset("synthetic_modes", split="val")
    assert fine.num_classes == 15 and fine.palette.shape == (15, 3) and fine.class_names[4] == "alpha1"
    assert coarse.num_classes == 5                                             # the class attribute is untouched
    for i in range(3):
        a, b = coarse[i], fine[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["modes"], b["modes"])
        assert torch.equal(b["label"], a["label"] * 3 + a["modes"])


def test_synthetic_colour_and_texture_are_each_used_by_several_classes():
    # the class is decided only by (colour, texture): no colour or texture belongs to a single class
    pairs = {(c, m): ((c - 1 + m) % 4, m) for c in range(1, 5) for m in range(3)}
    assert len(set(pairs.values())) == 12
    for colour in range(4):
        assert len({c for (c, m), (col, _) in pairs.items() if col == colour}) == 3
    for tex in range(3):
        assert len({c for (c, m), (_, t) in pairs.items() if t == tex}) == 4


# ---- augmentation ----------------------------------------------------------------------------------------

def blocky_scene(h=96, w=128, n=6, seed=0):
    """A label map of large blocks and an image whose colour is palette[label]."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, n, (h // 16 + 1, w // 16 + 1)).astype(np.uint8)
    label = np.repeat(np.repeat(blocks, 16, 0), 16, 1)[:h, :w]
    palette = labels.default_palette(n)
    return palette[label], label, palette


def test_train_transform_keeps_image_and_label_aligned():
    # pixels 2+ px away from any block edge (in the output) must show exactly their label's colour
    image, label, palette = blocky_scene()
    t = data.TrainTransform(crop_size=(64, 80), jitter=0)
    for i in range(20):
        img, (lab,) = t(image, [label], np.random.default_rng(i))
        rgb = img.permute(1, 2, 0).numpy() * data.STD + data.MEAN
        lab = lab.numpy()
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(lab, 2, constant_values=254), (5, 5))
        interior = (windows == lab[..., None, None]).all((-1, -2)) & (lab != labels.IGNORE_INDEX)
        assert interior.mean() > 0.3
        assert (np.abs(rgb[interior] - palette[lab[interior]]).max(1) < 2).all()


def test_train_transform_pads_with_ignore_and_outputs_crop_size():
    image, label, _ = blocky_scene(40, 50)
    img, (lab, modes) = data.TrainTransform((64, 80), scale=(1, 1), flip=False)(image, [label, label],
                                                                              np.random.default_rng(0))
    assert img.shape == (3, 64, 80) and lab.shape == modes.shape == (64, 80)
    assert img.dtype == torch.float32 and lab.dtype == torch.int64
    assert (lab[40:] == labels.IGNORE_INDEX).all() and (lab[:, 50:] == labels.IGNORE_INDEX).all() and (img[:, 40:] == 0).all()
    assert (lab[:40, :50].numpy() == label).all() and torch.equal(lab, modes)


def test_eval_transform_keeps_whole_image():
    image, label, _ = blocky_scene(37, 53)
    img, (lab,) = data.EvalTransform()(image, [label])
    assert img.shape == (3, 37, 53) and (lab.numpy() == label).all() and lab.dtype == torch.int64


def test_augmentation_reproducible_per_seed_epoch_index():
    ds = data.SyntheticDataset("train", data.TrainTransform((96, 96)), seed=1)
    a = ds[7]
    assert a["image"].dtype == torch.float32 and a["image"].shape == (3, 96, 96)
    assert torch.equal(a["image"], ds[7]["image"]) and torch.equal(a["label"], ds[7]["label"])
    ds.set_epoch(1)
    assert not torch.equal(a["image"], ds[7]["image"])
    ds.set_epoch(0)
    assert torch.equal(a["image"], ds[7]["image"])


# ---- colouring -------------------------------------------------------------------------------------------

def test_colorize_ignore_black_and_classes_palette():
    pal = labels.CITYSCAPES_PALETTE
    label = torch.tensor([[0, 18, labels.IGNORE_INDEX], [5, 19, 2]])
    out = np.array(data.colorize(label, pal))
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == pal[0].tolist() and out[0, 1].tolist() == pal[18].tolist()
    assert out[0, 2].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 0, 0]


def test_trainid_to_labelid_round_trips_with_lut():
    pred = np.arange(19).reshape(1, 19)
    ids = data.trainid_to_labelid(pred)
    assert ids.dtype == np.uint8 and ids[0].tolist() == labels.CITYSCAPES_LABEL_IDS
    assert (labels.CITYSCAPES_LUT[ids] == pred).all()
    assert data.trainid_to_labelid(torch.tensor([labels.IGNORE_INDEX]))[0] == 0


# ---- the quick label-value check at its bounds ------------------------------------------------------------

@pytest.mark.parametrize("lut, largest_valid", [(labels.CITYSCAPES_LUT, 33), (labels.ADE20K_LUT, 150)])
def test_quick_label_check_passes_the_largest_valid_id_and_refuses_the_next(lut, largest_valid):
    import datafiles
    assert lut[largest_valid] != datafiles.INVALID and lut[largest_valid + 1] == datafiles.INVALID   # the table's bound
    ok = np.full((4, 5), largest_valid, np.uint8)
    datafiles.check_values(ok, lut, "ok.png", "the valid ids")             # alone: no error
    with pytest.raises(data.DatasetError, match=rf"label values \[{largest_valid + 1}\] in bad.png"):
        datafiles.check_values(ok + 1, lut, "bad.png", "the valid ids")
