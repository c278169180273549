"""Pictures from a trained checkpoint: coloured prediction, overlay, and the paper's Fig. 3 prototype map.

    python predict.py --checkpoint runs/synthetic/last.pt img1.png img2.jpg --out pictures
    python predict.py --checkpoint runs/cityscapes/last.pt frames/*.png --out pred --eval-crop 1024 1024 --labelids

For each image IMG it writes IMG_pred.png (palette colours), IMG_overlay.png (prediction blended on the image) and,
for a ProtoSeg checkpoint, IMG_protos.png: the pixels predicted as --class, each coloured by its nearest prototype
of that class (one hue per prototype), brightness = cosine similarity to it (Fig. 3). --labelids also writes
Cityscapes labelId PNGs, the format of the official evaluation server. Unreadable images are reported and skipped.
"""
import argparse
import colorsys
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from models import build_model
from train import predict_scores

LABELS = {"cityscapes": (data.CITYSCAPES_CLASSES, data.CITYSCAPES_PALETTE),
          "ade20k": (data.ADE20K_CLASSES, data.ADE20K_PALETTE),
          "coco_stuff": (data.COCO_STUFF_CLASSES, data.COCO_STUFF_PALETTE),
          "synthetic": (data.SYNTHETIC_CLASSES, data.SYNTHETIC_PALETTE)}


def load_model(path, device):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    num_classes = ckpt["model"]["head.prototypes"].shape[0] if cfg["head"] == "protoseg" else None
    names, palette = LABELS.get(cfg["dataset"], (None, None))
    num_classes = num_classes or (len(names) if names else cfg["num_classes"])
    if names is None:
        names, palette = [str(i) for i in range(num_classes)], data.default_palette(num_classes)
    kw = dict(num_prototypes=cfg["num_prototypes"], class_layernorm=cfg["class_layernorm"],
              embed_layernorm=cfg["embed_layernorm"]) if cfg["head"] == "protoseg" else {}
    model = build_model(cfg["backbone"], cfg["head"], num_classes, **kw)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, list(names), np.asarray(palette, np.uint8)


def prototype_colours(k):
    """k well-separated hues (HSV wheel), full saturation and value. (k, 3) float in [0, 1]."""
    return np.array([colorsys.hsv_to_rgb(i / k, 1.0, 1.0) for i in range(k)], np.float32)


@torch.no_grad()
def prototype_map(model, image, pred, class_index):
    """Fig. 3: pixels predicted as class c coloured by argmax_k i^T p_ck, brightness = that similarity."""
    head = model.head
    embed = head.embed(model.neck(model.backbone(image)))[0]                   # (h, w, D)
    protos = F.normalize(head.prototypes[class_index].float(), dim=-1)           # (K, D)
    sim = embed.float() @ protos.T                                               # (h, w, K)
    sim = F.interpolate(sim.permute(2, 0, 1)[None], size=pred.shape, mode="nearest")[0]   # (K, H, W)
    best, k = sim.max(0)
    colours = prototype_colours(protos.shape[0])[k.cpu().numpy()]               # (H, W, 3)
    brightness = best.clamp(0, 1).cpu().numpy()[..., None]
    out = colours * brightness * (pred.cpu().numpy() == class_index)[..., None]
    return Image.fromarray((out * 255).astype(np.uint8))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (RGB)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--class", dest="cls", default=None,
                   help="class (name or index) for the prototype map (default: the most predicted non-first class)")
    p.add_argument("--eval-crop", nargs=2, type=int, default=(0, 0), help="sliding-window size h w (0 0: whole)")
    p.add_argument("--labelids", action="store_true", help="also write Cityscapes labelId PNGs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        sys.exit(f"error: checkpoint {args.checkpoint} not found")
    device = torch.device(args.device)
    model, cfg, names, palette = load_model(args.checkpoint, device)
    if args.labelids and cfg["dataset"] != "cityscapes":
        sys.exit(f"error: --labelids needs a Cityscapes checkpoint, this one is {cfg['dataset']!r}")
    cls = None
    if args.cls is not None:
        cls = int(args.cls) if args.cls.isdigit() else (names.index(args.cls) if args.cls in names else None)
        if cls is None or not 0 <= cls < len(names):
            sys.exit(f"error: --class {args.cls!r} is not one of {names}")
    os.makedirs(args.out, exist_ok=True)
    written, skipped = 0, 0
    for path in args.images:
        try:
            rgb = np.asarray(Image.open(path).convert("RGB"))
        except Exception as e:                                  # unreadable: report, go on with the rest
            print(f"skipping {path}: cannot read it as an image ({e})", file=sys.stderr)
            skipped += 1
            continue
        image = data.normalize(rgb.astype(np.float32))[None].to(device)
        scores = predict_scores(model, image, len(names), tuple(args.eval_crop))
        pred = scores.argmax(1)[0]
        stem = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0])
        coloured = data.colorize(pred, palette)
        coloured.save(stem + "_pred.png")
        Image.blend(Image.fromarray(rgb), coloured, 0.5).save(stem + "_overlay.png")
        if cfg["head"] == "protoseg":
            c = cls if cls is not None else int(torch.bincount(pred.flatten(), minlength=len(names))[1:].argmax()) + 1
            prototype_map(model, image, pred, c).save(stem + "_protos.png")
        if args.labelids:
            Image.fromarray(data.trainid_to_labelid(pred)).save(stem + "_labelIds.png")
        written += 1
        print(f"{path} -> {stem}_*.png", flush=True)
    print(f"wrote {written} image(s) to {args.out}" + (f"; skipped {skipped} unreadable" if skipped else ""))
    return written, skipped


if __name__ == "__main__":
    main()
