"""Datasets, augmentation and mask colouring for ProtoSeg.

Every dataset item is a dict:
    "image": FloatTensor 3xHxW, RGB (or BGR: channel_order) normalised with ImageNet mean/std
    "label": LongTensor HxW, train ids 0..C-1, IGNORE_INDEX (-1, labels.IGNORE_INDEX) = ignore
    "name":  str, the file path relative to its split folder, without suffix
    "modes": LongTensor HxW, synthetic only: which sub-class (mode) of its class each pixel shows, -1 = ignore
Each dataset has .num_classes, .ignore_index (-1), .class_names, .palette (C x 3 uint8) and .set_epoch(epoch).

    build_dataset(name, root, split, transform, **kw)   name: synthetic | cityscapes | ade20k | ade20k_full |
        coco_stuff | folder (kw: num_classes, ignore_value, class_names, binary_masks)
    TrainTransform(crop_size, scale, flip, jitter) (the project's), RecipeTransform(pipeline, ...) (openseg | mmseg,
        the official pipelines of transforms.py), EvalTransform(channel_order, resize, divisor)
    colorize(label, palette) -> PIL image;  trainid_to_labelid(pred) -> Cityscapes labelIds for the server

Label tables live in labels.py; reading and checking files in datafiles.py. Augmentation draws only from np.random.default_rng((seed, epoch, index)), so it
does not depend on workers or ranks and needs no worker_init_fn. Workers copy the dataset when a DataLoader
iterator starts, so call set_epoch before each epoch and keep persistent_workers=False.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import transforms
from datafiles import (LOSSY, DatasetError, ade20k_full_ids, check_same_size, map_labels, read_image, read_label,
                       unreadable_reason)
from labels import (ADE20K_CLASSES, ADE20K_FULL_CLASSES, ADE20K_FULL_LUT, ADE20K_FULL_PALETTE, ADE20K_FULL_TIF_LUT,
                    ADE20K_LUT, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS, CITYSCAPES_LUT,
                    CITYSCAPES_PALETTE, COCO_STUFF_CLASSES, COCO_STUFF_LUT, COCO_STUFF_PALETTE, IGNORE_INDEX,
                    IMAGE_EXTS, INVALID, MASK_EXTS, SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, default_palette, lookup_table)

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255  # ImageNet RGB statistics
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def colorize(label, palette, ignore_index=IGNORE_INDEX):
    """Label map (HxW ints) -> PIL RGB image. Ignore, and ids outside the palette, are black."""
    label = np.asarray(label.cpu() if torch.is_tensor(label) else label).astype(np.int64)
    colours = np.concatenate([np.asarray(palette, np.uint8), np.zeros((1, 3), np.uint8)])
    valid = (label >= 0) & (label < len(palette)) & (label != ignore_index)
    return Image.fromarray(colours[np.where(valid, label, len(palette))])


def trainid_to_labelid(pred):
    """Cityscapes train ids (HxW) -> uint8 labelIds, the format of the official evaluation server.
    Anything that is not a train id (e.g. ignore) becomes 0, 'unlabeled'."""
    pred = np.asarray(pred.cpu() if torch.is_tensor(pred) else pred).astype(np.int64)
    lut = np.array(CITYSCAPES_LABEL_IDS + [0], np.uint8)
    return lut[np.where((pred >= 0) & (pred < 19), pred, 19)]


# ---------------------------------------------------------------------------------------------------------
# Transforms: callables (image HxWx3 uint8, [masks HxW int], rng) -> (FloatTensor 3xhxw, [LongTensor hxw])

def normalize(image, channel_order="rgb"):
    """HxWx3 RGB (0..255) -> 3xHxW float tensor with ImageNet mean/std. channel_order "bgr" (what the
    ProtoSeg release was trained on): the channels reversed first, then the same mean/std, as openseg's cv2 input and its
    Normalize(255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) give to B, G, R."""
    image = image[..., ::-1] if channel_order == "bgr" else image
    return torch.from_numpy(((image - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))


class EvalTransform:
    """Whole image, normalised; nothing random. resize (long, short): the image rescaled to fit, keeping its
    ratio (mmseg's test Resize, cv2 bilinear), then up to a multiple of divisor (SegFormer's AlignedResize); the
    label keeps its size (the scores are resized back to it)."""

    def __init__(self, channel_order="rgb", resize=(0, 0), divisor=0):
        self.channel_order, self.resize, self.divisor = channel_order, tuple(resize), divisor

    def __call__(self, image, masks, rng=None):
        if self.resize[0]:
            size, aligned = transforms.mmseg_test_size(image.shape[1], image.shape[0], self.resize, self.divisor)
            image = transforms.resize(image, size)
            image = transforms.resize(image, aligned) if aligned else image
        return normalize(image.astype(np.float32), self.channel_order), \
            [torch.from_numpy(m.astype(np.int64)) for m in masks]


class TrainTransform:
    """Random scale, random crop (padded with ignore / the mean colour), horizontal flip, colour jitter."""

    def __init__(self, crop_size=(512, 1024), scale=(0.5, 2.0), flip=True, jitter=0.1, channel_order="rgb"):
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)  # (h, w)
        self.scale, self.flip, self.jitter, self.channel_order = scale, flip, jitter, channel_order

    def __call__(self, image, masks, rng):
        (h, w), (ch, cw) = image.shape[:2], self.crop
        s = rng.uniform(*self.scale)
        sh, sw = max(1, round(h * s)), max(1, round(w * s))  # scaled size
        th, tw = min(ch, sh), min(cw, sw)  # part of the crop the image covers; the rest is padding
        y0, x0 = rng.integers(sh - th + 1), rng.integers(sw - tw + 1)
        # Resample only the crop window: PIL's box= gives the pixels of scale-then-crop at a fraction of the cost.
        box = (x0 * w / sw, y0 * h / sh, (x0 + tw) * w / sw, (y0 + th) * h / sh)
        image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR, box=box), np.float32)
        masks = [np.asarray(Image.fromarray(m.astype(np.int32)).resize((tw, th), Image.NEAREST, box=box)) for m in masks]
        if self.flip and rng.random() < 0.5:
            image, masks = image[:, ::-1], [m[:, ::-1] for m in masks]
        if self.jitter:
            j = self.jitter  # brightness, contrast and saturation factors
            b, c, sat = rng.uniform(1 - j, 1 + j, 3).astype(np.float32)
            image = image * b
            grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
            image = (image - grey.mean()) * c + grey.mean()
            grey = (grey - grey.mean()) * c + grey.mean()
            image = (grey[..., None] + (image - grey[..., None]) * sat).clip(0, 255)
        pad = (0, cw - tw, 0, ch - th)  # right, bottom; the image gets 0 = the mean colour after normalising
        masks = [torch.nn.functional.pad(torch.from_numpy(m.astype(np.int64)), pad, value=IGNORE_INDEX) for m in masks]
        return torch.nn.functional.pad(normalize(image, self.channel_order), pad), masks


class RecipeTransform:
    """An official training pipeline (transforms.py): "openseg" (ProtoSeg Cityscapes: resize x aspect, bicubic,
    crop, flip, brightness shift, pad at a random offset) or "mmseg" (Resize to img_scale x ratio, cat_max_ratio
    crop, flip, PhotoMetricDistortion, pad bottom/right). Padding: 0 (the mean colour) and ignore."""

    def __init__(self, pipeline, crop_size, scale=(0.5, 2.0), flip=True, aspect=(0.9, 1.1), img_scale=(2048, 512),
                 cat_max_ratio=0.75, channel_order="rgb"):
        self.pipeline, self.crop, self.scale, self.flip = pipeline, tuple(crop_size), tuple(scale), flip
        self.aspect, self.img_scale, self.cat_max_ratio = tuple(aspect), tuple(img_scale), cat_max_ratio
        self.channel_order = channel_order

    def __call__(self, image, masks, rng):
        (ch, cw), top, left = self.crop, 0, 0
        if self.pipeline == "openseg":
            image, masks, (top, left) = transforms.openseg_train(image, masks, rng, self.crop, self.scale,
                                                                 self.aspect, self.flip)
        else:
            image, masks = transforms.mmseg_train(image, masks, rng, self.crop, self.img_scale, self.scale,
                                                  self.cat_max_ratio, self.flip, IGNORE_INDEX)
        h, w = image.shape[:2]
        pad = (left, cw - w - left, top, ch - h - top)
        masks = [torch.nn.functional.pad(torch.from_numpy(m.astype(np.int64)), pad, value=IGNORE_INDEX) for m in masks]
        return torch.nn.functional.pad(normalize(image.astype(np.float32), self.channel_order), pad), masks


def train_transform(pipeline, crop, scale, flip, channel_order="rgb", **recipe):
    """The training transform a setting names: "project" (TrainTransform) or an official one (RecipeTransform)."""
    if pipeline == "project":
        return TrainTransform(crop, scale, flip, channel_order=channel_order)
    return RecipeTransform(pipeline, crop, scale, flip, channel_order=channel_order, **recipe)


# ---------------------------------------------------------------------------------------------------------
# Datasets

class SegDataset(torch.utils.data.Dataset):
    """Common part. Subclasses set class_names, palette and define load(i) -> (image, [label, ...], name)."""
    ignore_index = IGNORE_INDEX

    def __init__(self, transform=None, seed=0):
        self.transform, self.seed, self.epoch = transform or EvalTransform(), seed, 0

    @property
    def num_classes(self):
        return len(self.class_names)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        image, masks, name = self.load(i)
        rng = np.random.default_rng((self.seed, self.epoch, i))  # augmentation: a function of (seed, epoch, index)
        image, masks = self.transform(image, masks, rng)
        out = {"image": image, "label": masks[0], "name": name}
        if len(masks) > 1:
            out["modes"] = masks[1]
        return out


def _match(imgs, lbls, img_dir, lbl_dir, layout):
    """[(name, image path, label path)] from {name: path} of images and of labels; unpaired files are errors."""
    if not imgs:
        raise DatasetError(f"no images in {img_dir}: none found, expected {layout}; check --data-root and the split")
    for kind, have, other, d in (("image", imgs, lbls, lbl_dir), ("label", lbls, imgs, img_dir)):
        alone = sorted(have.keys() - other.keys())
        if alone:
            more = f" ({len(alone) - 1} more like it)" if len(alone) > 1 else ""
            raise DatasetError(f"unpaired {kind} in {have[alone[0]]}: no {'label' if kind == 'image' else 'image'} "
                               f"named {alone[0]} in {d}{more}, expected {layout}; add it or remove the {kind}")
    return [(k, imgs[k], lbls[k]) for k in sorted(imgs)]


def _require_folders(root, layout, *folders):
    for d in folders:
        if not d.is_dir():
            raise DatasetError(f"missing folder in {root}: no {d.relative_to(root)}, expected {layout}; point "
                               f"--data-root at the folder that holds this layout")


def _pairs(root, img_dir, lbl_dir, img_pat, lbl_pat, layout):
    """Pairs matched by path relative to the folder minus the glob pattern's suffix."""
    _require_folders(root, layout, img_dir, lbl_dir)

    def index(d, pat):
        suffix = pat.rsplit("*", 1)[1]
        return {str(p.relative_to(d))[:-len(suffix)]: p for p in d.glob(pat)}
    return _match(index(img_dir, img_pat), index(lbl_dir, lbl_pat), img_dir, lbl_dir, layout)


