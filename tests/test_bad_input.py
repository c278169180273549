"""Bad data on disk (ADE20K-Full's included): every user error is one DatasetError line
`<what> in <file>: <found>, expected <rule>; <how to fix>`, found by check_dataset before training where it can be,
and nothing is read silently wrong; then decoding: damage the decoder can tell, EXIF orientation, links. train.py's
flags, paths and stops: test_train_bad_input.py; a broken checkpoint: test_checkpoints.py; a stale lock:
test_runs.py. Tiny files only."""
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import datafiles
import labels
from conftest import save_image

ONE_LINE = re.compile(r"^[^\n]+ in [^\n]+: [^\n]+, expected [^\n]+; [^\n]+$")


def folder_set(root, n=1, h=4, w=6, mask=None, ext="png"):
    """n pairs root/images/iK.png + root/masks/iK.<ext>; mask defaults to zeros."""
    for k in range(n):
        save_image(root / f"images/i{k}.png", np.full((h, w, 3), 90))
        save_image(root / f"masks/i{k}.{ext}", np.zeros((h, w)) if mask is None else mask)
    return root


def error(fn, *args, **kw):
    """The DatasetError message fn raises, checked to be one line in the format."""
    with pytest.raises(data.DatasetError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert ONE_LINE.match(msg), msg
    return msg


def check(root, values=True, **kw):
    return datafiles.check_dataset(data.build_dataset("folder", root, num_classes=kw.pop("num_classes", 2), **kw),
                              values=values, log=None)


# ---- one line, also through DataLoader workers ----------------------------------------------------------

def test_error_format_one_line_for_layout_errors(tmp_path):
    msg = error(data.build_dataset, "cityscapes", tmp_path / "nowhere", "train")
    assert "leftImg8bit/train" in msg and "expected root/leftImg8bit/{split}/{city}/*_leftImg8bit.png" in msg
    assert "training" in error(data.build_dataset, "ade20k", tmp_path, "val")
    (tmp_path / "coco/images/val2017").mkdir(parents=True)
    (tmp_path / "coco/annotations/val2017").mkdir(parents=True)
    assert error(data.build_dataset, "coco_stuff", tmp_path / "coco", "val").startswith("no images in")
    save_image(tmp_path / "f/images/a.png", np.zeros((4, 4, 3)))
    save_image(tmp_path / "f/masks/b.png", np.zeros((4, 4)))
    assert "unpaired image in" in error(data.build_dataset, "folder", tmp_path / "f", num_classes=2)
    save_image(tmp_path / "f/masks/a.png", np.zeros((4, 4)))
    assert "unpaired label in" in error(data.build_dataset, "folder", tmp_path / "f", num_classes=2)
    assert "unknown dataset" in error(data.build_dataset, "voc", "x")
    assert "--data-root" in error(data.build_dataset, "cityscapes")
    assert "ignore_value" in error(data.build_dataset, "folder", tmp_path / "f", num_classes=2, ignore_value=1)


def test_error_survives_pickling_and_dataloader_workers(tmp_path):
    root = folder_set(tmp_path, mask=[[0, 1, 5, 9, 0, 0]] * 4)
    ds = data.build_dataset("folder", root, num_classes=2)
    expect = error(ds.__getitem__, 0)
    assert expect.startswith("label values [5, 9] in ") and "masks/i0.png" in expect
    assert str(pickle.loads(pickle.dumps(data.DatasetError(expect)))) == expect
    batches = iter(torch.utils.data.DataLoader(ds, num_workers=1))
    with pytest.raises(data.DatasetError) as e:
        next(batches)
    assert str(e.value) == expect  # torch re-raises DatasetError(its traceback text); only our line is kept
    del batches, e  # stop the worker now (the traceback holds the iterator)


# ---- the data check before training ---------------------------------------------------------------------

def test_check_dataset_finds_broken_pairs_from_headers(tmp_path):
    cases = {  # name: (image, mask) writer, expected message start
        "size": (lambda r: folder_set(r, mask=np.zeros((4, 5))), r"label size in .*i0.png: 5x4 \(WxH\), expected"),
        "rgb": (lambda r: folder_set(r, mask=np.zeros((4, 6, 3))), r"label map in .*: 3 channels \(mode RGB\)"),
        "1bit": (lambda r: folder_set(r, mask=np.zeros((4, 6), bool)), r"label map in .*: 1-bit \(mode 1\)"),
        "garbage": (lambda r: (folder_set(r) / "images/i0.png").write_bytes(b"not a png"),
                    r"unreadable image in .*images/i0.png: cannot identify"),
    }
    for name, (write, pattern) in cases.items():
        write(tmp_path / name)
        assert re.match(pattern, error(check, tmp_path / name, values=False)), name


def test_check_dataset_finds_truncated_and_corrupt_images_without_decoding(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3))
    for ext in ("png", "jpg"):
        root = tmp_path / ext
        save_image(root / f"images/a.{ext}", noise[..., 0] if ext == "jpg" else noise)  # grey: converted when read
        save_image(root / "masks/a.png", np.zeros((64, 64)))
        assert datafiles.check_dataset(data.build_dataset("folder", root, num_classes=2), log=None) == 1
        blob = (root / f"images/a.{ext}").read_bytes()
        (root / f"images/a.{ext}").write_bytes(blob[:len(blob) // 2])
        ds = data.build_dataset("folder", root, num_classes=2)
        assert error(datafiles.check_dataset, ds, log=None).startswith(f"truncated image in {root / 'images'}")
        assert error(ds.__getitem__, 0).startswith(("unreadable image in", "truncated image in"))  # and when loaded
    save_image(tmp_path / "png/images/a.png", noise)
    blob = bytearray((tmp_path / "png/images/a.png").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # corrupt inside, end marker intact: the PNG checksums find it (decoded pairs)
    (tmp_path / "png/images/a.png").write_bytes(blob)
    ds = data.build_dataset("folder", tmp_path / "png", num_classes=2)
    assert "bad header checksum" in error(datafiles.check_dataset, ds, values=True, log=None)


def test_check_dataset_val_values_in_full_train_sampled(tmp_path):
    root = folder_set(tmp_path, n=40)
    save_image(root / "masks/i1.png", [[0, 1, 7, 0, 0, 0]] * 4)  # not among the 16 sampled labels (every 2nd)
    assert check(root, values=False) == 40
    msg = error(check, root, values=True)
    assert msg.startswith(f"label values [7] in {root / 'masks/i1.png'}: neither a class nor ignore, expected "
                          f"classes 0..1 and ignore 255")
    save_image(root / "masks/i3.png", np.zeros((4, 5)))
    assert msg.split(";")[0] in error(check, root)  # i1 first ...
    assert error(check, root).endswith("[1 more pairs fail the check]")  # ... and one more counted
    sub = torch.utils.data.Subset(data.build_dataset("folder", root, num_classes=2), [0, 2, 4])
    assert datafiles.check_dataset(sub, values=True, log=None) == 3
    assert datafiles.check_dataset(data.build_dataset("synthetic"), values=True) == 0


def test_check_dataset_prints_summary(tmp_path, capsys):
    datafiles.check_dataset(data.build_dataset("folder", folder_set(tmp_path, n=3), num_classes=2), name="val")
    *progress, summary = capsys.readouterr().out.splitlines()       # a progress line every 10 s: a slow machine
    assert re.fullmatch(r"data check val: 3 pairs OK \(headers\) in \d+\.\d s", summary)
    assert all(re.fullmatch(r"data check val: \d/3 pairs, \d+ s", line) for line in progress)


# ---- silent wrong results, now errors or read right -------------------------------------------------------

def test_coco_stuff_and_cityscapes_values_outside_their_ids_raise(tmp_path):
    save_image(tmp_path / "images/val2017/1.jpg", np.zeros((2, 4, 3)))
    save_image(tmp_path / "annotations/val2017/1.png", [[0, 10, 182, 254], [181, 255, 11, 0]])
    msg = error(data.build_dataset("coco_stuff", tmp_path, "val").__getitem__, 0)
    assert msg.startswith("label values [182, 254] in") and "0..181 and 255" in msg
    city = tmp_path / "city"
    save_image(city / "leftImg8bit/val/x/x_1_leftImg8bit.png", np.zeros((2, 3, 3)))
    save_image(city / "gtFine/val/x/x_1_gtFine_labelIds.png", [[7, 33, 34], [255, 0, 1]])
    assert error(data.build_dataset("cityscapes", city, "val").__getitem__, 0).startswith("label values [34, 255]")


def test_read_image_16bit_png_and_tiff_scaled_by_range(tmp_path):
    ramp = np.array([[1000, 2000], [3000, 5000]], np.uint16)  # a 12-bit sensor's values
    expect = [[0, 64], [128, 255]]  # (v - 1000) / 4000 * 255
    for name in ("a.png", "a.tif", "a.TIFF"):
        rgb = datafiles.read_image(save_image(tmp_path / name, ramp))
        assert Image.open(tmp_path / name).mode == "I;16" and rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
        assert rgb[..., 0].tolist() == expect and (rgb == rgb[..., :1]).all()
    assert datafiles.read_image(save_image(tmp_path / "f.tif", ramp.astype(np.float32)))[..., 1].tolist() == expect
    assert datafiles.read_image(save_image(tmp_path / "c.png", np.full((2, 2), 7, np.uint16))).max() == 0  # constant
    assert datafiles.read_image(save_image(tmp_path / "g.png", np.full((2, 2), 7)))[0, 0].tolist() == [7, 7, 7]  # 8-bit as is


def test_folder_extensions_any_case_and_tiff(tmp_path):
    for stem, iext, mext in (("a", "JPG", "PNG"), ("b", "Png", "tif"), ("c", "TIFF", "Tiff"), ("d", "jpeg", "bmp")):
        save_image(tmp_path / f"images/{stem}.{iext}", np.full((3, 4, 3), 50))
        save_image(tmp_path / f"masks/{stem}.{mext}", np.ones((3, 4)))
    (tmp_path / "images/notes.txt").write_text("not an image")
    ds = data.build_dataset("folder", tmp_path, num_classes=2)
    assert [ds[i]["name"] for i in range(len(ds))] == ["a", "b", "c", "d"]
    assert all(ds[i]["label"].eq(1).all() for i in range(4)) and datafiles.check_dataset(ds, True, log=None) == 4


def test_folder_duplicate_names_and_jpeg_masks_refused(tmp_path):
    folder_set(tmp_path)
    save_image(tmp_path / "images/i0.jpg", np.zeros((4, 6, 3)))
    msg = error(data.build_dataset, "folder", tmp_path, num_classes=2)
    assert msg.startswith(f"two images named i0 in {tmp_path / 'images'}: i0.jpg and i0.png")
    (tmp_path / "images/i0.jpg").unlink()
    save_image(tmp_path / "masks/i0.JPG", np.zeros((4, 6)))
    assert "lossy" in error(data.build_dataset, "folder", tmp_path, num_classes=2)
    (tmp_path / "masks/i0.JPG").unlink()
    save_image(tmp_path / "masks/i0.png", np.zeros((4, 6)), format="JPEG")  # a JPEG behind a .png name
    assert error(check, tmp_path).startswith("JPEG label map in")


def test_folder_binary_masks_hint_and_opt_in(tmp_path):
    root = folder_set(tmp_path, n=3, mask=[[0, 0, 255, 255, 0, 0]] * 4)
    msg = error(check, root)
    assert msg.startswith("binary masks in") and "--binary-masks" in msg
    ds = data.build_dataset("folder", root, num_classes=2, binary_masks=True)
    assert datafiles.check_dataset(ds, True, log=None) == 3 and ds[0]["label"][0].tolist() == [0, 0, 1, 1, 0, 0]
    assert check(root, binary_masks=False) == 3  # 255 really is ignore: accepted as such
    save_image(root / "masks/i1.png", [[0, 1, 255, 255, 0, 0]] * 4)
    assert check(root) == 3  # class 1 present: 255 is ignore, no hint
    assert "binary_masks" in error(data.build_dataset, "folder", root, num_classes=3, binary_masks=True)


# ---- ADE20K-Full (847 classes) in both layouts -----------------------------------------------------------

def seg_png(raw_ids):
    """ADE20K_2021_17_01 colour coding: R // 10 * 256 + G = raw id (R keeps a remainder, as B carries instances)."""
    raw = np.asarray(raw_ids)
    return np.stack([raw // 256 * 10 + 3, raw % 256, np.full_like(raw, 7)], -1)


def test_ade20k_full_release_layout(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    wall, last = labels.ADE20K_FULL_RAW_IDS[0], labels.ADE20K_FULL_RAW_IDS[846]
    raw = [[wall, last, 0, 1], [wall, wall, 3, last]]  # 0 and 1, 3 (not among the 847) -> ignore
    for split, scene in (("training", "cultural/apse__indoor"), ("validation", "urban/street")):
        d = root / f"images/ADE/{split}/{scene}"
        save_image(d / f"ADE_{split[:5]}_1.jpg", np.full((2, 4, 3), 80))
        save_image(d / f"ADE_{split[:5]}_1_seg.png", seg_png(raw))
        save_image(d / f"ADE_{split[:5]}_1_parts_1.png", np.zeros((2, 4, 3)))  # part masks beside it are not labels
    ds = data.build_dataset("ade20k_full", tmp_path, "val")
    assert ds.num_classes == 847 and len(ds.class_names) == 847 and ds.palette.shape == (847, 3)
    s = ds[0]
    assert s["name"] == "urban/street/ADE_valid_1" and s["label"].dtype == torch.int64
    assert s["label"].tolist() == [[0, 846, -1, -1], [0, 0, -1, 846]]
    assert datafiles.check_dataset(ds, values=True, log=None) == 1
    save_image(root / "images/ADE/training/cultural/apse__indoor/ADE_train_1_seg.png", np.zeros((2, 4)))
    assert "expected an RGB _seg.png" in error(datafiles.check_dataset, data.build_dataset("ade20k_full", root), log=None)


def test_ade20k_full_maskformer_layout_preferred(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    save_image(root / "images/ADE/validation/x/ADE_val_1.jpg", np.zeros((2, 3, 3)))  # the release beside it: not used
    save_image(root / "images/ADE/validation/x/ADE_val_1_seg.png", seg_png([[1, 1, 1]] * 2))
    save_image(root / "images_detectron2/validation/ADE_val_1.jpg", np.zeros((2, 3, 3)))
    save_image(root / "annotations_detectron2/validation/ADE_val_1.tif", np.array([[0, 846, 65535], [5, 5, 5]], np.uint16))
    ds = data.build_dataset("ade20k_full", root, "val")
    assert ds[0]["label"].tolist() == [[0, 846, -1], [5, 5, 5]] and ds[0]["name"] == "ADE_val_1"
    save_image(root / "annotations_detectron2/validation/ADE_val_1.tif", np.array([[0, 847, 65534]] * 2, np.uint16))
    assert error(ds.__getitem__, 0).startswith("label values [847, 65534] in")


def test_wide_labels_through_transforms():
    label = np.array([[0, 846, -1, 300]] * 4, np.int32).repeat(8, 0).repeat(8, 1)  # 32 x 32
    image = np.full((32, 32, 3), 100, np.uint8)
    _, (lab,) = data.TrainTransform((40, 40), scale=(1, 1), flip=False)(image, [label], np.random.default_rng(0))
    assert lab.dtype == torch.int64 and (lab[:32, :32].numpy() == label).all() and (lab[32:] == -1).all()
    _, (lab,) = data.TrainTransform((24, 24))(image, [label], np.random.default_rng(1))
    assert set(lab.unique().tolist()) <= {0, 846, -1, 300}
    assert data.EvalTransform()(image, [label])[1][0].tolist() == label.tolist()


# ---- decoding: damage the decoder can tell, EXIF orientation, links -------------------------------------

def jpeg(path, h=32, w=48, **kw):
    a = np.random.default_rng(0).integers(0, 255, (h, w, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, **kw)
    return path


def test_damaged_or_cut_jpeg_is_an_error_naming_the_file_not_grey_rows(tmp_path):
    for kw in ({}, {"progressive": True}, {"restart_marker_blocks": 1}):
        assert datafiles.read_image(jpeg(tmp_path / "ok.jpg", **kw)).shape == (32, 48, 3)   # intact files read
    blob = jpeg(tmp_path / "a.jpg", restart_marker_blocks=1).read_bytes()
    bad = {"cut": blob[:len(blob) // 2],                                    # cut short
           "cut_eoi": blob[:len(blob) // 2] + b"\xff\xd9",                 # cut, then an end marker (PIL: grey rows)
           "junk": blob[:len(blob) // 2] + b"\xff\x13" + blob[len(blob) // 2 + 2:]}   # damaged scan data
    for name, b in bad.items():
        (tmp_path / f"{name}.jpg").write_bytes(b)
        msg = error(datafiles.read_image, tmp_path / f"{name}.jpg")
        assert f"{name}.jpg" in msg and re.match(r"(damaged|truncated|unreadable) image in", msg), msg


def test_exif_orientation_applied_to_images_and_a_mask_that_then_misfits_names_the_reason(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6                                                     # shown rotated 90 degrees
    a = np.zeros((4, 6, 3), np.uint8)
    a[0, 0] = 255                                                        # top-left as stored
    save_image(tmp_path / "images/p.jpg", a, exif=exif, quality=100)
    upright = datafiles.read_image(tmp_path / "images/p.jpg")
    assert upright.shape == (6, 4, 3) and upright[0, -1, 0] > 128      # stored top-left ends top-right
    save_image(tmp_path / "masks/p.png", np.zeros((6, 4)))                   # drawn on the rotated view: fits
    assert check(tmp_path) == 1
    save_image(tmp_path / "masks/p.png", np.zeros((4, 6)))                   # drawn on the stored pixels
    msg = error(check, tmp_path, values=False)
    assert "EXIF orientation 6" in msg and "rotated 90 degrees" in msg
    assert "EXIF orientation 6" in error(data.build_dataset("folder", tmp_path, num_classes=2).__getitem__, 0)


def test_a_symlink_loop_is_reported_as_such_not_as_missing(tmp_path):
    folder_set(tmp_path, n=2)
    (tmp_path / "images/i1.png").unlink()
    os.symlink(tmp_path / "images/i1.png", tmp_path / "images/i1.png")
    msg = error(data.build_dataset, "folder", tmp_path, num_classes=2)
    assert msg.startswith(f"broken image link in {tmp_path / 'images/i1.png'}: a symlink loop")
