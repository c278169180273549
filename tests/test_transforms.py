"""transforms.py: each official training op against a slow, direct transcription of the official op (openseg's
cv2_aug_transforms / collate, mmseg 0.x transforms, cv2's resize and HSV arithmetic), on the same random draws."""
import math

import numpy as np
import pytest
import torch

import data
import labels
import transforms as T

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (23, 31, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- cv2.resize, pixel by pixel

def slow_cv2_resize(img, size, kind):
    """cv2.resize transcribed per output pixel in double: x = (d + 0.5) * src / dst - 0.5, taps from floor(x),
    indices clamped (border replicated); linear: 2 taps, cubic: 4 taps, a = -0.75."""
    (H, W), (w, h) = img.shape[:2], size
    A = -0.75

    def kernel(t):                                          # Keys cubic with a = A, |t| < 2
        t = abs(t)
        return ((A + 2) * t - (A + 3)) * t * t + 1 if t <= 1 else ((A * t - 5 * A) * t + 8 * A) * t - 4 * A

    def weights(d, n_src, n_dst):
        x = (d + 0.5) * n_src / n_dst - 0.5
        i = math.floor(x)
        f = x - i
        if kind == "linear":
            return [(min(max(i, 0), n_src - 1), 1 - f), (min(max(i + 1, 0), n_src - 1), f)]
        return [(min(max(i + k, 0), n_src - 1), kernel(f - k)) for k in (-1, 0, 1, 2)]

    out = np.zeros((h, w, img.shape[2]))
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(wy * wx * img[sy, sx].astype(float) for sy, wy in weights(y, H, h)
                            for sx, wx in weights(x, W, w))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["linear", "cubic"])
@pytest.mark.parametrize("size", [(45, 17), (13, 40), (31, 23), (8, 5)])
def test_resize_matches_cv2_transcription(kind, size):
    ours, ref = T.resize(IMAGE, size, kind).astype(int), slow_cv2_resize(IMAGE, size, kind).astype(int)
    assert np.abs(ours - ref).max() <= 1 and (ours != ref).mean() < 0.01   # float32 vs double at .5 ties only


def test_resize_window_equals_resize_then_crop():
    full = T.resize(IMAGE, (50, 37), "cubic")
    assert np.array_equal(T.resize(IMAGE, (50, 37), "cubic", (7, 3, 30, 20)), full[3:20, 7:30])
    lab = RNG.integers(0, 9, (23, 31))
    assert np.array_equal(T.resize_nearest(lab, (50, 37), (7, 3, 30, 20)), T.resize_nearest(lab, (50, 37))[3:20, 7:30])


def test_nearest_is_cv2_floor_rule():
    lab = RNG.integers(0, 9, (23, 31))
    for w, h in ((50, 37), (10, 7), (31, 23)):
        ref = np.array([[lab[min(int(y * 23 / h), 22), min(int(x * 31 / w), 30)] for x in range(w)] for y in range(h)])
        assert np.array_equal(T.resize_nearest(lab, (w, h)), ref)


# ----------------------------------------------------------------------------- openseg (ProtoSeg Cityscapes)

def openseg_transcription(img, lab, rng, crop):
    """openseg's RandomResize -> RandomCrop -> RandomHFlip -> RandomBrightness -> collate pad (pad_mode random),
    the whole image resized, then cropped; draws in the order of openseg_train."""
    h, w = img.shape[:2]
    s, a = rng.uniform(0.5, 2.0), rng.uniform(0.9, 1.1)
    size = (int(w * math.sqrt(a) * s), int(h * math.sqrt(1.0 / a) * s))
    img, lab = slow_cv2_resize(img, size, "cubic"), T.resize_nearest(lab, size)
    tw, th = min(crop[1], size[0]), min(crop[0], size[1])
    x, y = rng.integers(0, size[0] - tw + 1), rng.integers(0, size[1] - th + 1)
    img, lab = img[y:y + th, x:x + tw], lab[y:y + th, x:x + tw]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    shift = rng.integers(-10, 11)
    img = np.clip(np.around(img.astype(np.float32) + shift), 0, 255).astype(np.uint8)
    return img, lab, (rng.integers(0, crop[0] - th + 1), rng.integers(0, crop[1] - tw + 1))


