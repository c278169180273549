"""Datasets, label tables, augmentation and mask colouring for ProtoSeg.

Every dataset item is a dict:
    "image": FloatTensor 3xHxW, RGB normalised with ImageNet mean/std
    "label": LongTensor HxW, train ids 0..C-1, IGNORE (-1, protoseg.IGNORE_INDEX) = ignore
    "name":  str, the file path relative to its split folder, without suffix
    "modes": LongTensor HxW, synthetic only: which sub-class (mode) of its class each pixel shows, -1 = ignore
Each dataset has .num_classes, .ignore_index (-1), .class_names, .palette (C x 3 uint8) and .set_epoch(epoch).

    build_dataset(name, root, split, transform, **kw)   name: synthetic | cityscapes | ade20k | coco_stuff | folder
    TrainTransform(crop_size, scale, flip, jitter), EvalTransform()
    colorize(label, palette) -> PIL image;  trainid_to_labelid(pred) -> Cityscapes labelIds for the server

Augmentation draws only from np.random.default_rng((seed, epoch, index)), so it does not depend on workers or
ranks and needs no worker_init_fn. Workers copy the dataset when a DataLoader iterator starts, so call
set_epoch before each epoch and keep persistent_workers=False.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protoseg import IGNORE_INDEX as IGNORE  # -1: raw files use 255 / 65535 / 0, mapped to this
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255  # ImageNet RGB statistics
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


class DatasetError(ValueError):
    """Something wrong with the data on disk; the message names the file or folder to fix."""


def _hex_palette(s):
    return np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in s.split()], np.uint8)


INVALID = -2  # lut entry of a raw value that is neither a class nor ignore: an error in the data


def _lut(mapping, default, size=256):
    """Raw label value -> train id (int32). One extra last entry, INVALID, catches values >= size."""
    lut = np.full(size + 1, default, np.int32)
    lut[list(mapping)] = list(mapping.values())
    lut[-1] = INVALID
    return lut


# ---------------------------------------------------------------------------------------------------------
# Label tables (facts copied from the official releases, see shared/reference/README.md)

# Cityscapes (cityscapesScripts 2.3.0): the 19 train classes and their labelIds; every other id -> ignore.
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_PALETTE = _hex_palette(
    "804080 f423e8 464646 66669c be9999 999999 faaa1e dcdc00 6b8e23 98fb98 4682b4 dc143c ff0000 00008e 000046 "
    "003c64 005064 0000e6 770b20 ")
CITYSCAPES_LUT = _lut(dict(zip(CITYSCAPES_LABEL_IDS, range(19))), default=IGNORE)

# ADE20K-150 (mmseg ade.py; "bed " keeps its trailing space): PNG 0 = other -> ignore, v in 1..150 -> v - 1.
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
ADE20K_PALETTE = _hex_palette(
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d 787846 08ff33 ff0652 "
    "8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 "
    "ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff "
    "8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff 0bc8c8 ff5200 00fff5 003dff "
    "00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff "
    "ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 000aff 0070ff 3300ff 00c2ff 007aff "
    "00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070 "
    "5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 "
    "0abed4 d6ff00 00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 005cff "
    "b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff ")
ADE20K_LUT = _lut({0: IGNORE, **{v: v - 1 for v in range(1, 151)}}, default=INVALID)

# COCO-Stuff-164k stuffthingmaps (mmseg coco_stuff.py / coco_stuff164k.py): PNG values 0..181 are the
# cocostuff labels.txt id - 1; the 171 used ones map to 0..170 in order, the 11 unused thing ids and 255 -> ignore.
COCO_STUFF_UNUSED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
COCO_STUFF_RAW_IDS = [v for v in range(182) if v not in COCO_STUFF_UNUSED]
COCO_STUFF_LUT = _lut(dict(zip(COCO_STUFF_RAW_IDS, range(171))), default=IGNORE)
COCO_STUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner",
    "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
]
COCO_STUFF_PALETTE = _hex_palette(
    "00c040 00c040 004060 80c0c0 004040 00c0e0 00c0c0 80c040 00c060 80c040 8020c0 0000e0 000040 00a0c0 800060 8000c0 "
    "0020c0 8080e0 0000c0 80a0c0 808000 800020 802000 800080 408020 00a000 000000 c080a0 002000 008080 4080a0 80a000 "
    "008000 c08020 806080 000080 400020 00e080 800000 c000a0 006080 808080 4000a0 80e080 808040 c00020 806000 8000c0 "
    "008020 40e000 000040 8080a0 406000 0080c0 0080a0 c0e000 008040 808020 c02080 0040c0 000020 40a080 804040 8000a0 "
    "402080 80c0c0 0000a0 c0a080 80c000 800060 c02000 804080 408060 40a000 004000 c080e0 402000 00c080 4080e0 c0a000 "
    "00c000 c08060 c06080 004080 400060 40e080 804000 c000e0 406080 80c080 4000e0 c0e080 80c040 c00060 c06000 8040c0 "
    "008060 00e000 404040 8080e0 006000 40c0c0 0080e0 80e000 40c040 808060 802080 4000c0 004060 00a080 c00040 8040e0 "
    "002080 c080c0 0040e0 80a080 c08000 804020 802040 c00080 40c020 00a040 400000 c0c0a0 002040 408080 40c0a0 80a040 "
    "408000 c0c020 8060c0 400080 404020 00e0c0 c00000 c040a0 0060c0 c08080 4040a0 80e0c0 c08040 c04020 806040 c000c0 "
    "00c020 40e040 400040 80c0a0 406040 4080c0 00c0a0 c0e040 408040 80c020 c020c0 4040c0 004020 40a0c0 c04040 8040a0 "
    "4020c0 c0c0c0 0040a0 c0a0c0 c0c000 804060 c02040 c04080 40c060 40a040 404000 ")


def map_labels(raw, lut, path, rule):
    """The one place that turns dataset label ids into train ids (int32, IGNORE = ignore); lut from _lut."""
    if raw.ndim != 2:
        raise DatasetError(f"{path}: a label map must have one channel, got shape {raw.shape}")
    out = lut[raw if raw.max() < len(lut) else np.minimum(raw, len(lut) - 1)]
    if (out == INVALID).any():
        bad = np.unique(raw[out == INVALID]).tolist()
        raise DatasetError(f"{path}: label values {bad[:20]} are not allowed ({rule})")
    return out


def colorize(label, palette, ignore_index=IGNORE):
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

def normalize(image):
    """HxWx3 RGB (0..255) -> 3xHxW float tensor with ImageNet mean/std."""
    return torch.from_numpy(((image - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))


class EvalTransform:
    """Whole image, normalised; nothing random."""

    def __call__(self, image, masks, rng=None):
        return normalize(image), [torch.from_numpy(m.astype(np.int64)) for m in masks]


class TrainTransform:
    """Random scale, random crop (padded with ignore / the mean colour), horizontal flip, colour jitter."""

    def __init__(self, crop_size=(512, 1024), scale=(0.5, 2.0), flip=True, jitter=0.1):
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)  # (h, w)
        self.scale, self.flip, self.jitter = scale, flip, jitter

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
        masks = [torch.nn.functional.pad(torch.from_numpy(m.astype(np.int64)), pad, value=IGNORE) for m in masks]
        return torch.nn.functional.pad(normalize(image), pad), masks


# ---------------------------------------------------------------------------------------------------------
# Datasets

class SegDataset(torch.utils.data.Dataset):
    """Common part. Subclasses set class_names, palette and define load(i) -> (image, [label, ...], name)."""
    ignore_index = IGNORE

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


def _read(path, mode=None):
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for missing, truncated or foreign files
        raise DatasetError(f"cannot read {path}: {e}") from e


def _pairs(img_dir, lbl_dir, img_pats, lbl_pats, layout):
    """[(name, image path, label path)], matched by path relative to the folder minus the pattern's suffix."""
    for d in (img_dir, lbl_dir):
        if not d.is_dir():
            raise DatasetError(f"folder not found: {d}\nexpected layout:\n{layout}")

    def index(d, pats):
        found = {}
        for pat in pats:
            suffix = pat.rsplit("*", 1)[1]
            found.update({str(p.relative_to(d))[:-len(suffix)]: p for p in d.glob(pat)})
        return found

    imgs, lbls = index(img_dir, img_pats), index(lbl_dir, lbl_pats)
    if not imgs:
        raise DatasetError(f"no images matching {img_pats} in {img_dir}\nexpected layout:\n{layout}")
    for k in sorted(imgs.keys() - lbls.keys()):
        raise DatasetError(f"image {imgs[k]} has no label matching {lbl_pats} in {lbl_dir}")
    for k in sorted(lbls.keys() - imgs.keys()):
        raise DatasetError(f"label {lbls[k]} has no image matching {img_pats} in {img_dir}")
    return [(k, imgs[k], lbls[k]) for k in sorted(imgs)]


