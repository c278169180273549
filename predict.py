"""Pictures and submissions from a checkpoint: coloured prediction, overlay, the paper's Fig. 3 prototype map.

    python predict.py --checkpoint runs/synthetic/last.pt img1.png img2.jpg --out pictures
    python predict.py --checkpoint runs/cityscapes/last.pt /data/cityscapes/leftImg8bit/test --labelids --out results

Inputs are image files and folders (walked recursively; names keep their sub-folders). For each image IMG it writes
IMG_pred.png (palette colours), IMG_overlay.png (prediction blended on the image) and, for a ProtoSeg checkpoint,
IMG_protos.png: the pixels predicted as --class, each coloured by its nearest prototype of that class (one hue per
prototype), brightness = cosine similarity to it (Fig. 3).
--labelids writes only IMG.png holding Cityscapes labelIds, one file per frame: the folder cityscapesScripts'
evaluator takes as CITYSCAPES_RESULTS and the format of the test server. The checkpoint may be train.py's or the
official ProtoSeg release. Exit code 1 when an input could not be read or nothing was written.
"""
import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from evaluate import CheckpointError, load_model, predict_scores
from labels import CLASS_TABLES, IMAGE_EXTS
from settings import number  # the ranges train.py checks: scales > 0, crops >= 0, finite



def class_table(cfg):
    """(class names, palette (C, 3) uint8) of the checkpoint's dataset; numbered names otherwise."""
    names, palette = CLASS_TABLES.get(cfg.get("dataset"), (None, None))
    if names is None or len(names) != cfg["num_classes"]:
        return [str(i) for i in range(cfg["num_classes"])], data.default_palette(cfg["num_classes"])
    return list(names), np.asarray(palette, np.uint8)