@pytest.mark.parametrize("seed", range(4))
def test_openseg_pipeline_matches_transcription(seed):
    lab = RNG.integers(0, 5, IMAGE.shape[:2])
    img, masks, pad = T.openseg_train(IMAGE, [lab, lab * 7 + 3], np.random.default_rng(seed), (20, 36))
    ref_img, ref_lab, ref_pad = openseg_transcription(IMAGE, lab, np.random.default_rng(seed), (20, 36))
    assert np.abs(img.astype(int) - ref_img).max() <= 1 and np.array_equal(masks[0], ref_lab) and pad == ref_pad
    assert np.array_equal(masks[1], ref_lab * 7 + 3)


def test_openseg_brightness_shift_is_one_draw_from_minus_10_to_10():
    """At scale 1 and aspect 1 (an exact resize) and a crop of the image's size, the pipeline's image is the flipped
    or unflipped image plus the shift openseg draws, randint(-10, 10) inclusive, after its other draws."""
    image = RNG.integers(20, 236, (9, 11, 3)).astype(np.uint8)                # no value clipped by +-10
    for seed in range(20):
        out, _, _ = T.openseg_train(image, [], np.random.default_rng(seed), (9, 11), (1, 1), (1, 1))
        draws = np.random.default_rng(seed)
        draws.uniform(1, 1), draws.uniform(1, 1), draws.integers(0, 1), draws.integers(0, 1)   # scale, aspect, crop
        flipped = image[:, ::-1] if draws.random() < 0.5 else image
        assert np.array_equal(out.astype(int), flipped.astype(int) + int(draws.integers(-10, 11))), seed


def test_openseg_resize_size_truncates_and_keeps_at_least_one_pixel():
    """(int(w sqrt(a) s), int(h s / sqrt(a))): 100 x 50 at s 1.5, a 1.21: (165, 68); a 1-pixel side stays 1."""
    assert T.openseg_resize_size(100, 50, 1.5, 1.21) == (165, 68)
    assert T.openseg_resize_size(1, 1, 0.5, 1.0) == (1, 1)


def test_openseg_brightness_is_one_integer_shift_on_all_channels():
    out = T.brightness_shift(IMAGE, 7).astype(int)
    assert np.array_equal(out, np.clip(IMAGE.astype(int) + 7, 0, 255))


# ----------------------------------------------------------------------------- mmseg

