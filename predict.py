"""Pictures and submissions from a checkpoint: coloured prediction, overlay, the paper's Fig. 3 prototype map.

    python predict.py --checkpoint runs/synthetic/last.pt img1.png img2.jpg             # into runs/predict
    python predict.py --checkpoint runs/synthetic/last.pt --val-index 0 3 --out runs/synthetic/pictures
    python predict.py --checkpoint runs/cityscapes/last.pt /data/cityscapes/leftImg8bit/test --labelids --out results

Inputs are image files and folders (walked recursively; names keep their sub-folders; two inputs that would
write one name are refused, as is an --out inside an input folder). For each image IMG it writes
IMG_pred.png (palette colours), IMG_overlay.png (prediction blended on the image) and, for a ProtoSeg checkpoint,
IMG_protos.png: the pixels predicted as --class, each coloured by its nearest prototype of that class (one hue per
prototype), brightness = cosine similarity to it (Fig. 3), and IMG_strip.png: image | prediction | prototype map
with a legend (class colours, the class the map shows, one swatch per prototype hue, the brightness scale).
The three single files are the raw maps at the image's size, without legend. --val-index I ... takes the synthetic
dataset's val images by index instead of files (a synthetic checkpoint) and also writes val_I_image.png.
--labelids writes only IMG.png holding Cityscapes labelIds, one file per frame: the folder cityscapesScripts'
evaluator takes as CITYSCAPES_RESULTS and the format of the test server. The checkpoint may be train.py's or the
official ProtoSeg release. Every file is written whole or not at all. An input that cannot be read (not an image, not
a regular file) or does not fit the device's memory is skipped with a line naming it; exit code 1 when one was
skipped or nothing was written, 130 / 143 on Ctrl-C / SIGTERM (one line saying what was written).
"""
import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import draw
from checkpoints import CheckpointError, load_model
from collectives import default_device
from commands import (NO_MEMORY, Outputs, Parser, asked_for, device_flag, error_message, exit_with_error,
                      ranged, run_command, within)
from datafiles import read_image
from evaluate import predict_scores
from labels import CLASS_TABLES, IMAGE_EXTS, default_palette
from settings import number      # the ranges of train.py's settings of the same name


def class_table(cfg):
    """(class names, palette (C, 3) uint8) of the checkpoint's dataset; otherwise the names train.py gives a folder
    dataset's classes (class0, class1, ...)."""
    names, palette = CLASS_TABLES.get(cfg.get("dataset"), (None, None))
    if names is None or len(names) != cfg["num_classes"]:
        return [f"class{i}" for i in range(cfg["num_classes"])], default_palette(cfg["num_classes"])
    return list(names), np.asarray(palette, np.uint8)


def real(path):
    return os.path.realpath(path)                   # a link loop is kept as it is (read_image then names it)


def output_names(inputs):
    """[(image path, output stem relative to --out)]: folders walked (a file met twice is read once); a stem two
    inputs share keeps its suffix (check_outputs refuses what still collides)."""
    found, met = [], set()
    for arg in map(Path, inputs):
        if arg.is_dir():               # anything named like an image but a folder is read, and refused if not a file
            files = sorted(p for p in arg.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.is_dir())
            if not files:
                print(f"warning: no images in folder {arg}", file=sys.stderr)
            found += [(p, p.relative_to(arg).with_suffix("")) for p in files]
        else:
            found.append((arg, Path(arg.stem)))
    found = [(p, stem) for p, stem in found if not (real(p) in met or met.add(real(p)))]
    seen = {}
    for _, stem in found:
        seen[stem] = seen.get(stem, 0) + 1
    return [(p, stem.with_name(stem.name + "_" + p.suffix.lstrip(".").lower()) if seen[stem] > 1 else stem)
            for p, stem in found]


@torch.no_grad()
def class_similarity(model, image, size, class_index, embed=None):
    """(k, best), each (H, W): every pixel's nearest prototype k of class c and its cosine i^T p_ck, at `size`.
    embed: model.embed(image), (1, h, w, D), when it is already computed."""
    embed = (model.embed(image) if embed is None else embed)[0]                  # (h, w, D)
    protos = model.head.unit_prototypes()[class_index].float()                   # (K, D)
    sim = embed.float() @ protos.T                                               # (h, w, K)
    sim = F.interpolate(sim.permute(2, 0, 1)[None], size=tuple(size), mode="nearest")[0]   # (K, H, W)
    best, k = sim.max(0)
    return k, best


@torch.no_grad()
def prototype_map(model, image, pred, class_index, embed=None):
    """Fig. 3: pixels predicted as class c coloured by argmax_k i^T p_ck, brightness = that similarity."""
    k, best = class_similarity(model, image, pred.shape, class_index, embed)
    colours = draw.prototype_colours(model.head.prototypes.shape[1])[k.cpu().numpy()]   # (H, W, 3)
    brightness = best.clamp(0, 1).cpu().numpy()[..., None]
    out = colours * brightness * (pred.cpu().numpy() == class_index)[..., None]
    return Image.fromarray((out * 255).astype(np.uint8))


