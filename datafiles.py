"""Reading dataset files and checking them before training; every problem is a DatasetError of one line:

    <what> in <file>: <found>, expected <rule>; <how to fix>

    read_image(path) -> HxWx3 uint8   (16-bit and float images stretched from their own range, not clipped)
    read_label(path, rgb_ids=None) -> HxW raw ids   (lossless, one channel; JPEG, RGB and 1-bit maps refused)
    map_labels(raw, lut, path, rule) -> HxW int32 train ids   (the one place that applies labels.py's tables)
    check_dataset(dataset, values=False, name="")   every pair from its headers, in a thread pool
"""
import errno
import os
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # PIL's default, restated: a file cut short is an error, never grey rows

from commands import error_message
from labels import INVALID


class DatasetError(ValueError):
    """Something wrong with the data on disk, in one line: `<what> in <file>: <found>, expected <rule>; <fix>`."""

    def __init__(self, msg):
        # A DataLoader worker's error is re-raised as DatasetError("Caught DatasetError in DataLoader worker ...
        # Original Traceback ... data.DatasetError: <our line>") (torch ExceptionWrapper.reraise): keep our line.
        if msg.startswith("Caught DatasetError") and "DatasetError: " in msg:
            msg = msg.rstrip().rsplit("DatasetError: ", 1)[1]
        super().__init__(msg)


# ---------------------------------------------------------------------------------------------------------
# Reading files: every failure is a DatasetError naming the file

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel, more than 8 bits
LABEL_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")  # one integer id per pixel
LOSSY = ("lossy compression changes ids along every edge, expected a lossless PNG, TIFF or BMP; export the masks "
         "as PNG from their source, not from the JPEG")
_ENDS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}  # the last chunk / marker of a complete file


KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def unreadable_reason(path):
    """Why `path` cannot be read as a file, in words: a symlink loop, a link to a missing target, not found, or
    what it is when not a regular file (a folder, a named pipe, whose read would wait for a writer forever, a
    device); None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return f"a broken link to {os.readlink(path)}"
        return "not found"
    if stat.S_ISREG(mode):
        return None
    return next((f"{kind}, not a regular file" for test, kind in KINDS if test(mode)), "not a regular file")


def _unreadable(path, what, e):
    reason = error_message(e)
    return DatasetError(f"unreadable {what} in {path}: {reason}, expected a complete image file PIL can read; "
                        f"re-download or re-export it")


def _regular(path, what):
    """Only regular files are read: a named pipe would wait for a writer forever, a device never end."""
    found = unreadable_reason(path)
    if found and found.endswith("not a regular file"):
        raise DatasetError(f"unreadable {what} in {path}: {found}, expected a{'n' if what == 'image' else ''} "
                           f"{what} file; replace it by the file itself")


def _open(path, what):
    """PIL image with only its header read."""
    _regular(path, what)
    try:
        return Image.open(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # missing, foreign, broken, huge
        raise _unreadable(path, what, e) from e


def _pixels(im, path, what, mode=None):
    """Decoded pixels (converted to `mode` if given) as an array."""
    try:
        im.load()
        return np.asarray(im.convert(mode) if mode and im.mode != mode else im)
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise _unreadable(path, what, e) from e


def _check_end(im, path, what):
    """A PNG or JPEG cut short (interrupted copy) lacks its end marker: found from the last bytes, no decoding."""
    end = _ENDS.get(im.format)
    if end is None:
        return
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - 64))
        if end in f.read():
            return
        f.seek(max(0, size - 65536))  # a few writers append data after the marker
        if end in f.read():
            return
    raise DatasetError(f"truncated {what} in {path}: no {im.format} end marker in its {size} bytes, expected a "
                       f"complete file; re-download or re-extract it")


def _verify(im, path):
    """A PNG's chunk checksums: corrupt data found without decoding (about 1 ms per MB)."""
    try:
        im.verify()
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise _unreadable(path, "image", e) from e