def mmseg_transcription(img, lab, rng, crop, img_scale, ratio=(0.5, 2.0), cat_max_ratio=0.75, ignore=-1):
    """mmseg Resize (random_sample_ratio, mmcv.imrescale) -> RandomCrop(cat_max_ratio) -> RandomFlip, whole-image
    resize first; the crop rule as in RandomCrop.__call__."""
    h, w = img.shape[:2]
    r = rng.uniform(*ratio)
    scale = int(img_scale[0] * r), int(img_scale[1] * r)
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = int(w * f + 0.5), int(h * f + 0.5)
    img, lab = slow_cv2_resize(img, size, "linear"), T.resize_nearest(lab, size)

    def bbox():
        oy = rng.integers(0, max(lab.shape[0] - crop[0], 0) + 1)
        ox = rng.integers(0, max(lab.shape[1] - crop[1], 0) + 1)
        return oy, oy + crop[0], ox, ox + crop[1]
    y1, y2, x1, x2 = bbox()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, cnt = np.unique(lab[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != ignore]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            y1, y2, x1, x2 = bbox()
    img, lab = img[y1:y2, x1:x2], lab[y1:y2, x1:x2]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return img, lab


@pytest.mark.parametrize("seed, cat_max_ratio", [(0, 0.75), (1, 0.75), (2, 0.75), (3, 0.75), (0, 1.0), (3, 1.0)])
def test_mmseg_resize_crop_flip_match_transcription(seed, cat_max_ratio):
    lab = np.where(RNG.random(IMAGE.shape[:2]) < 0.8, 1, RNG.integers(-1, 4, IMAGE.shape[:2]))  # one class dominates
    img, masks = T.mmseg_train(IMAGE, [lab, lab * 7 + 3], np.random.default_rng(seed), (12, 16), (40, 20),
                               cat_max_ratio=cat_max_ratio, distort=False)
    ref_img, ref_lab = mmseg_transcription(IMAGE, lab, np.random.default_rng(seed), (12, 16), (40, 20),
                                           cat_max_ratio=cat_max_ratio)
    assert np.abs(img.astype(int) - ref_img).max() <= 1 and np.array_equal(masks[0], ref_lab)
    assert np.array_equal(masks[1], ref_lab * 7 + 3)                       # a second mask (modes) goes along


def test_cat_max_ratio_crop_redraws_until_no_class_dominates():
    lab = np.zeros((40, 40), np.int64)
    lab[:, 30:] = 1                                          # most crops hold class 0 alone
    lab[:5] = -1                                             # ignore never counts
    for seed in range(5):
        y0, y1, x0, x1 = T.cat_max_crop(np.random.default_rng(seed), lab, (10, 12), 0.75, -1)
        vals, cnt = np.unique(lab[y0:y1, x0:x1], return_counts=True)
        cnt = cnt[vals != -1]
        assert len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75


@pytest.mark.parametrize("seed", range(3))
def test_mmseg_pipeline_ends_in_photometric_distortion_of_its_crop_by_default(seed):
    """RecipeTransform calls mmseg_train without `distort`: the crop, then PhotoMetricDistortion (the transcription
    above) with the draws that follow."""
    lab = RNG.integers(0, 4, IMAGE.shape[:2])
    img, _ = T.mmseg_train(IMAGE, [lab], np.random.default_rng(seed), (12, 16), (40, 20))
    draws = np.random.default_rng(seed)
    crop, _ = T.mmseg_train(IMAGE, [lab], draws, (12, 16), (40, 20), distort=False)
    assert np.array_equal(img, photometric_transcription(np.ascontiguousarray(crop), draws))


def test_cat_max_ratio_1_keeps_the_first_crop_and_a_one_class_label_the_tenth_redraw():
    """RandomCrop: no re-draw at cat_max_ratio 1 (even of a crop holding one class); at 0.75, a label of one class
    fails every test: the first box, 10 re-draws, the last kept."""
    one_class = np.zeros((40, 40), np.int64)
    for seed in range(3):
        draws = np.random.default_rng(seed)
        boxes = [T.crop_box(draws, 40, 40, (10, 12)) for _ in range(12)]
        assert T.cat_max_crop(np.random.default_rng(seed), one_class, (10, 12), 1.0, -1) == boxes[0]
        assert T.cat_max_crop(np.random.default_rng(seed), one_class, (10, 12), 0.75, -1) == boxes[10]
        assert len(set(boxes)) > 1                                           # the draws differ


@pytest.mark.parametrize("w, h, size", [(600, 333, (923, 512)), (607, 700, (512, 590)), (3000, 700, (2048, 478)),
                                        (2999, 1000, (1535, 512))])
def test_rescale_size_of_hand_computed_sizes(w, h, size):
    """f = min(2048 / long, 512 / short), int(x f + 0.5): 922.52 -> 923, 590.44 -> 590; (3000, 700): the long
    side binds (f = 2048 / 3000), 477.87 -> 478; 1535.49 -> 1535."""
    assert T.rescale_size(w, h, (2048, 512)) == size


def test_eval_resize_is_mmsegs_rescale_then_segformers_aligned_resize_of_that():
    lab = RNG.integers(0, 4, IMAGE.shape[:2])
    img, (out_lab,) = data.EvalTransform(resize=(40, 20))(IMAGE, [lab])
    first = T.resize(IMAGE, T.rescale_size(31, 23, (40, 20)))                 # (27, 20): no divisor, one resize
    assert img.shape == (3, 20, 27) and torch.equal(img, data.normalize(first.astype(np.float32)))
    img, _ = data.EvalTransform(resize=(40, 20), divisor=8)(IMAGE, [lab])
    assert img.shape == (3, 24, 32)
    assert torch.equal(img, data.normalize(T.resize(first, (32, 24)).astype(np.float32)))
    assert np.array_equal(out_lab.numpy(), lab)                             # the label keeps its size


def test_project_jitter_is_brightness_then_contrast_and_saturation_about_the_grey_mean():
    """TrainTransform's colour jitter (the synthetic preset's pipeline): factors b, c, s ~ U(1 - j, 1 + j); x b,
    then contrast about the mean grey of the crop, then saturation about each pixel's grey, clipped to 0..255."""
    image, lab = IMAGE[:6, :7], np.zeros((6, 7), np.int64)
    t = data.TrainTransform((6, 7), scale=(1, 1), flip=False, jitter=0.3)
    out, _ = t(image, [lab], np.random.default_rng(5))
    rng = np.random.default_rng(5)
    rng.uniform(1, 1), rng.integers(1), rng.integers(1)                     # the scale and crop draws
    b, c, s = rng.uniform(0.7, 1.3, 3)
    x = image.astype(np.float64) * b
    grey = x @ [0.299, 0.587, 0.114]
    mean = grey.mean()
    x, grey = (x - mean) * c + mean, (grey - mean) * c + mean
    expected = np.clip(grey[..., None] + (x - grey[..., None]) * s, 0, 255)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy() * data.STD + data.MEAN, expected, atol=2e-3)


