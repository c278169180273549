"""The official training pipelines, written from their definitions with numpy (imports nothing of the project).

    openseg  tfzhou/ProtoSeg configs/cityscapes/H_48_D_4_proto.json + openseg's cv2_aug_transforms.py and collate:
             random_resize (scale U(0.5, 2) x aspect U(0.9, 1.1), bicubic) -> random_crop -> random_hflip ->
             random_brightness (one integer shift U{-10..10}) -> ToTensor/Normalize -> pad to the crop, random offset
    mmseg    mmsegmentation 0.x pipelines/transforms.py (the SegFormer / Swin configs and the mmseg baselines):
             Resize(img_scale, ratio_range, keep_ratio) -> RandomCrop(cat_max_ratio 0.75) -> RandomFlip(0.5) ->
             PhotoMetricDistortion -> Normalize -> Pad(crop, 0, ignore)

Images are HxWx3 uint8 RGB here (both official codes read BGR with cv2; the HSV steps name R, G, B explicitly,
so the arithmetic is the same). Every random draw comes from the numpy Generator `rng` the dataset passes, so
augmentation is a function of (seed, epoch, index). Resizing follows cv2.resize, which both codes call: sample
points (d + 0.5) * src / dst - 0.5, border replicated, no antialiasing (PIL's resize antialiases when shrinking and
its bicubic has a = -0.5; cv2's has a = -0.75), computed in float: cv2's 11-bit fixed point for uint8 differs by
at most one grey level. Only the crop window is resampled: each output pixel depends on its position alone, so
this equals resize-then-crop.
"""
import numpy as np

CUBIC_A = -0.75                                       # cv2 INTER_CUBIC's kernel parameter


def cubic_weights(f):
    """cv2 interpolateCubic: the 4 tap weights for offsets -1, 0, 1, 2 at fraction f. (n,) -> (n, 4)."""
    A = CUBIC_A
    w0 = ((A * (f + 1) - 5 * A) * (f + 1) + 8 * A) * (f + 1) - 4 * A
    w1 = ((A + 2) * f - (A + 3)) * f * f + 1
    w2 = ((A + 2) * (1 - f) - (A + 3)) * (1 - f) * (1 - f) + 1
    return np.stack([w0, w1, w2, 1 - w0 - w1 - w2], 1)


def taps(n_src, n_dst, start, stop, kind):
    """Source indices and weights (n, T) of output pixels start..stop-1 of a cv2 resize n_src -> n_dst."""
    x = (np.arange(start, stop, dtype=np.float64) + 0.5) * (n_src / n_dst) - 0.5
    i0 = np.floor(x)
    f = x - i0
    offsets, w = ((0, 1), np.stack([1 - f, f], 1)) if kind == "linear" else ((-1, 0, 1, 2), cubic_weights(f))
    return np.clip(i0[:, None] + np.array(offsets), 0, n_src - 1).astype(np.int64), w.astype(np.float32)


def resize(image, size, kind="linear", window=None):
    """cv2.resize of HxWxC uint8 to size (w, h), INTER_LINEAR or INTER_CUBIC, rounded and clipped to uint8 as cv2
    saturates; window (x0, y0, x1, y1) of the output only (default all)."""
    (H, W), (w, h) = image.shape[:2], size
    x0, y0, x1, y1 = window or (0, 0, w, h)
    iy, wy = taps(H, h, y0, y1, kind)
    ix, wx = taps(W, w, x0, x1, kind)
    lo, hi = ix.min(), ix.max() + 1                   # the source columns this window reads
    src = image[:, lo:hi].astype(np.float32)
    rows = sum(src[iy[:, t]] * wy[:, t, None, None] for t in range(iy.shape[1]))            # (ny, cols, C)
    out = sum(rows[:, ix[:, t] - lo] * wx[None, :, t, None] for t in range(ix.shape[1]))    # (ny, nx, C)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_nearest(mask, size, window=None):
    """cv2 INTER_NEAREST (labels): source index min(floor(d * src / dst), src - 1), no pixel-centre shift."""
    (H, W), (w, h) = mask.shape[:2], size
    x0, y0, x1, y1 = window or (0, 0, w, h)
    iy = np.minimum(np.floor(np.arange(y0, y1) * (H / h)).astype(np.int64), H - 1)
    ix = np.minimum(np.floor(np.arange(x0, x1) * (W / w)).astype(np.int64), W - 1)
    return mask[iy[:, None], ix[None, :]]