def read_image(path):
    """Image file -> HxWx3 uint8 RGB (datasets and predict.py). One-channel 16-bit, 32-bit or float images (PNG
    I;16, TIFF) are stretched from their own min..max to 0..255: convert("RGB") would clip them to white, and the
    bit depth does not say the range used (a 12-bit sensor fills 0..4095). 16-bit RGB PNGs keep the high byte."""
    _regular(path, "image")
    if str(path).lower().endswith((".jpg", ".jpeg")):
        _check_jpeg(path)
    with _open(path, "image") as im, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        im = _upright(im, path)
        if im.mode not in WIDE_MODES:
            a = _pixels(im, path, "image", "RGB")
        else:
            a = _pixels(im, path, "image").astype(np.float64)
        bad = [w for w in seen if "PIL" in w.filename and not issubclass(w.category, Image.DecompressionBombWarning)]
        if bad:  # the decoder noticed damage (e.g. TIFF "Truncated File Read", corrupt EXIF) and went on
            raise _unreadable(path, "image", bad[0].message)
        if im.mode not in WIDE_MODES:
            return a
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    a = ((a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)).round().astype(np.uint8)
    return np.repeat(a[..., None], 3, 2)


TURNED = {5: "transposed", 6: "rotated 90 degrees", 7: "transversed", 8: "rotated 270 degrees"}  # W, H swap


def _orientation(im):
    if im.format == "PNG" and "exif" not in im.info:  # PIL would decode the whole PNG to look for a late eXIf
        return 1
    try:
        return im.getexif().get(0x0112, 1)      # EXIF Orientation; 1 = as stored
    except Exception:                           # unreadable EXIF: no orientation to apply
        return 1


def _upright(im, path):
    """The image as viewers show it: EXIF orientation applied (ImageOps.exif_transpose, as mmcv's and PIL-based
    loaders do). Labels are read as stored (mmseg's LoadAnnotations: 'unchanged')."""
    if _orientation(im) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise _unreadable(path, "image", e) from e


def _upright_size(im):
    w, h = im.size
    return (h, w) if _orientation(im) in TURNED else (w, h)