def slow_bgr2hsv(b, g, r):
    """cv2 RGB2HSV_b for one pixel (12-bit fixed point), as in color_hsv.simd.hpp."""
    v, vmin = max(b, g, r), min(b, g, r)
    diff = v - vmin
    sdiv = round((255 << 12) / v) if v else 0
    hdiv = round((180 << 12) / (6.0 * diff)) if diff else 0
    s = (diff * sdiv + (1 << 11)) >> 12
    h = (g - b) if v == r else (b - r + 2 * diff) if v == g else (r - g + 4 * diff)
    h = (h * hdiv + (1 << 11)) >> 12
    return h + 180 if h < 0 else h, s, v


def slow_hsv2bgr(h, s, v):
    """cv2 HSV2RGB_b for one pixel, its vector path: float32, 1 - s*h fused (exact product), x * 255 truncated."""
    f = np.float32
    h, s, v = f(h) * f(6.0 / 180), f(s) * f(1 / 255), f(v) * f(1 / 255)
    sector = int(h)
    h = f(h - f(sector))
    tab = [v, f(v * f(1 - s)), f(v * f(1.0 - float(s) * float(h))), f(v * f(1.0 - float(s) * float(f(1 - h))))]
    idx = [[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]][sector % 6]
    return [min(max(int(tab[i] * f(255)), 0), 255) for i in idx]


def test_hsv_conversions_match_cv2_transcription():
    img = IMAGE[:8, :8].copy()
    img[0, :3] = [[7, 7, 7], [255, 0, 0], [0, 255, 255]]     # grey (s = 0), pure red, cyan
    hsv = T.rgb_to_hsv(img)
    for (r, g, b), got in zip(img.reshape(-1, 3).astype(int), hsv.reshape(-1, 3)):
        assert tuple(got) == slow_bgr2hsv(b, g, r)
    back = T.hsv_to_rgb(hsv)
    for (h, s, v), got in zip(hsv.reshape(-1, 3).astype(int), back.reshape(-1, 3)):
        assert list(got[::-1]) == slow_hsv2bgr(h, s, v)


def photometric_transcription(img, rng):
    """mmseg PhotoMetricDistortion.__call__ with numpy.random replaced by rng, on an RGB image (cv2 on BGR)."""
    def convert(x, alpha=1, beta=0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def to_hsv(x):
        return np.array([[slow_bgr2hsv(*p[::-1]) for p in row] for row in x.astype(int)], np.uint8)

    def to_rgb(x):
        return np.array([[slow_hsv2bgr(*p)[::-1] for p in row] for row in x.astype(int)], np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = to_hsv(img)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = to_rgb(hsv)
    if rng.integers(2):
        hsv = to_hsv(img)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        img = to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


@pytest.mark.parametrize("seed", range(6))
def test_photometric_distortion_matches_transcription(seed):
    img = IMAGE[:6, :7]
    assert np.array_equal(T.photometric(img, np.random.default_rng(seed)),
                          photometric_transcription(img, np.random.default_rng(seed)))


def test_rescale_size_fits_the_box_keeping_the_ratio():
    for w, h in ((683, 512), (2048, 1024), (300, 900), (512, 512)):
        nw, nh = T.rescale_size(w, h, (2048, 512))
        assert max(nw, nh) <= 2048 and min(nw, nh) <= 512 and (max(nw, nh) >= 2047 or min(nw, nh) >= 511)
        assert abs(nw / nh - w / h) < 2 / min(nw, nh)


# ----------------------------------------------------------------------------- the dataset transforms

@pytest.mark.parametrize("pipeline", ["openseg", "mmseg"])
def test_recipe_transform_pads_to_the_crop_with_ignore_and_is_a_function_of_the_rng(pipeline):
    lab = RNG.integers(0, 4, IMAGE.shape[:2])
    t = data.RecipeTransform(pipeline, (40, 50), img_scale=(31, 23))
    a, (la,) = t(IMAGE, [lab], np.random.default_rng(3))
    b, (lb,) = t(IMAGE, [lab], np.random.default_rng(3))
    assert a.shape == (3, 40, 50) and la.shape == (40, 50) and (a == b).all() and (la == lb).all()
    pad = la == labels.IGNORE_INDEX
    assert pad.any() and (a[:, pad] == 0).all()               # padding: ignore, the mean colour (0)