class FileDataset(SegDataset):
    """Image/label file pairs; raw label values go through `lut` (map_labels); `rule` says which are valid and how
    to fix a file. rgb_ids: see read_label."""

    def __init__(self, pairs, class_names, palette, lut, rule, transform=None, seed=0, rgb_ids=None):
        super().__init__(transform, seed)
        self.pairs, self.class_names, self.palette, self.lut, self.rule = pairs, class_names, palette, lut, rule
        self.rgb_ids, self.binary_hint = rgb_ids, False

    def __len__(self):
        return len(self.pairs)

    def load(self, i):
        name, ip, lp = self.pairs[i]
        image, raw = read_image(ip), read_label(lp, self.rgb_ids)
        check_same_size(ip, lp, image.shape[1::-1], raw.shape[1::-1])
        return image, [map_labels(raw, self.lut, lp, self.rule)], name


def cityscapes(root, split="train", transform=None, seed=0):
    root = Path(root)
    layout = "root/leftImg8bit/{split}/{city}/*_leftImg8bit.png with root/gtFine/{split}/{city}/*_gtFine_labelIds.png"
    pairs = _pairs(root, root / "leftImg8bit" / split, root / "gtFine" / split,
                   "*/*_leftImg8bit.png", "*/*_gtFine_labelIds.png", layout)
    rule = "Cityscapes labelIds 0..33; use the gtFine *_labelIds.png files unchanged"
    return FileDataset(pairs, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CITYSCAPES_LUT, rule, transform, seed)