def output_names(inputs):
    """[(image path, output stem relative to --out)]: folders walked; a stem two inputs share keeps its suffix."""
    found = []
    for arg in map(Path, inputs):
        if arg.is_dir():
            files = sorted(p for p in arg.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
            if not files:
                print(f"warning: no images in folder {arg}", file=sys.stderr)
            found += [(p, p.relative_to(arg).with_suffix("")) for p in files]
        else:
            found.append((arg, Path(arg.stem)))
    seen = {}
    for _, stem in found:
        seen[stem] = seen.get(stem, 0) + 1
    return [(p, stem.with_name(stem.name + "_" + p.suffix.lstrip(".").lower()) if seen[stem] > 1 else stem)
            for p, stem in found]


def prototype_colours(k):
    """k well-separated hues (HSV wheel), full saturation and value. (k, 3) float in [0, 1]."""
    return np.array([colorsys.hsv_to_rgb(i / k, 1.0, 1.0) for i in range(k)], np.float32)


@torch.no_grad()
def prototype_map(model, image, pred, class_index):
    """Fig. 3: pixels predicted as class c coloured by argmax_k i^T p_ck, brightness = that similarity."""
    embed = model.embed(image)[0]                                                # (h, w, D)
    protos = F.normalize(model.head.prototypes[class_index].float(), dim=-1)     # (K, D)
    sim = embed.float() @ protos.T                                               # (h, w, K)
    sim = F.interpolate(sim.permute(2, 0, 1)[None], size=pred.shape, mode="nearest")[0]   # (K, H, W)
    best, k = sim.max(0)
    colours = prototype_colours(protos.shape[0])[k.cpu().numpy()]               # (H, W, 3)
    brightness = best.clamp(0, 1).cpu().numpy()[..., None]
    out = colours * brightness * (pred.cpu().numpy() == class_index)[..., None]
    return Image.fromarray((out * 255).astype(np.uint8))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--checkpoint", required=True, help="train.py's last.pt or an official ProtoSeg checkpoint")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--class", dest="cls", default=None,
                   help="class (name or index) for the prototype map (default: the most predicted non-first class)")
    p.add_argument("--eval-crop", nargs="+", type=number(int, "eval_crop"), default=None,
                   help="sliding-window size H W or N (0: whole; default: the checkpoint's)")
    p.add_argument("--eval-stride", nargs="+", type=number(int, "eval_stride"), default=None,
                   help="sliding-window stride H W or N (0: 2/3 of the window; default: the checkpoint's)")
    p.add_argument("--eval-resize", nargs="+", type=number(int, "eval_resize"), default=None,
                   help="rescale to fit LONG SHORT keeping the ratio, labels at the image's size (0: none; default: "
                        "the checkpoint's)")
    p.add_argument("--eval-scales", nargs="+", type=number(float, "eval_scales"), default=[1.0], help="test-time scales (default: 1)")
    p.add_argument("--eval-flip", action="store_true", help="add the horizontally flipped image")
    p.add_argument("--channel-order", choices=["rgb", "bgr"], default=None,
                   help="model input channel order (default: the checkpoint's; bgr for the official release)")
    p.add_argument("--labelids", action="store_true", help="only Cityscapes labelId PNGs (a submission folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for name in ("eval_crop", "eval_stride", "eval_resize"):
        v = getattr(args, name)
        if v is not None and (len(v) > 2 or min(v) < 0):
            p.error(f"--{name.replace('_', '-')} takes N or H W (>= 0), got {v}")
        setattr(args, name, None if v is None else tuple((v * 2)[:2]))
    return args


def test_protocol(args, cfg):
    """The flags not given take the checkpoint's settings (its recipe's test protocol); older checkpoints: none."""
    for name, default in (("eval_crop", (0, 0)), ("eval_stride", (0, 0)), ("eval_resize", (0, 0)),
                          ("channel_order", "rgb")):
        if getattr(args, name) is None:
            value = cfg.get(name, default)
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    args.eval_divisor = cfg.get("eval_divisor", 0) if args.eval_resize == tuple(cfg.get("eval_resize", (0, 0))) else 0


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        model, cfg = load_model(args.checkpoint, device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    names, palette = class_table(cfg)
    test_protocol(args, cfg)
    if args.labelids and cfg.get("dataset") != "cityscapes":
        sys.exit(f"error: --labelids needs a Cityscapes checkpoint; {args.checkpoint} is {cfg.get('dataset')!r}")
    cls = None
    if args.cls is not None:
        cls = int(args.cls) if args.cls.isdigit() else (names.index(args.cls) if args.cls in names else None)
        if cls is None or not 0 <= cls < len(names):
            sys.exit(f"error: --class {args.cls!r} is not one of {names}")
    written, failed = 0, 0
    for path, stem in output_names(args.images):
        try:
            rgb = data.read_image(path)                         # 16-bit images scaled by their range
        except data.DatasetError as e:                          # report, go on with the rest
            print(f"skipping {path}: cannot read it as an image ({' '.join(str(e).split())[:200]})", file=sys.stderr)
            failed += 1
            continue
        out = Path(args.out) / stem
        out.parent.mkdir(parents=True, exist_ok=True)
        write_outputs(model, cfg, rgb, out, names, palette, cls, args, device)
        written += 1
        print(f"{path} -> {out}{'.png' if args.labelids else '_*.png'}", flush=True)
    print(f"wrote {written} image(s) to {args.out}" + (f"; {failed} could not be read" if failed else ""))
    if failed or not written:
        raise SystemExit(1)
    return written, failed


def write_outputs(model, cfg, rgb, out, names, palette, cls, args, device):
    transform = data.EvalTransform(args.channel_order, args.eval_resize, args.eval_divisor)
    image = transform(rgb, [])[0][None].to(device)
    scores = predict_scores(model, image, len(names), args.eval_crop, tuple(args.eval_scales), args.eval_flip,
                            stride=args.eval_stride, size=rgb.shape[:2])
    pred = scores.argmax(1)[0]
    if args.labelids:
        Image.fromarray(data.trainid_to_labelid(pred)).save(f"{out}.png")
        return
    coloured = data.colorize(pred, palette)
    coloured.save(f"{out}_pred.png")
    Image.blend(Image.fromarray(rgb), coloured, 0.5).save(f"{out}_overlay.png")
    if cfg["head"] == "protoseg":
        counts = torch.bincount(pred.flatten(), minlength=len(names))
        c = cls if cls is not None else int(counts[1:].argmax()) + 1
        prototype_map(model, image, pred, c).save(f"{out}_protos.png")


if __name__ == "__main__":
    main()
