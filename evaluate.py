"""Inference and metrics: whole image, sliding window, scales + flip; the confusion matrix and its metrics (IoU and
accuracy; Cityscapes categories and instance-weighted iIoU as cityscapesScripts computes them), prototype purity
and use. Checkpoints are read by checkpoints.py.

    python train.py --eval-only --resume runs/cityscapes/last.pt              # settings come from the checkpoint
    python train.py --eval-only --resume hrnet_w48_proto_lr1x_hrnet_proto_80k_latest.pth --data-root /data/cityscapes

train.py evaluates with `evaluate`; predict.py infers with `predict_scores`.
Metrics are fractions in [0, 1]; a class absent from both ground truth and prediction has no IoU (null in JSON).
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from collectives import all_reduce, autocast, rank_and_world
from labels import (CITYSCAPES_CATEGORIES, CITYSCAPES_CLASSES, CITYSCAPES_LUT, CITYSCAPES_MEAN_INSTANCE_SIZE,
                    IGNORE_INDEX, INSTANCE_CATEGORIES)
from layers import labels_to, upsample


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_scores(model, image, num_classes, crop=(0, 0), scales=(1.0,), flip=False, align_corners=None,
                   stride=(0, 0), size=None):
    """Class scores (1, C, H, W) for one image (1, 3, H, W): whole image or sliding window (stride: 0 = 2/3 of the
    window), summed over scales and the horizontal flip (the argmax is what counts), resized to size (H, W) when
    given (the label of an image rescaled for the test, as mmseg). Resizes use the model's family's align_corners
    (SegModel.align_corners) unless given."""
    H, W = image.shape[-2:]
    ac = getattr(model, "module", model).align_corners if align_corners is None else align_corners
    total = image.new_zeros(1, num_classes, H, W, dtype=torch.float32)
    for s in scales:
        x = F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=ac) if s != 1 else image
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            out = sliding_window(model, xi, num_classes, crop, stride) if crop[0] else model(xi)["scores"]
            total += upsample(out.flip(-1) if flipped else out, (H, W), ac).float()
    return total if size is None or tuple(size) == (H, W) else upsample(total, tuple(size), ac)


def sliding_window(model, image, num_classes, crop, stride=(0, 0)):
    """Windows of `crop` at `stride` (0: 2/3 crop), the last one of a row / column ending at the border (mmseg's
    slide_inference); the image is padded up to the crop; scores averaged."""
    (H, W), (ch, cw) = image.shape[-2:], crop
    padded = F.pad(image, (0, max(cw - W, 0), 0, max(ch - H, 0)))
    ph, pw = padded.shape[-2:]
    sh, sw = (stride[0], stride[1]) if stride[0] else (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    scores = image.new_zeros(1, num_classes, ph, pw, dtype=torch.float32)
    count = image.new_zeros(1, 1, ph, pw, dtype=torch.float32)
    for y in range(0, max(ph - ch, 0) + sh, sh):
        for x in range(0, max(pw - cw, 0) + sw, sw):
            y0, x0 = min(y, ph - ch), min(x, pw - cw)
            scores[..., y0:y0 + ch, x0:x0 + cw] += model(padded[..., y0:y0 + ch, x0:x0 + cw])["scores"].float()
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
    return (scores / count)[..., :H, :W]


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred, label, num_classes, ignore_index=IGNORE_INDEX):
    """(C, C) counts, rows = ground truth, columns = prediction; ignore pixels are skipped."""
    keep = label != ignore_index
    return torch.bincount(label[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def metrics_from_confusion(conf):
    """IoU_c = TP / (TP + FP + FN), Acc_c = TP / (TP + FN); mIoU / mAcc over classes that have a value;
    aAcc = all correct / all labelled pixels."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    return {"miou": iou.nanmean().item(), "macc": acc.nanmean().item(),
            "aacc": (tp.sum() / conf.sum().clamp(min=1)).item(), "iou": iou.tolist(), "acc": acc.tolist()}