def ade20k(root, split="train", transform=None, seed=0):
    root = Path(root)
    root = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    sub = {"train": "training", "val": "validation"}.get(split, split)
    layout = "root/images/{training,validation}/*.jpg with root/annotations/{training,validation}/*.png"
    pairs = _pairs(root, root / "images" / sub, root / "annotations" / sub, "*.jpg", "*.png", layout)
    rule = "0 (other, ignored) and classes 1..150; use the ADEChallengeData2016 annotations unchanged"
    return FileDataset(pairs, ADE20K_CLASSES, ADE20K_PALETTE, ADE20K_LUT, rule, transform, seed)


def ade20k_full(root, split="train", transform=None, seed=0):
    """ADE20K-Full, 847 classes: MaskFormer's converted copy where root/annotations_detectron2 exists (uint16
    train ids, 65535 = ignore; images resized to a short side <= 512), else the ADE20K_2021_17_01 release as
    downloaded (class R // 10 * 256 + G of <name>_seg.png; ids outside the 847 are ignored)."""
    root = Path(root)
    root = root / "ADE20K_2021_17_01" if (root / "ADE20K_2021_17_01").is_dir() else root
    sub = {"train": "training", "val": "validation"}.get(split, split)
    layout = ("root/images/ADE/{training,validation}/<scene folders>/NAME.jpg with NAME_seg.png beside it "
              "(ADE20K_2021_17_01), or root/images_detectron2/{training,validation}/NAME.jpg with "
              "root/annotations_detectron2/{training,validation}/NAME.tif (MaskFormer)")
    if (root / "annotations_detectron2" / sub).is_dir():
        pairs = _pairs(root, root / "images_detectron2" / sub, root / "annotations_detectron2" / sub,
                       "*.jpg", "*.tif", layout)
        rule = "train ids 0..846 and 65535 (ignore); rerun MaskFormer's prepare_ade20k_full_sem_seg.py"
        return FileDataset(pairs, ADE20K_FULL_CLASSES, ADE20K_FULL_PALETTE, ADE20K_FULL_TIF_LUT, rule, transform,
                           seed)
    folder_ = root / "images" / "ADE" / sub
    pairs = _pairs(root, folder_, folder_, "**/*.jpg", "**/*_seg.png", layout)
    return FileDataset(pairs, ADE20K_FULL_CLASSES, ADE20K_FULL_PALETTE, ADE20K_FULL_LUT, "any RGB", transform, seed,
                       rgb_ids=ade20k_full_ids)