DARK = 0.2   # mean cosine below which a prototype map is too dark to read


def dark_note(best, mask, name):
    """A line saying why the map is dark: no pixel is predicted as the class, or its pixels barely resemble its
    prototypes (they start random, cosine ~0 to every embedding, and Eq. 14 moves them by 1 - mu a step); else None."""
    if not mask.any():
        return (f"note: the map of {name} is dark: no pixel of this image is predicted as {name}; choose a class "
                "the prediction shows with --class")
    mean = float(best[mask].mean())
    if mean >= DARK:
        return None
    return (f"note: the map of {name} is dark: mean cosine {mean:.2f} to its nearest prototype; the prototypes "
            "have barely moved from their random start (an early checkpoint? Eq. 14 moves them by 1 - mu a step)")


def panel_size(h, w, low=200, high=512):
    """Display size of one strip panel: small images enlarged by an integer factor, large ones shrunk."""
    f = math.ceil(low / h) if h < low else (high / h if h > high else 1)
    return max(1, round(h * f)), max(1, round(w * f))


def strip_picture(rgb, pred, names, palette, proto=None, note=None):
    """image | prediction | prototype map, with the legend underneath (the README's pictures).
    proto: (picture, k (H, W) nearest prototype of class c, K, c) or None (no prototype head)."""
    pred = pred.cpu().numpy()
    h, w = panel_size(*pred.shape)
    show = lambda img, near: img.resize((w, h), Image.NEAREST if near else Image.BILINEAR)
    panels = [draw.titled(show(Image.fromarray(rgb), False), "image"),
              draw.titled(show(data.colorize(pred, palette), True), "prediction")]
    if proto is not None:
        proto_img, k, K, c = proto
        panels.append(draw.titled(show(proto_img, True), f"prototypes of {names[c]}"))
    top = draw.row(panels)
    present = [i for i in range(len(names)) if (pred == i).any()]
    parts = [top, draw.legend([(palette[i], names[i]) for i in present], top.width, "classes:")]
    if proto is not None:
        mask = pred == c
        hues = draw.prototype_colours(K)
        shares = np.bincount(k[mask], minlength=K) / max(mask.sum(), 1)
        parts.append(draw.legend([(hues[j], f"p{j} {100 * s:.0f}%") for j, s in enumerate(shares)], top.width,
                                 f"{names[c]}'s prototypes (share of its pixels):"))
        parts.append(draw.scale_bar(min(top.width, 300)))
    if note:
        parts.append(draw.text_panel([note], top.width, fill=(180, 0, 0)))
    return draw.column(parts, gap=2)


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files and/or folders of images")
    p.add_argument("--val-index", nargs="+", type=ranged(int, ">= 0"), default=[], metavar="I",
                   help="synthetic val images by index (a synthetic checkpoint; the scenes of its --seed)")
    p.add_argument("--checkpoint", required=True, help="train.py's last.pt or an official ProtoSeg checkpoint")
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    p.add_argument("--class", dest="cls", default=None,
                   help="class (name or index) for the prototype map (default: the most predicted non-first class)")
    p.add_argument("--eval-crop", nargs="+", type=number(int, "eval_crop"), default=None,
                   help="sliding-window size H W or N (0: whole; default: the checkpoint's)")
    p.add_argument("--eval-stride", nargs="+", type=number(int, "eval_stride"), default=None,
                   help="sliding-window stride H W or N (0: 2/3 of the window; default: the checkpoint's)")
    p.add_argument("--eval-resize", nargs="+", type=number(int, "eval_resize"), default=None,
                   help="rescale to fit LONG SHORT keeping the ratio, labels at the image's size (0: none; default: "
                        "the checkpoint's)")
    p.add_argument("--eval-scales", nargs="+", type=number(float, "eval_scales"), default=[1.0],
                   help="test-time scales (default: 1)")
    p.add_argument("--eval-flip", action="store_true", help="add the horizontally flipped image")
    p.add_argument("--channel-order", choices=["rgb", "bgr"], default=None,
                   help="model input channel order (default: the checkpoint's; bgr for the official release)")
    p.add_argument("--labelids", action="store_true", help="only Cityscapes labelId PNGs (a submission folder)")
    p.add_argument("--device", type=device_flag, default=default_device(), help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if not args.images and not args.val_index:
        p.error("give image files / folders or --val-index I ...")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, expected a folder (created if missing)")
    for name in ("eval_crop", "eval_stride", "eval_resize"):
        v = getattr(args, name)
        if v is not None and len(v) > 2:
            p.error(f"--{name.replace('_', '-')} takes N or H W, got {len(v)} numbers")
        setattr(args, name, None if v is None else tuple((v * 2)[:2]))
    return args


def protocol_from_checkpoint(args, cfg):
    """The flags not given take the checkpoint's settings (its recipe's test protocol); a checkpoint
    without them: the defaults."""
    for name, default in (("eval_crop", (0, 0)), ("eval_stride", (0, 0)), ("eval_resize", (0, 0)),
                          ("channel_order", "rgb")):
        if getattr(args, name) is None:
            value = cfg.get(name, default)
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    args.eval_divisor = cfg.get("eval_divisor", 0) if args.eval_resize == tuple(cfg.get("eval_resize", (0, 0))) else 0


def open_model(path, device):
    """(model, config) of any checkpoint checkpoints.load_model reads; a bad file is one `error:` line."""
    try:
        return load_model(path, device)
    except CheckpointError as e:
        exit_with_error(str(e))


def check_outputs(args, found):
    """No output lands on an input or on another input's output, and --out is not an input folder or inside one
    (the next run would read the pictures back as inputs)."""
    for arg in args.images:
        if Path(arg).is_dir() and within(args.out, arg):
            exit_with_error(f"--out {args.out} is inside the input folder {arg}: a later run on {arg} would read "
                            f"these pictures back as inputs; expected an --out outside {arg}")
    first = {}
    for path, stem, _ in found:
        if stem in first:
            exit_with_error(f"inputs {first[stem]} and {path} would both write {Path(args.out) / stem}"
                            f"{'.png' if args.labelids else '_*.png'}; expected inputs of distinct names: give their "
                            "common folder (its sub-folders are kept), or predict them into separate --out folders")
        first[stem] = path
    ends = (".png",) if args.labelids else ("_pred.png", "_overlay.png", "_protos.png", "_strip.png", "_image.png")
    written = {real(Path(args.out) / f"{stem}{end}") for _, stem, _ in found for end in ends}
    for path, _, _ in found:
        if isinstance(path, Path) and real(path) in written:
            exit_with_error(f"{path} is an input and would be overwritten by an output of this command (--out "
                            f"{args.out}); expected an --out that holds none of the inputs")


def check_unused(args, cfg, stride_given):
    """The rule for a flag the chosen mode does not use: refused, naming it and the mode."""
    if args.cls is not None and (args.labelids or cfg["head"] != "protoseg"):
        why = "--labelids writes no pictures" if args.labelids else f"a {cfg['head']!r} head has no prototypes"
        exit_with_error(f"--class {args.cls} chooses the class of the prototype map, and {why}; expected no --class")
    if stride_given and not args.eval_crop[0]:
        exit_with_error(f"--eval-stride {' '.join(map(str, args.eval_stride))}: the stride of a sliding window, and "
                        "--eval-crop is 0 (the whole image); expected --eval-crop H W with it, or no --eval-stride")


def chosen_class(args, names):
    """--class as an index, or None (the most predicted non-first class of each image)."""
    if args.cls is None:
        return None
    cls = int(args.cls) if args.cls.isdigit() else (names.index(args.cls) if args.cls in names else None)
    if cls is None or not 0 <= cls < len(names):
        exit_with_error(f"--class {args.cls!r} is not one of {names} (or their indices 0..{len(names) - 1})")
    return cls


def main(argv=None, outputs=None):
    """Every input's pictures (see the module's docstring); (written, skipped), or exit 1 when one was skipped.
    outputs: the commands.Outputs that records what is written (cli reads it when the command is stopped)."""
    args = parse_args(argv)
    outputs = outputs or Outputs()
    outputs.folder = Path(args.out)
    outputs.doing = f"while loading {args.checkpoint}"
    model, cfg = open_model(args.checkpoint, args.device)
    names, palette = class_table(cfg)
    stride_given = args.eval_stride is not None
    protocol_from_checkpoint(args, cfg)
    if args.labelids and cfg.get("dataset") != "cityscapes":
        exit_with_error(f"--labelids needs a Cityscapes checkpoint; {args.checkpoint} is {cfg.get('dataset')!r}")
    check_unused(args, cfg, stride_given)
    cls = chosen_class(args, names)
    found = inputs(args, cfg)
    check_outputs(args, found)
    written, failed = 0, 0
    for i, (path, stem, read) in enumerate(found):
        outputs.doing = f"while predicting {path} (image {i + 1} of {len(found)})"
        problem = predict_one(model, cfg, read, outputs, stem, names, palette, cls, args, path)
        if problem:                                             # report, go on with the rest
            print(f"skipping {path}: {problem}", file=sys.stderr, flush=True)
            failed += 1
            continue
        written += 1
        print(f"{path} -> {outputs.folder / stem}{'.png' if args.labelids else '_*.png'}", flush=True)
    print(f"wrote {written} image(s) to {args.out}" + (f"; {failed} skipped (see above)" if failed else ""))
    if failed or not written:
        raise SystemExit(1)
    return written, failed


def predict_one(model, cfg, read, outputs, stem, names, palette, cls, args, path):
    """One input's pictures; None, or why it was skipped: unreadable, or too large for the device's memory."""
    rgb = None
    try:
        rgb = read()                                            # 16-bit images scaled by their range
        if not isinstance(path, Path):                          # a synthetic val scene: put the image on disk too
            outputs.save(Image.fromarray(rgb), f"{stem}_image.png")
        write_outputs(model, cfg, rgb, outputs, stem, names, palette, cls, args)
    except data.DatasetError as e:
        return f"cannot read it as an image ({error_message(e, 200)})"
    except (MemoryError, RuntimeError) as e:
        text = error_message(e, limit=None)
        if not isinstance(e, MemoryError) and not NO_MEMORY.search(text):
            raise
        size = f"{rgb.shape[1]}x{rgb.shape[0]} (WxH) " if rgb is not None else ""
        asked = f" (tried to allocate {asked_for(text)})" if asked_for(text) else ""
        return (f"out of memory at {size}with --eval-scales {' '.join(map(str, args.eval_scales))}, --eval-crop "
                f"{' '.join(map(str, args.eval_crop))} on {args.device}{asked}"
                "; expected an image that fits this device: a sliding window (--eval-crop 512), smaller --eval-scales "
                "or --eval-resize LONG SHORT")
    return None


def inputs(args, cfg):
    """[(path or 'val I', output stem, read() -> HxWx3 uint8)]: the files, then the synthetic val scenes."""
    found = [(p, stem, lambda p=p: read_image(p)) for p, stem in output_names(args.images)]
    if args.val_index:
        if not str(cfg.get("dataset", "")).startswith("synthetic"):
            exit_with_error(f"--val-index takes the synthetic dataset's val images; {args.checkpoint} was trained on "
                            f"{cfg.get('dataset')!r}: give its image files instead")
        val = data.SyntheticDataset("val", seed=cfg.get("seed", 0))
        bad = [i for i in args.val_index if not 0 <= i < len(val)]
        if bad:
            exit_with_error(f"--val-index {bad[0]} is outside the synthetic val set (0..{len(val) - 1})")
        found += [(f"val {i}", Path(f"val_{i:06d}"), lambda i=i: val.load(i)[0]) for i in args.val_index]
    return found


@torch.no_grad()
def write_outputs(model, cfg, rgb, outputs, stem, names, palette, cls, args):
    """The pictures of one image (rgb HxWx3 uint8) as outputs' files stem_pred.png, ... (or stem.png: --labelids)."""
    transform = data.EvalTransform(args.channel_order, args.eval_resize, args.eval_divisor)
    image = transform(rgb, [])[0][None].to(args.device)
    scores = predict_scores(model, image, len(names), args.eval_crop, tuple(args.eval_scales), args.eval_flip,
                            stride=args.eval_stride, size=rgb.shape[:2])
    pred = scores.argmax(1)[0]
    if args.labelids:
        outputs.save(Image.fromarray(data.trainid_to_labelid(pred)), f"{stem}.png")
        return
    coloured = data.colorize(pred, palette)
    outputs.save(coloured, f"{stem}_pred.png")
    outputs.save(Image.blend(Image.fromarray(rgb), coloured, 0.5), f"{stem}_overlay.png")
    proto, note = None, None
    if cfg["head"] == "protoseg":
        counts = torch.bincount(pred.flatten(), minlength=len(names))
        c = cls if cls is not None else int(counts[1:].argmax()) + 1 if len(names) > 1 else 0
        embed = model.embed(image)                              # (1, h, w, D), once for both
        k, best = class_similarity(model, image, pred.shape, c, embed)
        picture = prototype_map(model, image, pred, c, embed)
        outputs.save(picture, f"{stem}_protos.png")
        note = dark_note(best, pred == c, names[c])
        if note:
            print(note, file=sys.stderr)
        proto = (picture, k.cpu().numpy(), model.head.prototypes.shape[1], c)
    outputs.save(strip_picture(rgb, pred, names, palette, proto, note), f"{stem}_strip.png")


def cli(argv=None):
    """main() as a command: Ctrl-C / SIGTERM end in one line saying what was written (exit 130 / 143)."""
    outputs = Outputs()
    run_command(lambda: main(argv, outputs), outputs.stopped,
                out_of_memory=lambda text: outputs.out_of_memory(text, "--eval-crop 512, smaller --eval-scales"))


if __name__ == "__main__":
    cli()