# ----------------------------------------------------------------------------- openseg (ProtoSeg Cityscapes)

def openseg_resize_size(w, h, scale, aspect):
    """RandomResize: (int(w sqrt(a) s), int(h s / sqrt(a))), truncated as the official int()."""
    return max(1, int(w * np.sqrt(aspect) * scale)), max(1, int(h * np.sqrt(1.0 / aspect) * scale))


def brightness_shift(image, shift):
    """RandomBrightness: float + one integer shift on every channel, np.around, clip, uint8."""
    return np.clip(np.around(image.astype(np.float32) + shift), 0, 255).astype(np.uint8)


def openseg_train(image, masks, rng, crop, scale=(0.5, 2.0), aspect=(0.9, 1.1), flip=True, shift=10):
    """-> (image h x w uint8, masks, (top, left) padding offset): the official pipeline up to the collate's pad.
    crop (h, w); the caller normalises and pads the image (0) and masks (ignore) to the crop at that offset."""
    (h, w), (ch, cw) = image.shape[:2], crop
    sw, sh = openseg_resize_size(w, h, rng.uniform(*scale), rng.uniform(*aspect))
    tw, th = min(cw, sw), min(ch, sh)                 # RandomCrop: min(crop, size); randint(0, size - crop)
    x0, y0 = int(rng.integers(0, sw - tw + 1)), int(rng.integers(0, sh - th + 1))
    window = (x0, y0, x0 + tw, y0 + th)
    image = resize(image, (sw, sh), "cubic", window)
    masks = [resize_nearest(m, (sw, sh), window) for m in masks]
    if flip and rng.random() < 0.5:                   # RandomHFlip(0.5)
        image, masks = image[:, ::-1], [m[:, ::-1] for m in masks]
    if shift:
        image = brightness_shift(image, int(rng.integers(-shift, shift + 1)))
    pad = (int(rng.integers(0, ch - th + 1)), int(rng.integers(0, cw - tw + 1)))  # collate: pad_mode random
    return image, masks, pad


# ----------------------------------------------------------------------------- mmseg (SegFormer, Swin, baselines)