def coco_stuff(root, split="train", transform=None, seed=0):
    root, sub = Path(root), {"train": "train2017", "val": "val2017"}.get(split, split)
    layout = "root/images/{train2017,val2017}/*.jpg with root/annotations/{train2017,val2017}/*.png (stuffthingmaps)"
    pairs = _pairs(root, root / "images" / sub, root / "annotations" / sub, "*.jpg", "*.png", layout)
    rule = "stuffthingmaps values 0..181 and 255 (ignore); use stuffthingmaps_trainval2017 unchanged"
    return FileDataset(pairs, COCO_STUFF_CLASSES, COCO_STUFF_PALETTE, COCO_STUFF_LUT, rule, transform, seed)




def _by_name(d, exts, what):
    """{name: path} of the files in d with an extension (any case) in exts; two files with one name are an error."""
    found = {}
    for p in sorted(d.iterdir()):
        ext = p.suffix.lower()
        if p.is_symlink() and not p.exists() and ext in exts:  # a loop or a dangling link: not a missing file
            raise DatasetError(f"broken {what} link in {p}: {unreadable_reason(p)}, expected a link to an {what} file; "
                               "fix or remove the link")
        if p.name.startswith(".") or not p.is_file():  # hidden files, e.g. macOS ._NAME.png
            continue
        if what == "mask" and ext in (".jpg", ".jpeg"):
            raise DatasetError(f"JPEG mask in {p}: {LOSSY}")
        if ext not in exts:
            continue
        if p.stem in found:
            raise DatasetError(f"two {what}s named {p.stem} in {d}: {found[p.stem].name} and {p.name}, expected one "
                               f"file per name; remove or rename one")
        found[p.stem] = p
    return found