class FileDataset(SegDataset):
    """Image/label file pairs; raw label values go through `lut` (map_labels); `rule` explains the valid ones."""

    def __init__(self, pairs, class_names, palette, lut, rule, transform=None, seed=0):
        super().__init__(transform, seed)
        self.pairs, self.class_names, self.palette, self.lut, self.rule = pairs, class_names, palette, lut, rule

    def __len__(self):
        return len(self.pairs)

    def load(self, i):
        name, ip, lp = self.pairs[i]
        image, raw = _read(ip, "RGB"), _read(lp)
        if image.shape[:2] != raw.shape[:2]:
            raise DatasetError(f"{lp}: label size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from "
                               f"image size {image.shape[1]}x{image.shape[0]} of {ip}")
        return image, [map_labels(raw, self.lut, lp, self.rule)], name


def cityscapes(root, split="train", transform=None, seed=0):
    root, layout = Path(root), ("  root/leftImg8bit/{split}/{city}/*_leftImg8bit.png\n"
                                "  root/gtFine/{split}/{city}/*_gtFine_labelIds.png")
    pairs = _pairs(root / "leftImg8bit" / split, root / "gtFine" / split,
                   ["*/*_leftImg8bit.png"], ["*/*_gtFine_labelIds.png"], layout)
    return FileDataset(pairs, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CITYSCAPES_LUT, "labelIds", transform, seed)


