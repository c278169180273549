"""An atlas of a trained ProtoSeg model: what each prototype takes, whether the K of a class collapsed, what they see.

    python atlas.py --checkpoint runs/synthetic/last.pt                # synthetic val set, into runs/atlas
    python atlas.py --checkpoint hrnet_w48_proto_cityscapes.pth --data-root /data/cityscapes --out runs/atlas_city
    python atlas.py --checkpoint runs/synthetic/last.pt --compare runs/softmax/metrics.json

Writes DIR/atlas.json, DIR/index.html (a plain page linking the pictures) and PNGs:
  class_<c>_<name>.png   the share of the class's val pixels each of its K prototypes takes (nearest prototype of
                         the class, on its labelled pixels), the K x K cosine matrix of its prototypes and the
                         collapse score (mean off-diagonal cosine: 1 = all K the same vector), and a 2-D PCA of
                         sampled pixel embeddings of the class on its first two principal axes, coloured by nearest
                         prototype (and by the true mode on the synthetic set), prototypes marked with crosses
  gallery_<c>_<name>.png for each prototype, the N val patches whose pixel is most similar to it, each captioned
                         with the cosine and the pixel's true class (and mode on the synthetic set)
  maps_<i>.png           Fig. 3 maps of every predicted class on the first --images val images, with a legend
  compare.png            --compare: per-class IoU of this model (on the images the atlas saw) and of another run
The checkpoint is train.py's or the official release (checkpoints.load_model); the dataset is the checkpoint's
unless --dataset says otherwise (an official file with C != 19 classes needs --dataset). Every file is written whole
or not at all; Ctrl-C / SIGTERM end in one line saying what was written (exit 130 / 143).
"""
import argparse
import html
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import draw
from collectives import default_device
from commands import Outputs, Parser, device_flag, error_message, exit_with_error, ranged, run_command
from datafiles import unreadable_reason
from evaluate import (IN_USE, NUM_MODES, confusion_matrix, metrics_from_confusion, prototype_counts, prototype_summary,
                      strict_json)
from labels import IGNORE_INDEX
from layers import labels_to
from predict import class_similarity, class_table, dark_note, open_model, prototype_map
from protoseg import similarities
from runs import check_out_dir
from settings import PRESETS


def fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


def collapse_score(prototypes):
    """Mean off-diagonal cosine of one class's K prototypes (K, D): 1 = all the same, ~0 = orthogonal; None if K = 1."""
    p = F.normalize(prototypes.float(), dim=-1)
    cos = p @ p.T
    K = p.shape[0]
    return None if K < 2 else float((cos.sum() - cos.diagonal().sum()) / (K * (K - 1)))


# ----------------------------------------------------------------------------- one pass over the val set