def folder(root, split="train", transform=None, seed=0, num_classes=None, ignore_value=255, class_names=None,
           binary_masks=None):
    """Your own data: root/images/NAME.{jpg,png,tif,...} with root/masks/NAME.{png,tif,bmp} (or root/{images,masks}/
    {split}/...). Mask values are 0..num_classes-1 or ignore_value (-> IGNORE_INDEX). binary_masks=True reads 255 as
    class 1 (0/255 masks, num_classes=2); None lets check_dataset refuse masks that look like that; False: 255 is
    really ignore."""
    root = Path(root)
    if not num_classes or not 0 < num_classes <= ignore_value <= 65535 or (binary_masks and num_classes != 2):
        raise DatasetError(f"folder dataset settings in {root}: num_classes={num_classes}, ignore_value="
                           f"{ignore_value}, binary_masks={binary_masks}, expected 1 <= num_classes <= ignore_value "
                           f"<= 65535 (and num_classes 2 with binary_masks); set --num-classes and --ignore-value")
    img_dir, lbl_dir = root / "images", root / "masks"
    layout = "root/images/[{split}/]NAME.{jpg,png,tif,bmp,webp} with root/masks/[{split}/]NAME.{png,tif,bmp}"
    if (img_dir / split).is_dir():
        img_dir, lbl_dir = img_dir / split, lbl_dir / split
    elif img_dir.is_dir() and any(p.is_dir() for p in img_dir.iterdir()):
        raise DatasetError(f"missing folder in {img_dir}: no {split}/ beside the other split folders, expected "
                           f"{layout}; add {split}/ or use a flat layout")
    _require_folders(root, layout, img_dir, lbl_dir)
    pairs = _match(_by_name(img_dir, IMAGE_EXTS, "image"), _by_name(lbl_dir, MASK_EXTS, "mask"), img_dir, lbl_dir,
                   layout)
    mapping = {**{v: v for v in range(num_classes)}, ignore_value: IGNORE_INDEX, **({255: 1} if binary_masks else {})}
    lut = lookup_table(mapping, INVALID, max(256, ignore_value + 1))
    rule = f"classes 0..{num_classes - 1} and ignore {ignore_value}; set --num-classes and --ignore-value to match"
    rule += " (or --binary-masks for 0/255 masks)" if num_classes == 2 and not binary_masks else ""
    names = class_names or [f"class{i}" for i in range(num_classes)]
    ds = FileDataset(pairs, names, default_palette(num_classes), lut, rule, transform, seed)
    ds.binary_hint = num_classes == 2 and ignore_value == 255 and binary_masks is None
    return ds


# ---------------------------------------------------------------------------------------------------------
# Synthetic scenes: the default dataset, drawn from (seed, split, index); no files.
# Object class c (1..4) in mode m (0..2) is painted colour (c - 1 + m) % 4 with texture m (solid, checker,
# stripes): each colour is used by three classes and each texture by all four, so only the pair decides the class
# and every class is three distinct-looking sub-classes, the case K prototypes per class are for. Shapes (disc,
# square, triangle) are random and carry no class information. Background modes: 0 grain, 1 gradient, 2 blotches.
_COLOURS = np.array([[205, 45, 45], [45, 175, 65], [50, 85, 215], [220, 195, 40]], np.float32)  # R G B Y