def ade20k(root, split="train", transform=None, seed=0):
    root = Path(root)
    root = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    sub = {"train": "training", "val": "validation"}.get(split, split)
    layout = "  root/images/{training,validation}/*.jpg\n  root/annotations/{training,validation}/*.png"
    pairs = _pairs(root / "images" / sub, root / "annotations" / sub, ["*.jpg"], ["*.png"], layout)
    rule = "ADE20K annotations hold 0 (other, ignored) and classes 1..150"
    return FileDataset(pairs, ADE20K_CLASSES, ADE20K_PALETTE, ADE20K_LUT, rule, transform, seed)


def coco_stuff(root, split="train", transform=None, seed=0):
    root, sub = Path(root), {"train": "train2017", "val": "val2017"}.get(split, split)
    layout = "  root/images/{train2017,val2017}/*.jpg\n  root/annotations/{train2017,val2017}/*.png (stuffthingmaps)"
    pairs = _pairs(root / "images" / sub, root / "annotations" / sub, ["*.jpg"], ["*.png"], layout)
    rule = "stuffthingmaps hold 0..181 and 255"
    return FileDataset(pairs, COCO_STUFF_CLASSES, COCO_STUFF_PALETTE, COCO_STUFF_LUT, rule, transform, seed)


def default_palette(n):
    """Deterministic distinct colours (the PASCAL VOC bit pattern, starting after black)."""
    c, k = np.arange(1, n + 1)[:, None], np.arange(3)
    return sum(((c >> (3 * j + k)) & 1) << (7 - j) for j in range(8)).astype(np.uint8)


def folder(root, split="train", transform=None, seed=0, num_classes=None, ignore_value=255, class_names=None):
    """Your own data: root/images/X.jpg|png with root/masks/X.png (or root/{images,masks}/{split}/...).
    Mask values are 0..num_classes-1 or ignore_value (which becomes IGNORE)."""
    if not num_classes or not 0 < num_classes <= 255 or ignore_value < num_classes:
        raise DatasetError(f"folder dataset: need 1 <= num_classes <= 255 and ignore_value >= num_classes, "
                           f"got num_classes={num_classes}, ignore_value={ignore_value}")
    root = Path(root)
    img_dir, lbl_dir = root / "images", root / "masks"
    layout = "  root/images/[{split}/]NAME.{jpg,png,...}\n  root/masks/[{split}/]NAME.png"
    if (img_dir / split).is_dir():
        img_dir, lbl_dir = img_dir / split, lbl_dir / split
    elif img_dir.is_dir() and any(p.is_dir() for p in img_dir.iterdir()):
        raise DatasetError(f"split folder not found: {img_dir / split}\nexpected layout:\n{layout}")
    exts = ["*.jpg", "*.jpeg", "*.png", "*.bmp", "*.tif", "*.tiff", "*.JPG", "*.JPEG", "*.PNG"]
    pairs = _pairs(img_dir, lbl_dir, exts, exts, layout)
    lut = _lut({**{v: v for v in range(num_classes)}, ignore_value: IGNORE}, INVALID, max(256, ignore_value + 1))
    rule = f"classes are 0..{num_classes - 1}, ignore is {ignore_value}"
    names = class_names or [f"class{i}" for i in range(num_classes)]
    return FileDataset(pairs, names, default_palette(num_classes), lut, rule, transform, seed)


# ---------------------------------------------------------------------------------------------------------
# Synthetic scenes: the default dataset, drawn from (seed, split, index); no files.
# Object class c (1..4) in mode m (0..2) is painted colour (c - 1 + m) % 4 with texture m (solid, checker,
# stripes): each colour is used by three classes and each texture by all four, so only the pair decides the class
# and every class is three distinct-looking sub-classes, the case K prototypes per class are for. Shapes (disc,
# square, triangle) are random and carry no class information. Background modes: 0 grain, 1 gradient, 2 blotches.
SYNTHETIC_CLASSES = ["background", "alpha", "beta", "gamma", "delta"]
SYNTHETIC_MODES = [3, 3, 3, 3, 3]
SYNTHETIC_PALETTE = _hex_palette("808080 9131b4 f58231 46f0f0 f032e6")
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
            raise DatasetError(f"synthetic split must be train, val or test, got {split!r}")
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
    coco_stuff | folder (kw: num_classes, ...)."""
    builders = {"cityscapes": cityscapes, "ade20k": ade20k, "coco_stuff": coco_stuff, "folder": folder}
    if name in ("synthetic", "synthetic_modes"):
        return SyntheticDataset(split, transform, fine=name == "synthetic_modes", **kw)
    if name not in builders:
        raise DatasetError(f"unknown dataset {name!r}; choose from synthetic, synthetic_modes, {', '.join(builders)}")
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a data root")
    return builders[name](root, split, transform, **kw)