def rescale_size(w, h, scale):
    """mmcv.rescale_size: the largest size within scale (long, short) keeping the ratio, int(x * f + 0.5)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


def mmseg_scale(img_scale, ratio):
    """Resize.random_sample_ratio: (int(long * r), int(short * r))."""
    return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def crop_box(rng, h, w, crop):
    """RandomCrop.get_crop_bbox -> (y0, y1, x0, x1); a crop larger than the image covers all of it."""
    oy, ox = int(rng.integers(0, max(h - crop[0], 0) + 1)), int(rng.integers(0, max(w - crop[1], 0) + 1))
    return oy, oy + crop[0], ox, ox + crop[1]


def cat_max_crop(rng, label, crop, cat_max_ratio, ignore):
    """RandomCrop with cat_max_ratio: up to 10 re-draws until the crop holds >= 2 classes and none covers
    cat_max_ratio or more of its labelled pixels (ignore excluded); the 10th re-draw is kept as is."""
    box = crop_box(rng, *label.shape, crop)
    if cat_max_ratio < 1:
        for _ in range(10):
            y0, y1, x0, x1 = box
            vals, cnt = np.unique(label[y0:y1, x0:x1], return_counts=True)
            cnt = cnt[vals != ignore]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            box = crop_box(rng, *label.shape, crop)
    return box


def convert(x, alpha=1.0, beta=0.0):
    """PhotoMetricDistortion.convert: float32 * alpha + beta, clip to [0, 255], truncate to uint8."""
    return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


_SDIV = np.array([0] + [int(np.rint((255 << 12) / i)) for i in range(1, 256)], np.int64)      # cv2 sdiv_table
_HDIV = np.array([0] + [int(np.rint((180 << 12) / (6.0 * i))) for i in range(1, 256)], np.int64)  # hdiv_table180


def rgb_to_hsv(image):
    """cv2.cvtColor(BGR2HSV) for uint8 (RGB2HSV_b, 12-bit fixed point): H in 0..179, S and V in 0..255."""
    r, g, b = (image[..., i].astype(np.int64) for i in range(3))
    v, vmin = image.max(-1).astype(np.int64), image.min(-1).astype(np.int64)
    diff = v - vmin
    s = (diff * _SDIV[v] + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << 11)) >> 12
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], -1).astype(np.uint8)


_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])  # cv2: tab index of b, g, r


def hsv_to_rgb(hsv):
    """cv2.cvtColor(HSV2BGR) for uint8 as its vector path computes it (x86 build, FMA): float32 h * 6/180,
    s / 255, v / 255, sector table with 1 - s*h fused, x * 255 truncated. (cv2's scalar tail, the last < 32
    pixels of an image whose size is no multiple of the vector block, rounds instead.)"""
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180)
    s = hsv[..., 1].astype(f32) * f32(1 / 255)
    v = hsv[..., 2].astype(f32) * f32(1 / 255)
    sector = np.trunc(h)
    h = h - sector
    fused = lambda a, b: (1.0 - a.astype(np.float64) * b).astype(f32)      # one rounding, as an FMA
    tab = np.stack([v, v * (1 - s), v * fused(s, h), v * fused(s, 1 - h)], -1)
    bgr = np.take_along_axis(tab, _SECTORS[sector.astype(np.int64) % 6], -1)
    return np.clip(np.trunc(bgr[..., ::-1] * f32(255)), 0, 255).astype(np.uint8)


def photometric(image, rng, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """PhotoMetricDistortion: brightness, contrast first (mode 1) or last (mode 0), saturation, hue; each step with
    p = 0.5 (randint(2)). The hue shift is numpy's randint(-18, 18): -18..17, high end exclusive as official."""
    if rng.integers(2):
        image = convert(image, beta=rng.uniform(-brightness, brightness))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        image = convert(image, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue, hue)) % 180
        image = hsv_to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        image = convert(image, alpha=rng.uniform(*contrast))
    return image


def mmseg_train(image, masks, rng, crop, img_scale, ratio=(0.5, 2.0), cat_max_ratio=0.75, flip=True,
                ignore=-1, distort=True):
    """-> (image uint8 <= crop, masks): Resize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion; the caller
    normalises and pads bottom/right to the crop (Pad: image 0 after Normalize, labels ignore). crop (h, w);
    img_scale: the preset's Resize scale (long, short), no default: each dataset's config names its own."""
    h, w = image.shape[:2]
    nw, nh = rescale_size(w, h, mmseg_scale(img_scale, rng.uniform(*ratio)))
    label = resize_nearest(masks[0], (nw, nh))                # the whole label: the crop rule reads it
    y0, y1, x0, x1 = cat_max_crop(rng, label, crop, cat_max_ratio, ignore)
    y1, x1 = min(y1, nh), min(x1, nw)
    window = (x0, y0, x1, y1)
    image = resize(image, (nw, nh), "linear", window)        # mmcv.imrescale: cv2 INTER_LINEAR
    masks = [label[y0:y1, x0:x1]] + [resize_nearest(m, (nw, nh), window) for m in masks[1:]]
    if flip and rng.random() < 0.5:
        image, masks = image[:, ::-1], [m[:, ::-1] for m in masks]
    if distort:
        image = photometric(np.ascontiguousarray(image), rng)
    return image, masks


def mmseg_test_size(w, h, img_scale, divisor=0):
    """Test-time Resize(img_scale, keep_ratio) size; SegFormer's AlignedResize then rounds it up to a multiple of
    divisor (a second resize)."""
    nw, nh = rescale_size(w, h, img_scale)
    if divisor:
        return (nw, nh), (-(-nw // divisor) * divisor, -(-nh // divisor) * divisor)
    return (nw, nh), None