def _check_jpeg(path):
    """A JPEG's marker structure walked to its end (PIL hides libjpeg's warnings and decodes damage as grey or
    garbage rows): segments in bounds, scan data holding only stuffed bytes and RST0-7 in order, an EOI after the
    last scan. Entropy damage that keeps the structure cannot be seen without a second decoder."""
    data = open(path, "rb").read()
    damaged = lambda found: DatasetError(f"damaged image in {path}: {found}, expected a complete JPEG; re-download "
                                         "or re-export it")
    if data[:2] != b"\xff\xd8":
        raise damaged("no JPEG start marker")
    i, frame, interval = 2, None, 0
    while True:
        while i < len(data) and data[i] == 0xFF:            # fill bytes before a marker
            i += 1
        if i >= len(data):
            raise DatasetError(f"truncated image in {path}: no JPEG end marker after byte {len(data)}, expected a "
                               "complete file; re-download or re-extract it")
        if data[i - 1] != 0xFF:
            raise damaged(f"byte {data[i]:#04x} at offset {i} where a marker belongs")
        m = data[i]
        i += 1
        if m == 0xD9:                                       # EOI
            return
        if 0xD0 <= m <= 0xD7 or m == 0x01:                  # markers without a length
            continue
        if i + 2 > len(data) or int.from_bytes(data[i:i + 2], "big") < 2:
            raise damaged(f"a segment (marker {m:#04x}) cut short at offset {i}")
        seg, i = data[i + 2:i + int.from_bytes(data[i:i + 2], "big")], i + int.from_bytes(data[i:i + 2], "big")
        if m in (0xC0, 0xC1) and len(seg) >= 6:             # baseline frame: H, W, sampling factors
            h, w, n = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
            hs, vs = [seg[7 + 3 * k] >> 4 for k in range(n)], [seg[7 + 3 * k] & 15 for k in range(n)]
            frame = (-(-w // (8 * max(hs))) * -(-h // (8 * max(vs))), n) if n and len(seg) >= 6 + 3 * n else None
        if m == 0xDD and len(seg) >= 2:                     # DRI: an RSTn every `interval` MCUs
            interval = int.from_bytes(seg[:2], "big")
        if m != 0xDA:                                       # SOS: entropy-coded data follows
            continue
        rst, count = 0, 0
        while True:
            i = data.find(b"\xff", i)
            if i < 0 or i + 1 >= len(data):
                raise DatasetError(f"truncated image in {path}: its scan data ends without a JPEG end marker, "
                                   f"{len(data)} bytes, expected a complete file; re-download or re-extract it")
            nxt = data[i + 1]
            if nxt == 0x00 or nxt == 0xFF:                  # stuffed 0xFF, or fill before a marker
                i += 1 if nxt == 0xFF else 2
            elif 0xD0 <= nxt <= 0xD7:
                if nxt != 0xD0 + rst:
                    raise damaged(f"restart marker RST{nxt - 0xD0} at offset {i} after RST{(rst - 1) % 8}, "
                               "expected them in order")
                rst, count, i = (rst + 1) % 8, count + 1, i + 2
            elif 0xC0 <= nxt <= 0xFE:                       # the scan ends at the next marker
                break
            else:
                raise damaged(f"bytes 0xff {nxt:#04x} at offset {i} inside the scan data")
        if frame and interval and seg[:1] == bytes([frame[1]]) and count != -(-frame[0] // interval) - 1:
            raise damaged(f"{count} restart markers in its scan where {frame[0]} blocks need "
                       f"{-(-frame[0] // interval) - 1} (data cut short or damaged)")


def _check_label_mode(im, path, rgb):
    """A label map is lossless and holds one integer id per pixel (RGB only where ids are coded as colour)."""
    if im.format == "JPEG":
        raise DatasetError(f"JPEG label map in {path}: {LOSSY}")
    if rgb and im.mode != "RGB":
        raise DatasetError(f"label map in {path}: mode {im.mode}, expected an RGB _seg.png (class R // 10 * 256 + G); "
                           f"use the ADE20K_2021_17_01 files unchanged")
    if rgb or im.mode in LABEL_MODES:
        return
    if im.mode == "1":
        found, fix = "1-bit (mode 1)", "save it as 8-bit, e.g. Image.fromarray(mask.astype(np.uint8)).save(path)"
    elif len(im.getbands()) > 1:
        found, fix = f"{len(im.getbands())} channels (mode {im.mode})", \
            "save one class id per pixel, not colours (map each colour to its id first)"
    else:
        found, fix = f"mode {im.mode}", "save integer class ids as an 8- or 16-bit PNG"
    raise DatasetError(f"label map in {path}: {found}, expected one integer class id per pixel (mode L, P or "
                       f"I;16); {fix}")


def read_label(path, rgb_ids=None):
    """Label file -> HxW integer array of raw ids (lossless, one channel, checked). rgb_ids: a function
    HxWx3 -> HxW ids for datasets that code ids as colours (ADE20K-Full)."""
    with _open(path, "label") as im:
        _check_label_mode(im, path, rgb_ids is not None)
        raw = _pixels(im, path, "label")
    return rgb_ids(raw) if rgb_ids else raw


def ade20k_full_ids(rgb):
    """ADE20K_2021_17_01 <name>_seg.png -> raw class ids R // 10 * 256 + G (MaskFormer's loadAde20K)."""
    return (rgb[..., 0] // 10).astype(np.int32) * 256 + rgb[..., 1]


def map_labels(raw, lut, path, rule):
    """The one place that turns dataset label ids into train ids (int32, IGNORE_INDEX = ignore); lut from
    labels.lookup_table.
    rule: '<the valid values>; <how to fix>' for the message."""
    if raw.ndim != 2:
        raise DatasetError(f"label map in {path}: shape {raw.shape}, expected one channel (HxW); save class ids")
    idx = raw
    if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):  # the last lut entry (INVALID) catches these
        idx = np.where((raw < 0) | (raw >= len(lut)), len(lut) - 1, raw)
    out = lut[idx]
    if (out == INVALID).any():
        bad = np.unique(raw[out == INVALID])[:20].tolist()
        raise DatasetError(f"label values {bad} in {path}: neither a class nor ignore, expected {rule}")
    return out


def check_same_size(ip, lp, isize, lsize):
    """isize: the image as shown (EXIF orientation applied). A label that fits the stored, unturned pixels says so."""
    if tuple(isize) != tuple(lsize):
        turn = ""
        if tuple(isize[::-1]) == tuple(lsize):
            with _open(ip, "image") as im:
                o = _orientation(im)
            if o in TURNED:
                turn = (f" (the image's EXIF orientation {o}: shown and read {TURNED[o]}; the label fits its stored, "
                        "unturned pixels: draw the label on the image as viewers show it, or remove the image's "
                        "EXIF orientation tag)")
        raise DatasetError(f"label size in {lp}: {lsize[0]}x{lsize[1]} (WxH), expected the size of its image "
                           f"{ip}, {isize[0]}x{isize[1]}{turn}; re-export the label at the image's size or fix the "
                           "pairing")


# ---------------------------------------------------------------------------------------------------------
# The data check before training

def check_values(raw, lut, path, rule):
    """map_labels' check of a raw label map; skips mapping every pixel where the value range shows all are valid."""
    first_bad = np.flatnonzero(lut == INVALID)[0]
    if raw.size and (raw.min() < 0 or raw.max() >= first_bad):
        map_labels(raw, lut, path, rule)


def _check_pair(ds, i, values):
    """(message or None, (has 255, has 1) for the binary-mask hint or None) for pair i: headers, values if asked."""
    _, ip, lp = ds.pairs[i]
    try:
        with _open(ip, "image") as im:
            _check_end(im, ip, "image")
            isize = _upright_size(im)
            if values and im.format == "PNG":
                _verify(im, ip)
            if values and im.format == "JPEG":
                _check_jpeg(ip)
        with _open(lp, "label") as im:
            _check_label_mode(im, lp, ds.rgb_ids is not None)
            _check_end(im, lp, "label")
            check_same_size(ip, lp, isize, im.size)
        if values:
            raw = read_label(lp, ds.rgb_ids)
            check_values(raw, ds.lut, lp, ds.rule)
            return None, ((raw == 255).any(), (raw == 1).any()) if getattr(ds, "binary_hint", False) else None
    except DatasetError as e:
        return str(e), None
    return None, None


def _say(msg):
    print(msg, flush=True)


def check_dataset(dataset, values=False, name="", threads=16, log=_say):
    """The data check before training: every image/label pair from its file headers (exists, readable, not cut
    short, equal sizes, a lossless one-channel label map), in a thread pool. values=True also decodes every label,
    checks its values and a PNG image's checksums (use it for val: a bad val pair would show only after training);
    otherwise 16 pairs spread over the set get that, and the rest are checked as they load. Raises DatasetError for
    the first bad pair (counting the others); returns the number of pairs checked (0 for synthetic data). A Subset
    checks its indices. log: a progress line every 10 s and a summary (a function of one string), None: silent."""
    idx = range(len(dataset))
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, idx = dataset.dataset, list(dataset.indices)
    if not hasattr(dataset, "pairs"):  # not files (synthetic)
        return 0
    n, t0, shown = len(idx), time.time(), time.time()
    sample = set(idx[::max(1, n // 16)])
    errors, seen = [], np.zeros(2, bool)  # binary-mask hint: some mask holds 255, some holds 1
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(lambda i: _check_pair(dataset, i, values or i in sample), idx)
        for k, (err, flags) in enumerate(results):
            if err:
                errors.append(err)
            elif flags is not None:
                seen |= flags
            if log and time.time() - shown > 10:
                log(f"data check{name and ' ' + name}: {k + 1}/{n} pairs, {time.time() - t0:.0f} s")
                shown = time.time()
    if errors:
        raise DatasetError(errors[0] + (f" [{len(errors) - 1} more pairs fail the check]" if len(errors) > 1 else ""))
    if seen[0] and not seen[1]:  # 255 (ignore) seen, class 1 never: 0/255 masks
        lbl_dir = dataset.pairs[0][2].parent
        raise DatasetError(f"binary masks in {lbl_dir}: values 0 and 255 only, no class 1, expected classes 0..1 "
                           f"with 255 = ignore; pass --binary-masks to read 255 as class 1 (or --no-binary-masks "
                           f"if 255 really is ignore)")
    if log:
        log(f"data check{name and ' ' + name}: {n} pairs OK ({'headers and label values' if values else 'headers'}) "
            f"in {time.time() - t0:.1f} s")
    return n