def instance_counts(pred, instances):
    """Instance-weighted TP and FN of one image, as cityscapesScripts: each ground-truth instance (instanceIds
    value = labelId * 1000 + k, > 1000) of class c counts with weight mean_size[c] / its size.
    pred: (H, W) train ids; instances: (H, W) instanceIds. Returns (2, 19) [tp, fn] per class and
    (2, 2) [tp, fn] per instance category (a pixel counts for the category if predicted as any of its classes)."""
    pred, instances = np.asarray(pred).ravel(), np.asarray(instances).ravel().astype(np.int64)
    ids, inverse, sizes = np.unique(instances, return_inverse=True, return_counts=True)
    cls = np.where(ids > 1000, CITYSCAPES_LUT[np.minimum(ids // 1000, 255)], -1)
    weight = np.array([CITYSCAPES_MEAN_INSTANCE_SIZE.get(int(c), 0.0) for c in cls]) / sizes
    category = np.full(20, -1)                            # train id -> index in INSTANCE_CATEGORIES
    for j, name in enumerate(INSTANCE_CATEGORIES):
        category[CITYSCAPES_CATEGORIES[name]] = j
    tp = np.bincount(inverse, weights=pred == cls[inverse], minlength=len(ids))
    cat_tp = np.bincount(inverse, weights=category[pred] == category[cls][inverse], minlength=len(ids))
    per_class, per_category = np.zeros((2, 19)), np.zeros((2, 2))
    for i in np.flatnonzero(weight > 0):                 # instances of the 8 evaluated thing classes
        per_class[:, cls[i]] += weight[i] * np.array([tp[i], sizes[i] - tp[i]])
        per_category[:, category[cls[i]]] += weight[i] * np.array([cat_tp[i], sizes[i] - cat_tp[i]])
    return per_class, per_category


def cityscapes_scores(conf, per_class, per_category):
    """The 7 category IoUs and the iIoU of classes and categories: iIoU = wTP / (wTP + FP + wFN), FP unweighted."""
    conf = conf.double().numpy()
    col = conf.sum(0)

    def category_sets(name):
        s = CITYSCAPES_CATEGORIES[name]
        tp = conf[np.ix_(s, s)].sum()
        return tp, conf[s].sum() - tp, conf[:, s].sum() - tp              # tp, fn, fp

    cat_iou = {}
    for name in CITYSCAPES_CATEGORIES:
        tp, fn, fp = category_sets(name)
        cat_iou[name] = tp / (tp + fn + fp) if tp + fn + fp > 0 else float("nan")
    iiou = {}
    for c in CITYSCAPES_MEAN_INSTANCE_SIZE:
        wtp, wfn, fp = per_class[0, c], per_class[1, c], col[c] - conf[c, c]
        iiou[CITYSCAPES_CLASSES[c]] = wtp / (wtp + wfn + fp) if wtp + wfn + fp > 0 else float("nan")
    cat_iiou = {}
    for j, name in enumerate(INSTANCE_CATEGORIES):
        (wtp, wfn), fp = per_category[:, j], category_sets(name)[2]
        cat_iiou[name] = wtp / (wtp + wfn + fp) if wtp + wfn + fp > 0 else float("nan")
    mean = lambda d: mean_of(list(d.values()))
    return {"category_iou": cat_iou, "mean_category_iou": mean(cat_iou), "iiou": iiou, "mean_iiou": mean(iiou),
            "category_iiou": cat_iiou, "mean_category_iiou": mean(cat_iiou)}


NUM_MODES = 16    # mode ids kept apart by prototype_counts (the synthetic set has 3 per class)
IN_USE = 0.05     # a prototype is "in use" when it takes >= 5 % of its class's pixels


def prototype_counts(embed, label, modes, prototypes, num_modes=1):
    """(C, K, M) counts: labelled pixels of class c whose nearest prototype OF CLASS c is k, split by the
    pixel's mode m (synthetic data; M = 1 without modes). embed: (h, w, D) and prototypes (C, K, D) unit vectors
    (ProtoSegHead.unit_prototypes); label, modes: (H, W), brought to the feature grid by nearest."""
    C, K, _ = prototypes.shape
    size = embed.shape[:2]
    lab = labels_to(label[None], size).flatten()
    mod = labels_to(modes[None], size).flatten() if modes is not None else torch.zeros_like(lab)
    keep = lab != IGNORE_INDEX
    lab, mod, emb = lab[keep], mod[keep].clamp(0, num_modes - 1), embed.flatten(0, 1)[keep].float()
    k = torch.einsum("nd,nkd->nk", emb, prototypes.float()[lab]).argmax(1)
    return torch.bincount((lab * K + k) * num_modes + mod, minlength=C * K * num_modes).reshape(C, K, num_modes)


def prototype_summary(counts, min_share=IN_USE):
    """Purity of class c = sum_k max_m counts / sum counts (1 when every prototype holds one mode); share of the
    class's pixels each prototype takes; prototypes in use = how many take >= min_share."""
    counts = counts.double()
    total = counts.sum((1, 2))
    present = total > 0                                                             # classes seen at all
    share = counts.sum(2) / total.clamp(min=1)[:, None]                             # (C, K)
    in_use = [int(n) if p else None for n, p in zip((share >= min_share).sum(1).tolist(), present.tolist())]
    out = {"prototype_share": [s if p else None for s, p in zip(share.tolist(), present.tolist())],
           "prototypes_in_use": in_use}
    if counts.shape[2] > 1:
        purity = counts.amax(2).sum(1) / total.clamp(min=1)
        out["purity"] = torch.where(present, purity, float("nan")).tolist()
    return out


# ----------------------------------------------------------------------------- the evaluation loop

class ValImages(torch.utils.data.Dataset):
    """The images of one rank, plus Cityscapes instanceIds maps (for iIoU) where the label files have them."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices
        pairs = getattr(dataset, "pairs", None)
        self.instance_paths = None
        if pairs and all(str(p[2]).endswith("_gtFine_labelIds.png") for p in pairs):
            self.instance_paths = [str(p[2]).replace("_gtFine_labelIds.png", "_gtFine_instanceIds.png") for p in pairs]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        item = self.dataset[i]
        if self.instance_paths and Path(self.instance_paths[i]).is_file():
            item["instances"] = np.asarray(Image.open(self.instance_paths[i]), dtype=np.int64)
        return item


def _progress(log, done, total, t0, world):
    """The progress line; each of `world` ranks has done `done` images (the last share may be short)."""
    seen = min(done * world, total)
    rate = seen / max(time.time() - t0, 1e-9)
    log(f"eval {seen}/{total} images | {rate:.2f} img/s | ETA {(total - seen) / max(rate, 1e-9) / 60:.1f} min",
        flush=True)


def scores_and_embed(raw_model, image, num_classes, label_size, cfg, with_embed):
    """Class scores (1, C, H, W) at the label's size by cfg's test protocol (eval_crop, eval_stride, eval_scales,
    eval_flip), and for a prototype head the embeddings (1, h, w, D) of the image at scale 1 (else None)."""
    if cfg.eval_crop[0] or tuple(cfg.eval_scales) != (1.0,) or cfg.eval_flip or not with_embed:
        scores = predict_scores(raw_model, image, num_classes, cfg.eval_crop, cfg.eval_scales, cfg.eval_flip,
                                stride=cfg.eval_stride, size=label_size)
        return scores, raw_model.embed(image) if with_embed else None
    out = raw_model(image)                                            # one pass gives scores and embeddings
    scores = out["scores"].float()
    if scores.shape[-2:] != label_size:                               # back to the label (mmseg)
        scores = upsample(scores, label_size, raw_model.align_corners)
    return scores, out["embed"].permute(0, 2, 3, 1)


@torch.no_grad()
def evaluate(model, dataset, cfg, log=print):
    """Confusion matrix over this rank's share of the first cfg.val_size images (0: all), all-reduced -> metrics
    dict. The test protocol and loader come from cfg (eval_crop, eval_stride, eval_scales, eval_flip, amp,
    workers). Adds prototype use (and purity, when the dataset gives modes) for a head with prototypes, and the
    Cityscapes category / iIoU scores when instanceIds maps sit beside the labels."""
    raw_model = getattr(model, "module", model)
    device, (rank, world) = next(raw_model.parameters()).device, rank_and_world()
    was_training = [(m, m.training) for m in raw_model.modules()]   # restored one by one (--freeze-bn: BN stays eval)
    raw_model.eval()
    C, n = dataset.num_classes, min(cfg.val_size or len(dataset), len(dataset))
    items = ValImages(dataset, list(range(rank, n, world)))
    loader = torch.utils.data.DataLoader(items, batch_size=None, num_workers=cfg.workers)
    protos = raw_model.head.unit_prototypes() if hasattr(raw_model.head, "prototypes") else None
    conf = torch.zeros(C, C, dtype=torch.long, device=device)
    counts = torch.zeros(C, protos.shape[1] if protos is not None else 1, NUM_MODES, dtype=torch.long, device=device)
    inst = torch.zeros(2, 19 + 2, dtype=torch.float64)
    has_modes, has_inst, t0, last = False, False, time.time(), time.time()
    for done, item in enumerate(loader, 1):
        image, label = item["image"][None].to(device), item["label"].to(device)
        with autocast(cfg.amp, device):
            scores, embed = scores_and_embed(raw_model, image, C, label.shape, cfg, protos is not None)
        pred = scores.argmax(1)[0]
        conf += confusion_matrix(pred, label, C)
        if protos is not None:
            modes = item.get("modes")
            has_modes |= modes is not None
            counts += prototype_counts(embed[0], label, None if modes is None else modes.to(device), protos, NUM_MODES)
        if "instances" in item:
            has_inst = True
            inst += torch.from_numpy(np.concatenate(instance_counts(pred.cpu().numpy(), item["instances"]), 1))
        if rank == 0 and (time.time() - last > 20 or done == len(items)) and len(items) > 1:
            _progress(log, done, n, t0, world)
            last = time.time()
    flags = all_reduce(torch.tensor([float(has_modes), float(has_inst)], device=device))
    conf, counts, inst = all_reduce(conf).cpu(), all_reduce(counts).cpu(), all_reduce(inst.to(device)).cpu()
    for m, mode in was_training:
        m.training = mode
    out = metrics_from_confusion(conf)
    out.update(images=n, seconds=time.time() - t0)
    if protos is not None:
        out.update(prototype_summary(counts if flags[0] else counts.sum(2, keepdim=True)))
    if flags[1] and C == 19:
        out.update(cityscapes_scores(conf, inst[:, :19].numpy(), inst[:, 19:].numpy()))
    return out


# ----------------------------------------------------------------------------- reports

def mean_of(values):
    """Mean over the entries that have a value (not None / NaN)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def strict_json(x):
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def metrics_report(m, class_names):
    """metrics.json content: summary numbers, then each class by name; strict JSON (NaN -> null)."""
    per_class = {}
    for c, name in enumerate(class_names):
        row = {"iou": m["iou"][c], "acc": m["acc"][c]}
        for key in ("purity", "prototypes_in_use", "prototype_share"):
            if key in m:
                row[key] = m[key][c]
        per_class[name] = row
    summary = {k: v for k, v in m.items() if k not in ("iou", "acc", "purity", "prototypes_in_use", "prototype_share")}
    if "purity" in m:
        summary["mean_purity"] = mean_of(m["purity"])
    if "prototypes_in_use" in m:
        summary["mean_prototypes_in_use"] = mean_of(m["prototypes_in_use"])
    return strict_json({**summary, "classes": per_class})


def format_metrics(m, class_names):
    """Console summary: mIoU, mAcc, aAcc, then a line per class."""
    pct = lambda v: "  n/a" if v is None or math.isnan(v) else f"{100 * v:5.1f}"
    lines = [f"val mIoU {pct(m['miou'])} | mAcc {pct(m['macc'])} | aAcc {pct(m['aacc'])} | {m['images']} images"]
    for c, name in enumerate(class_names):
        used = m["prototypes_in_use"][c] if "prototypes_in_use" in m else None
        extra = f" | prototypes in use {'n/a' if used is None else used}" if "prototypes_in_use" in m else ""
        extra += f" | prototype purity {pct(m['purity'][c])}" if "purity" in m else ""
        lines.append(f"  {name[:20]:>20s}: IoU {pct(m['iou'][c])} | Acc {pct(m['acc'][c])}{extra}")
    if "purity" in m:
        lines.append(f"mean prototype purity {pct(mean_of(m['purity']))}")
    if m["aacc"] is None or math.isnan(m["aacc"]):              # no pixel counted at all
        lines.append(f"val has no labelled pixel in its {m['images']} images (every label is ignore): no metric "
                     "can be computed; check the val masks and --ignore-value")
    if "mean_iiou" in m:
        lines.append(f"Cityscapes: iIoU {pct(m['mean_iiou'])} | category IoU {pct(m['mean_category_iou'])} | "
                     f"category iIoU {pct(m['mean_category_iiou'])}")
    return "\n".join(lines)