def synthesize(rng, size=160):
    """One scene -> (image HxWx3 uint8, label HxW uint8, modes HxW uint8)."""
    S = size
    yy, xx = np.mgrid[:S, :S].astype(np.float32)
    bm = int(rng.integers(3))
    if bm == 0:
        img = rng.uniform(70, 180) + rng.normal(0, 20, (S, S, 1)).astype(np.float32) + np.zeros(3, np.float32)
    elif bm == 1:
        (a, b), th = rng.uniform(60, 200, 2)[:, None] + rng.normal(0, 12, (2, 3)), rng.uniform(0, 2 * np.pi)
        t = ((xx - S / 2) * np.cos(th) + (yy - S / 2) * np.sin(th)) / S + 0.5
        img = (a + (b - a) * t[..., None]).astype(np.float32)
    else:
        small = rng.uniform(50, 210, (5, 5, 1)) + rng.normal(0, 12, (5, 5, 3))
        img = np.asarray(Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((S, S), Image.BILINEAR),
                         np.float32)
    label, modes = np.zeros((S, S), np.uint8), np.full((S, S), bm, np.uint8)
    for _ in range(rng.integers(2, 6)):
        c, m, shape = rng.integers(1, 5), rng.integers(3), rng.integers(3)
        r, cy, cx, th = rng.uniform(15, 36), rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0, np.pi)
        e = 1.2 * r + 2  # bounding box half size
        y0, y1, x0, x1 = (int(np.clip(v, 0, S)) for v in (cy - e, cy + e, cx - e, cx + e))
        y, x = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u, v = x * np.cos(th) + y * np.sin(th), y * np.cos(th) - x * np.sin(th)  # object frame
        if shape == 0:
            inside = u * u + v * v < r * r
        elif shape == 1:
            inside = (np.abs(u) < 0.8 * r) & (np.abs(v) < 0.8 * r)
        else:  # equilateral triangle with circumradius 1.2 r
            inside = np.all([u * np.cos(a) + v * np.sin(a) < 0.6 * r for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)], 0)
        p, ph = rng.uniform(5, 7), rng.uniform(0, 14, 2)  # texture half period and phase; axis-aligned
        ty, tx = np.floor((yy[y0:y1, x0:x1] + ph[0]) / p), np.floor((xx[y0:y1, x0:x1] + ph[1]) / p)
        t = [0 * tx, (ty + tx) % 2, ty % 2][m]  # solid, checker, horizontal stripes
        colour = _COLOURS[(c - 1 + m) % 4] + rng.normal(0, 10, 3).astype(np.float32)
        img[y0:y1, x0:x1][inside] = (colour * (1 - 0.5 * t[..., None]))[inside]
        label[y0:y1, x0:x1][inside], modes[y0:y1, x0:x1][inside] = c, m
    img += rng.normal(0, 6, (S, S, 3)).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8), label, modes


class SyntheticDataset(SegDataset):
    """Procedural scenes; the split picks a separate seed stream, so train and val never share a scene.
    fine=True: the label is the mode-level class c * 3 + m (15 fine classes; for pretraining a backbone)."""
    class_names, palette = SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

    def __init__(self, split="train", transform=None, seed=0, length=None, size=160, fine=False):
        if split not in ("train", "val", "test"):
            raise DatasetError(f"unknown split in synthetic dataset: {split!r}, expected train, val or test; pass one")
        super().__init__(transform, seed)
        self.split, self.size, self.fine = split, size, fine
        self.length = length or (2000 if split == "train" else 100)
        if fine:
            self.class_names = [f"{c}{m}" for c in SYNTHETIC_CLASSES for m in range(3)]
            self.palette = default_palette(len(self.class_names))

    def __len__(self):
        return self.length

    def load(self, i):
        # 4 words ending in 7: never equal to an augmentation stream (seed, epoch, i) = (seed, epoch, i, 0)
        rng = np.random.default_rng((self.seed, ("train", "val", "test").index(self.split), i, 7))
        image, label, modes = synthesize(rng, self.size)
        if self.fine:
            label = label * 3 + modes                                   # fine class c * 3 + m
        return image, [label, modes], f"{self.split}_{i:06d}"


def build_dataset(name, root=None, split="train", transform=None, **kw):
    """name: synthetic (default, no root) | synthetic_modes (its 15 mode-level classes) | cityscapes | ade20k |
    ade20k_full | coco_stuff | folder (kw: num_classes, ignore_value, class_names, binary_masks)."""
    builders = {"cityscapes": cityscapes, "ade20k": ade20k, "ade20k_full": ade20k_full, "coco_stuff": coco_stuff,
                "folder": folder}
    if name in ("synthetic", "synthetic_modes"):
        return SyntheticDataset(split, transform, fine=name == "synthetic_modes", **kw)
    if name not in builders:
        raise DatasetError(f"unknown dataset in --dataset: {name!r}, expected one of synthetic, synthetic_modes, "
                           f"{', '.join(builders)}; pick one")
    if root is None:
        raise DatasetError(f"missing data root in --data-root: none given, expected the folder holding {name!r}; "
                           f"pass --data-root")
    return builders[name](root, split, transform, **kw)