@torch.no_grad()
def collect(model, dataset, device, limit=0, gallery=8, samples=1500, seed=0, at=lambda i, n: None):
    """Everything the pictures need, from one forward per val image (the first `limit`; 0 = all):
    counts (C, K, M) as evaluate.prototype_counts, the confusion matrix, per prototype the `gallery` best
    (cosine, image, y, x, true mode or -1) of its class's labelled pixels (one per image), and per class sampled
    embeddings. at(i, n): called before image i of n."""
    protos = model.head.unit_prototypes()
    C, K, D = protos.shape
    n = min(limit or len(dataset), len(dataset))
    rng = np.random.default_rng(seed)
    counts = torch.zeros(C, K, NUM_MODES, dtype=torch.long)
    conf = torch.zeros(C, C, dtype=torch.long)
    best = [[[] for _ in range(K)] for _ in range(C)]
    pool = [[] for _ in range(C)]                      # per class: (embeddings (n, D), modes (n,) or None)
    per_image = max(4, samples // max(n, 1))
    has_modes = False
    for i in range(n):
        at(i, n)
        item = dataset[i]
        image, label = item["image"][None].to(device), item["label"].to(device)
        out = model(image)
        embed = out["embed"]                                             # (1, D, h, w) unit vectors
        sim = similarities(embed, protos)                                # (1, C, K, h, w)
        pred = out["scores"].argmax(1)[0]
        conf += confusion_matrix(pred, label, C).cpu()
        modes = item.get("modes")
        has_modes |= modes is not None
        emb = embed[0].permute(1, 2, 0)                                  # (h, w, D)
        counts += prototype_counts(emb, label, None if modes is None else modes.to(device), protos, NUM_MODES).cpu()
        h, w = emb.shape[:2]
        lab = labels_to(label[None], (h, w))[0].cpu()
        mod = None if modes is None else labels_to(modes[None], (h, w))[0]
        sim = sim[0].float().cpu()                                       # (C, K, h, w)
        for c in lab.unique().tolist():
            if c == IGNORE_INDEX:
                continue
            mask = lab == c
            for k in range(K):                                           # this image's best pixel for p_ck
                s = sim[c, k].where(mask, torch.tensor(-2.0))
                j = int(s.argmax())
                m = -1 if mod is None else int(mod.flatten()[j])
                best[c][k].append((float(s.flatten()[j]), i, j // w, j % w, m))
            idx = torch.nonzero(mask.flatten()).squeeze(1).numpy()
            pick = rng.choice(idx, min(per_image, len(idx)), replace=False)
            pool[c].append((emb.flatten(0, 1)[pick].float().cpu(), None if mod is None else mod.flatten()[pick].long()))
    best = [[sorted(b, reverse=True)[:gallery] for b in bc] for bc in best]
    return dict(counts=counts if has_modes else counts.sum(2, keepdim=True), conf=conf, best=best, pool=pool,
                images=n, feature_size=(h, w))


def class_stats(model, found, names):
    """atlas.json's per-class entries: shares, in use, cosine matrix, collapse score (purity with modes), IoU."""
    protos = model.head.unit_prototypes().float().cpu()
    summary = prototype_summary(found["counts"], IN_USE)
    iou = metrics_from_confusion(found["conf"])["iou"]
    out = {}
    for c, name in enumerate(names):
        entry = {"pixels": int(found["counts"][c].sum()), "prototype_share": summary["prototype_share"][c],
                 "prototypes_in_use": summary["prototypes_in_use"][c], "cosine": (protos[c] @ protos[c].T).tolist(),
                 "collapse": collapse_score(protos[c]), "iou": iou[c]}
        if "purity" in summary:
            entry["purity"] = summary["purity"][c]
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- pictures

def pca_2d(x, extra):
    """Project rows of x (n, D) and extra (m, D) onto x's two principal axes, scaled into [-0.95, 0.95] (one scale
    for both axes); also the share of x's variance each axis holds."""
    mean = x.mean(0, keepdim=True)
    _, sv, v = torch.linalg.svd(x - mean, full_matrices=False)
    axes = v[:2].T                                                        # (D, 2)
    a, b = (x - mean) @ axes, (extra - mean) @ axes
    scale = torch.cat([a, b]).abs().max().clamp(min=1e-8) / 0.95
    shares = (sv[:2] ** 2 / (sv ** 2).sum().clamp(min=1e-12)).tolist()
    return (a / scale).numpy(), (b / scale).numpy(), shares + [0.0] * (2 - len(shares))


def class_picture(model, stats, found, c, name):
    """Shares | cosine matrix | PCA by nearest prototype | PCA by mode (when modes exist)."""
    K = model.head.prototypes.shape[1]
    hues = draw.prototype_colours(K)
    share = stats["prototype_share"] or [0.0] * K
    collapse = stats["collapse"]
    head = [f"{name}: {stats['pixels']} labelled pixels (feature grid) on {found['images']} val images",
            f"prototypes in use (>= {100 * IN_USE:.0f} %): {stats['prototypes_in_use']}  |  collapse score "
            f"(mean off-diagonal cosine): {fmt(collapse)}"
            + (f"  |  purity {100 * stats['purity']:.0f} %" if stats.get("purity") is not None else "")]
    panels = [draw.titled(draw.bars(share, hues, [f"p{k}" for k in range(K)]), "share of the class's pixels (%)"),
              draw.titled(draw.heatmap(stats["cosine"], labels=[f"p{k}" for k in range(K)]),
                          "cosine p_k . p_j (blue -1, white 0, red 1)")]
    if found["pool"][c]:
        x = torch.cat([e for e, _ in found["pool"][c]])
        p = model.head.unit_prototypes()[c].float().cpu()
        nearest = (x @ p.T).argmax(1).numpy()
        xy, pxy, shares = pca_2d(x, p)
        axes = [f"PC{j + 1} ({100 * v:.0f} %)" for j, v in enumerate(shares)]
        marks = [(pxy[k], hues[k]) for k in range(K)]
        panel = draw.titled(draw.scatter(xy, hues[nearest], marks=marks, axes=axes),
                            "PCA of embeddings: nearest prototype")
        panels.append(draw.column([panel, draw.legend([(hues[k], f"p{k}") for k in range(K)], panel.width,
                                                      "dot: pixel, x: prototype;")], 2))
        if found["pool"][c][0][1] is not None:
            modes = torch.cat([m for _, m in found["pool"][c]]).numpy()
            mode_hues = draw.prototype_colours(max(int(modes.max()) + 1, 3))[::-1]
            panel = draw.titled(draw.scatter(xy, mode_hues[modes], marks=[(q, (0, 0, 0)) for q in pxy], axes=axes),
                                "the same points: true mode")
            panels.append(draw.column([panel, draw.legend([(mode_hues[m], f"mode {m}") for m in
                                                           sorted(set(modes.tolist()))], panel.width)], 2))
    body = draw.row(panels, gap=12)
    return draw.column([draw.text_panel(head, body.width), body])


def patch(rgb, y, x, feature_size, size=64):
    """The image region around feature cell (y, x), enlarged to size x size, the cell outlined."""
    H, W = rgb.shape[:2]
    sy, sx = H / feature_size[0], W / feature_size[1]
    half = int(max(12, min(H, W) / 8))
    cy, cx = int((y + 0.5) * sy), int((x + 0.5) * sx)
    y0, x0 = min(max(cy - half, 0), max(H - 2 * half, 0)), min(max(cx - half, 0), max(W - 2 * half, 0))
    crop = Image.fromarray(rgb[y0:y0 + 2 * half, x0:x0 + 2 * half]).resize((size, size), Image.NEAREST)
    f = size / (2 * half)
    box = [(cx - sx / 2 - x0) * f, (cy - sy / 2 - y0) * f, (cx + sx / 2 - x0) * f, (cy + sy / 2 - y0) * f]
    ImageDraw.Draw(crop).rectangle(box, outline=(255, 255, 255))
    return crop


def gallery_picture(dataset, found, c, name, K, stats):
    """Per prototype of class c, its best val patches, each captioned: cosine, the pixel's true class (the gallery
    takes only pixels labelled c) and, on the synthetic set, its true mode."""
    hues = draw.prototype_colours(K)
    rows = []
    share = stats["prototype_share"] or [0.0] * K
    for k in range(K):
        tiles = [draw.column([draw.text_panel([f"{s:.2f}", f"{name[:10]}{f' m{m}' if m >= 0 else ''}"], 64),
                              patch(dataset.load(i)[0], y, x, found["feature_size"])], 0)
                 for s, i, y, x, m in found["best"][c][k]]
        label = draw.legend([(hues[k], f"p{k} {100 * share[k]:.0f}%")], 80)
        rows.append(draw.row([label] + tiles, gap=4))
    title = (f"{name}: for each prototype, the val patches whose pixel (outlined) is most similar to it; each "
             "captioned with the cosine and the pixel's true class" + (" and mode (m)" if any(
                 t[4] >= 0 for b in found["best"][c] for t in b) else ""))
    body = draw.column(rows, gap=4)
    return draw.column([draw.text_panel([title], max(body.width, 400)), body])


@torch.no_grad()
def maps_picture(model, dataset, i, names, palette, device):
    """Fig. 3 maps of every class the model predicts on val image i, with the legend."""
    item = dataset[i]
    image = item["image"][None].to(device)
    out = model(image)
    embed, pred = out["embed"].permute(0, 2, 3, 1), out["scores"].argmax(1)[0]
    rgb = dataset.load(i)[0]
    h, w = image.shape[-2:]
    height = 160 if h <= 160 else min(h, 256)
    show = lambda img, near: draw.resize_height(img, height, near)
    present = [c for c in range(len(names)) if (pred == c).any()]
    panels = [draw.titled(show(Image.fromarray(rgb), False), f"val {i}"),
              draw.titled(show(data.colorize(pred, palette), True), "prediction")]
    panels += [draw.titled(show(prototype_map(model, image, pred, c, embed), True), names[c]) for c in present]
    body = draw.grid(panels, 6)
    K = model.head.prototypes.shape[1]
    notes = [dark_note(class_similarity(model, image, pred.shape, c, embed)[1], pred == c, names[c]) for c in present]
    notes = [draw.text_panel([n], body.width, fill=(180, 0, 0)) for n in notes if n]
    return draw.column([body, *notes[:1], draw.legend([(palette[c], names[c]) for c in present], body.width, "classes:"),
                        draw.legend([(hue, f"p{k}") for k, hue in enumerate(draw.prototype_colours(K))], body.width,
                                    "prototype hues (in each class's map):"),
                        draw.scale_bar(min(body.width, 300))], gap=2)


def compare_picture(ours, other, names, other_name):
    """Two bars per class: this model's IoU and the other run's."""
    blue, orange = (60, 110, 200), (240, 150, 40)
    rows = [draw.legend([(blue, "this checkpoint"), (orange, other_name)], 400, "per-class IoU (%):")]
    for name in names:
        a, b = ours.get(name), other.get(name)
        line = Image.new("RGB", (420, 26), draw.WHITE)
        d = ImageDraw.Draw(line)
        d.text((2, 7), name[:18], fill=draw.BLACK, font=draw.font())
        for j, (v, col) in enumerate(((a, blue), (b, orange))):
            if v is not None:
                d.rectangle([120, 2 + 12 * j, 120 + int(240 * v), 11 + 12 * j], fill=col)
            d.text((365, 1 + 12 * j), "n/a" if v is None else f"{100 * v:.1f}", fill=draw.BLACK, font=draw.font())
        rows.append(line)
    return draw.column(rows, gap=1)


# ----------------------------------------------------------------------------- the command

def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train.py's last.pt or an official ProtoSeg checkpoint")
    p.add_argument("--out", default="runs/atlas", help="output folder (default: runs/atlas)")
    p.add_argument("--dataset", type=str.lower, choices=list(PRESETS), default=None,
                   help="val set to use (default: the checkpoint's)")
    p.add_argument("--data-root", default=None, help="the dataset's folder (not for synthetic)")
    p.add_argument("--images", type=ranged(int, ">= 0"), default=6, help="val images with Fig. 3 maps (default 6)")
    p.add_argument("--gallery", type=ranged(int, ">= 0"), default=8, help="patches per prototype (default 8)")
    p.add_argument("--val-images", type=ranged(int, ">= 0"), default=0,
                   help="val images to count over (default 0: all)")
    p.add_argument("--compare", default=None, help="another run's metrics.json: per-class IoU side by side")
    p.add_argument("--device", type=device_flag, default=default_device(), help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, expected a folder (created if missing)")
    if args.data_root and not Path(args.data_root).is_dir():
        found = "a file" if Path(args.data_root).exists() else unreadable_reason(args.data_root)
        p.error(f"--data-root {args.data_root}: {found}, expected the dataset's folder")
    return args


def val_set(cfg, args):
    name = args.dataset or cfg.get("dataset", "synthetic")
    if name.startswith("synthetic") and args.data_root:
        exit_with_error(f"--data-root {args.data_root}: --dataset {name} (the checkpoint's unless --dataset says "
                        "otherwise) is generated and reads no files; expected no --data-root, or --dataset with it")
    if name == "folder" and not args.dataset:
        exit_with_error(f"{args.checkpoint} has {cfg['num_classes']} classes and no dataset name; pass --dataset (and "
                        "--data-root)")
    kw = dict(num_classes=cfg["num_classes"], ignore_value=cfg.get("ignore_value", 255)) if name == "folder" else {}
    kw.update(seed=cfg.get("seed", 0))
    try:
        val = data.build_dataset(name, args.data_root, "val", data.EvalTransform(), **kw)
    except data.DatasetError as e:
        exit_with_error(error_message(e))
    if val.num_classes != cfg["num_classes"]:
        exit_with_error(f"--dataset {name} has {val.num_classes} classes; {args.checkpoint} has {cfg['num_classes']} "
                        f"({cfg.get('dataset')}); expected the checkpoint's data (--dataset {cfg.get('dataset')} and "
                        "its --data-root)")
    check_out_dir(args.out, "--out", args.data_root, val)
    return name, val


def read_metrics(path):
    """{class name: IoU} from a metrics.json (train.py's strict JSON)."""
    found = unreadable_reason(path)
    if found:
        exit_with_error(f"--compare {path}: {found}, expected the metrics.json of a train.py run")
    try:
        m = json.loads(Path(path).read_text())
        return {name: row.get("iou") for name, row in m["classes"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        exit_with_error(f"--compare {path}: cannot read per-class IoU ({type(e).__name__}: "
                        f"{error_message(e, 160)}); expected the metrics.json of a train.py run")


def index_page(files, classes):
    """index.html: the per-class numbers and every picture."""
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{s['prototypes_in_use']}</td><td>"
                   f"{fmt(s['collapse'])}</td></tr>" for n, s in classes.items())
    imgs = "".join(f'<h3>{html.escape(f)}</h3><p><a href="{f}"><img src="{f}"></a></p>\n' for f in files)
    return ("<!doctype html><meta charset=utf-8><title>ProtoSeg atlas</title><h1>ProtoSeg atlas</h1>"
            "<p>numbers: <a href=atlas.json>atlas.json</a></p><table border=1 cellpadding=3><tr><th>class</th>"
            f"<th>prototypes in use</th><th>collapse score</th></tr>{rows}</table>\n{imgs}")


def main(argv=None, outputs=None):
    """The atlas (see the module's docstring); returns atlas.json's content. outputs: the commands.Outputs that records
    what is written (cli reads it when the command is stopped)."""
    args = parse_args(argv)
    outputs = outputs or Outputs()
    outputs.folder = Path(args.out)
    outputs.doing = f"while loading {args.checkpoint}"
    model, cfg = open_model(args.checkpoint, args.device)
    if cfg["head"] != "protoseg":
        exit_with_error(f"{args.checkpoint} has a {cfg['head']!r} head; the atlas needs a ProtoSeg head (prototypes)")
    other = read_metrics(args.compare) if args.compare else None
    name, val = val_set(cfg, args)
    names, palette = class_table(cfg if name == "folder" else {**cfg, "dataset": name})   # folder: unnamed classes
    n = min(args.val_images or len(val), len(val))
    shown = [0.0]

    def reading(i, n):                                          # what a stop message says; a line every 10 s
        outputs.doing = f"while reading the val images ({i} of {n} done)"
        if i and time.time() - shown[0] > 10:
            print(f"atlas: {i} of {n} val images read", flush=True)
            shown[0] = time.time()
    reading(0, n)
    print(f"atlas of {args.checkpoint}: one pass over {n} val images of {name}", flush=True)
    found = collect(model, val, args.device, n, args.gallery, at=reading)
    classes = class_stats(model, found, names)
    files = write_pictures(model, val, found, classes, names, palette, args, outputs)
    report = {"checkpoint": str(args.checkpoint), "dataset": name, "images": found["images"],
              "prototypes_per_class": model.head.prototypes.shape[1], "in_use_threshold": IN_USE, "classes": classes}
    if other is not None:
        ours = {n: classes[n]["iou"] for n in names}
        report["compare"] = {"other": str(args.compare), "iou": {n: {"this": ours[n], "other": other.get(n)}
                                                                 for n in names}}
        outputs.doing = "while drawing compare.png"
        outputs.save(compare_picture(ours, other, names, Path(args.compare).parent.name or "other"), "compare.png")
        files.append("compare.png")
    report = strict_json(report)                                  # strict JSON: NaN -> null
    outputs.doing = "while writing atlas.json and index.html"
    outputs.text("atlas.json", json.dumps(report, indent=1))
    outputs.text("index.html", index_page(files, classes))
    for n, s in classes.items():
        print(f"{n[:20]:>20s}: prototypes in use {s['prototypes_in_use']} | collapse "
              f"{fmt(s['collapse'])}")
    print(f"wrote {len(files)} pictures, atlas.json and index.html to {outputs.folder}")
    return report


def write_pictures(model, val, found, classes, names, palette, args, outputs):
    """class_*, gallery_* and maps_* pictures; returns their file names."""
    K, files = model.head.prototypes.shape[1], []
    for c, n in enumerate(names):
        safe = "".join(ch if ch.isalnum() else "_" for ch in n)
        outputs.doing = f"while drawing class {c} of {len(names)} ({n})"
        files.append(outputs.save(class_picture(model, classes[n], found, c, n), f"class_{c}_{safe}.png").name)
        if found["best"][c][0]:
            files.append(outputs.save(gallery_picture(val, found, c, n, K, classes[n]), f"gallery_{c}_{safe}.png").name)
    for i in range(min(args.images, found["images"])):
        outputs.doing = f"while drawing the maps of val image {i}"
        files.append(outputs.save(maps_picture(model, val, i, names, palette, args.device), f"maps_{i}.png").name)
    return files


def cli(argv=None):
    """main() as a command: Ctrl-C / SIGTERM end in one line saying what was written (exit 130 / 143)."""
    outputs = Outputs()
    run_command(lambda: main(argv, outputs), outputs.stopped,
                out_of_memory=lambda text: outputs.out_of_memory(text, "fewer --val-images, or --device cuda"))


if __name__ == "__main__":
    cli()
