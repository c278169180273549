"""Train and evaluate ProtoSeg (or a softmax / query baseline) on one device or under torchrun.

    python train.py                                   # embedded synthetic dataset, tiny HRNet, CPU, ~4 min
    python train.py --dataset cityscapes --data-root /data/cityscapes --pretrained hrnetv2_w48_imagenet.pth
    torchrun --nproc_per_node=8 train.py --dataset cityscapes --data-root ...
    python train.py --eval-only --resume runs/cityscapes/last.pt --eval-flip --eval-scales 0.75 1 1.25

Settings = Config defaults, then the dataset's preset, then the command line. Resolved settings are printed and
saved in every checkpoint. Exact resume: dropout is reseeded from (seed, rank, iteration) every step, data
order and augmentation are functions of (seed, epoch, index), so a resumed run replays the same stream.
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DatasetError, EvalTransform, TrainTransform, build_dataset
from models import build_model, load_pretrained, upsample
from protoseg import IGNORE_INDEX, seg_loss
from sinkhorn import all_reduce

# Cityscapes CE class weights (trainId order) of the official HRNet / ProtoSeg configs
CITYSCAPES_CLASS_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
                            0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


@dataclass
class Config:
    dataset: str = "synthetic"        # synthetic | cityscapes | ade20k | coco_stuff | folder
    data_root: str = ""
    num_classes: int = 0              # folder dataset only
    ignore_value: int = 255           # folder dataset: the mask value meaning 'unlabelled'
    backbone: str = "hrnet18_small_v2"  # hrnet_tiny | hrnet18_small_v2 | hrnet18/32/48 | resnet18/50/101
    head: str = "protoseg"            # protoseg | softmax | query
    pretrained: str = ""              # ImageNet backbone weights (.pth), loaded strictly
    out_dir: str = "runs/synthetic"
    crop: tuple = (128, 128)          # training crop (h, w)
    scale: tuple = (0.5, 2.0)         # random scale range
    flip: bool = True
    batch_size: int = 8               # global, split over ranks
    iters: int = 1000
    optimizer: str = "sgd"            # sgd | adamw
    lr: float = 0.01                  # poly decay to 0 with power lr_power
    lr_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 5e-4
    class_weights: str = "none"       # none | cityscapes (official CE weights)
    num_prototypes: int = 10          # K
    kappa: float = 0.05               # Sinkhorn entropy weight (Eq. 9)
    sinkhorn_iters: int = 3
    proto_momentum: float = 0.999     # mu of Eq. 14
    lambda_ppc: float = 0.01          # lambda_1 of Eq. 13
    lambda_ppd: float = 0.001         # lambda_2 of Eq. 13
    tau: float = 0.1                  # PPC temperature (Eq. 11); official code: 1
    class_layernorm: bool = True      # official departure 1; default chosen by measurement (README)
    embed_layernorm: bool = False     # official departure 2
    update_correct_only: bool = False  # official departure 4
    local_stats: bool = False         # official departure 6
    dropout: float = 0.1
    freeze_bn: bool = False           # BatchNorm uses running statistics (tiny per-device batches)
    amp: str = "bf16"                 # bf16 | fp16 | none (GPU only; the CPU runs fp32)
    workers: int = 2
    seed: int = 0
    log_every: int = 20
    eval_every: int = 0               # 0: only at the end
    ckpt_every: int = 500
    eval_crop: tuple = (0, 0)         # sliding-window size (h, w); 0 0 = whole image
    eval_scales: tuple = (1.0,)
    eval_flip: bool = False
    resume: str = ""                  # checkpoint to resume from ('auto' = out_dir/last.pt if present)
    eval_only: bool = False
    val_size: int = 0                 # evaluate on the first N val images only (0 = all)


# The published recipes. Cityscapes: EQUATIONS.md; ADE20K / COCO-Stuff: the common 512x512 schedules.
PRESETS = {
    # CPU-sized: a tiny HRNet, 700 AdamW steps of batch 16 (~4.3 min on 2 cores). mu stays the paper's 0.999:
    # with 0.99 the prototypes of two classes followed the still-undiscriminating embeddings onto one point (README)
    "synthetic": dict(backbone="hrnet_tiny", iters=700, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                      batch_size=16, ckpt_every=100, log_every=25),
    "cityscapes": dict(backbone="hrnet48", crop=(512, 1024), batch_size=8, iters=80000, lr=0.01,
                       class_weights="cityscapes", out_dir="runs/cityscapes", eval_every=8000, ckpt_every=1000),
    "ade20k": dict(backbone="hrnet48", crop=(512, 512), batch_size=16, iters=160000, lr=0.01,
                   out_dir="runs/ade20k", eval_every=16000, ckpt_every=2000),
    "coco_stuff": dict(backbone="hrnet48", crop=(512, 512), batch_size=16, iters=80000, lr=0.01,
                       out_dir="runs/coco_stuff", eval_every=8000, ckpt_every=1000),
    "folder": dict(out_dir="runs/folder"),
}
MODEL_KEYS = ("backbone", "head", "num_classes", "num_prototypes", "class_layernorm", "embed_layernorm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
        elif f.type is tuple:
            p.add_argument(flag, nargs="+", type=type(f.default[0]), default=None, help=f"(default {f.default})")
        else:
            p.add_argument(flag, type=f.type, default=None, help=f"(default {f.default!r})")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    dataset = args.get("dataset", Config.dataset)
    if dataset not in PRESETS:
        p.error(f"--dataset {dataset!r}: choose from {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[dataset], **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}})
    return cfg


# ----------------------------------------------------------------------------- data

class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (this rank's share of a (seed, epoch) permutation) that can start mid-epoch."""

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[getattr(self, "skip", 0):])


def make_datasets(cfg):
    kw = dict(num_classes=cfg.num_classes, ignore_value=cfg.ignore_value) if cfg.dataset == "folder" else {}
    train = build_dataset(cfg.dataset, cfg.data_root or None, "train",
                          TrainTransform(cfg.crop, cfg.scale, cfg.flip), seed=cfg.seed, **kw)
    val = build_dataset(cfg.dataset, cfg.data_root or None, "val", EvalTransform(), seed=cfg.seed, **kw)
    if cfg.val_size:
        val = torch.utils.data.Subset(val, range(min(cfg.val_size, len(val))))
        for attr in ("num_classes", "ignore_index", "class_names", "palette"):
            setattr(val, attr, getattr(val.dataset, attr))
    return train, val


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_scores(model, image, num_classes, crop=(0, 0), scales=(1.0,), flip=False):
    """Class scores (1, C, H, W) for one image (1, 3, H, W): whole image or sliding window, averaged over
    scales and the horizontal flip."""
    H, W = image.shape[-2:]
    total = image.new_zeros(1, num_classes, H, W)
    for s in scales:
        x = F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else image
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            out = sliding_window(model, xi, num_classes, crop) if crop[0] else model(xi)
            total += upsample(out.flip(-1) if flipped else out, (H, W)).float()
    return total


def sliding_window(model, image, num_classes, crop):
    """Windows of `crop` with stride 2/3 crop; the image is padded up to the crop; scores averaged."""
    (H, W), (ch, cw) = image.shape[-2:], crop
    padded = F.pad(image, (0, max(cw - W, 0), 0, max(ch - H, 0)))
    ph, pw = padded.shape[-2:]
    sh, sw = max(1, ch * 2 // 3), max(1, cw * 2 // 3)
    scores = image.new_zeros(1, num_classes, ph, pw)
    count = image.new_zeros(1, 1, ph, pw)
    for y in range(0, max(ph - ch, 0) + sh, sh):
        for x in range(0, max(pw - cw, 0) + sw, sw):
            y0, x0 = min(y, ph - ch), min(x, pw - cw)
            scores[..., y0:y0 + ch, x0:x0 + cw] += model(padded[..., y0:y0 + ch, x0:x0 + cw]).float()
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
    return (scores / count)[..., :H, :W]


def confusion_matrix(pred, label, num_classes, ignore_index=IGNORE_INDEX):
    """(C, C) counts, rows = ground truth, columns = prediction; ignore pixels are skipped."""
    keep = label != ignore_index
    return torch.bincount(label[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def metrics_from_confusion(conf):
    """IoU_c = TP / (TP + FP + FN); classes absent from both ground truth and prediction are left out."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"miou": iou.nanmean().item(), "iou": iou.tolist(), "pixel_acc": (tp.sum() / conf.sum()).item()}


def prototype_purity(counts):
    """counts (C, K, M): pixels of class c nearest to its prototype k with mode m. Purity of class c =
    sum_k max_m counts / sum counts: 1 when every prototype holds a single mode."""
    counts = counts.double()
    return (counts.amax(2).sum(1) / counts.sum((1, 2)).clamp(min=1)).tolist()


@torch.no_grad()
def evaluate(model, dataset, cfg, device, rank=0, world=1):
    """Confusion matrix over this rank's share of the images, all-reduced -> mIoU, IoU, pixel accuracy
    (+ prototype purity when the dataset gives modes and the head has prototypes)."""
    net = model.module if isinstance(model, DDP) else model
    was_training = net.training
    net.eval()
    C = dataset.num_classes
    conf = torch.zeros(C, C, dtype=torch.long, device=device)
    protos = getattr(net.head, "prototypes", None)
    modes = torch.zeros(C, protos.shape[1] if protos is not None else 1, 16, dtype=torch.long, device=device)
    for i in range(rank, len(dataset), world):
        item = dataset[i]
        image, label = item["image"][None].to(device), item["label"].to(device)
        with autocast(cfg, device):
            scores = predict_scores(net, image, C, tuple(cfg.eval_crop), tuple(cfg.eval_scales), cfg.eval_flip)
        conf += confusion_matrix(scores.argmax(1)[0], label, C, dataset.ignore_index)
        if "modes" in item and protos is not None:              # which prototype of its class each pixel picks
            with autocast(cfg, device):
                emb = net.head.embed(net.neck(net.backbone(image)))[0].float()      # (h, w, D)
            lab, mod = (F.interpolate(t[None, None].float().to(device), size=emb.shape[:2], mode="nearest")
                        .long().flatten() for t in (item["label"], item["modes"]))
            keep = lab != dataset.ignore_index
            lab, mod, emb = lab[keep], mod[keep].clamp(max=15), emb.flatten(0, 1)[keep]
            k = torch.einsum("nd,nkd->nk", emb, F.normalize(protos[lab].float(), dim=-1)).argmax(1)
            modes.view(-1).index_add_(0, (lab * modes.shape[1] + k) * 16 + mod, torch.ones_like(mod))
    all_reduce(conf)
    all_reduce(modes)
    net.train(was_training)
    out = metrics_from_confusion(conf)
    if modes.sum() > 0:
        out["purity"] = prototype_purity(modes)
        out["mean_purity"] = sum(out["purity"]) / C
    return out


# ----------------------------------------------------------------------------- training

def autocast(cfg, device):
    enabled = device.type == "cuda" and cfg.amp != "none"
    return torch.autocast(device.type, dtype=torch.float16 if cfg.amp == "fp16" else torch.bfloat16,
                          enabled=enabled)


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)                                       # never a half-written checkpoint


def load_checkpoint(path, cfg):
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = ckpt.get("config", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in MODEL_KEYS
            if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        sys.exit(f"error: checkpoint {path} was made by another model; differs in " + "; ".join(diff))
    return ckpt


def main(argv=None):
    cfg = parse_args(argv)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    try:
        train_set, val_set = make_datasets(cfg)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    if cfg.dataset == "folder":
        cfg.num_classes = train_set.num_classes
    num_classes = train_set.num_classes
    if cfg.batch_size % world:
        sys.exit(f"error: --batch-size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    ckpt = None
    if cfg.resume:
        path = os.path.join(cfg.out_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
        if cfg.resume != "auto" or os.path.isfile(path):
            ckpt = load_checkpoint(path, cfg)
    if cfg.eval_only and ckpt is None:
        sys.exit("error: --eval-only needs --resume CHECKPOINT")
    log("settings: " + json.dumps(dataclasses.asdict(cfg)))

    torch.manual_seed(cfg.seed)                                 # same initial weights on every rank
    head_kw = dict(dropout=cfg.dropout)
    if cfg.head == "protoseg":
        head_kw.update(num_prototypes=cfg.num_prototypes, kappa=cfg.kappa, sinkhorn_iters=cfg.sinkhorn_iters,
                       momentum=cfg.proto_momentum, class_layernorm=cfg.class_layernorm,
                       embed_layernorm=cfg.embed_layernorm, update_correct_only=cfg.update_correct_only,
                       local_stats=cfg.local_stats)
    model = build_model(cfg.backbone, cfg.head, num_classes, **head_kw)
    if cfg.pretrained and ckpt is None:
        log(load_pretrained(model.backbone, cfg.pretrained))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    if ddp and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"model: {cfg.backbone} + {cfg.head} head, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
        f"learnable parameters, {world} rank(s) on {device.type}")

    if cfg.eval_only:
        metrics = evaluate(model, val_set, cfg, device, rank, world)
        log(format_metrics(metrics, val_set.class_names))
        return metrics

    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]     # no weight decay on BN/bias
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum) if cfg.optimizer == "sgd"
           else torch.optim.AdamW(groups, lr=cfg.lr))
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.amp == "fp16")
    start = 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["iter"]
        log(f"resumed from iteration {start}")
    weight = (torch.tensor(CITYSCAPES_CLASS_WEIGHTS, device=device) if cfg.class_weights == "cityscapes"
              else None)

    per_rank = cfg.batch_size // world
    sampler = ResumableSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_set)} training images are fewer than one batch of {per_rank} per rank")
    loader = torch.utils.data.DataLoader(train_set, per_rank, sampler=sampler, num_workers=cfg.workers,
                                         drop_last=True, pin_memory=device.type == "cuda")
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None

    def checkpoint(it):
        if master:
            atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                         "iter": it, "config": dataclasses.asdict(cfg)}, os.path.join(cfg.out_dir, "last.pt"))

    model.train()
    if cfg.freeze_bn:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    it, batches, t0, t_last = start, None, time.time(), time.time()
    while it < cfg.iters:
        if batches is None or it % steps_per_epoch == 0:        # (re)start the epoch at the right batch
            train_set.set_epoch(it // steps_per_epoch)
            sampler.set_epoch(it // steps_per_epoch, skip=(it % steps_per_epoch) * per_rank)
            batches = iter(loader)
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        lr = cfg.lr * (1 - it / cfg.iters) ** cfg.lr_power                    # poly schedule
        for g in opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + it)             # dropout: a function of it
        with autocast(cfg, device):
            out = model(images, labels)
        loss, terms = seg_loss(out, labels, cfg.lambda_ppc, cfg.lambda_ppd, cfg.tau, weight)
        bad = all_reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device))
        if bad.item():
            log(f"error: non-finite loss at iteration {it} ({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); "
                f"stopping. The last good checkpoint {os.path.join(cfg.out_dir, 'last.pt')} is untouched.")
            if ddp:
                dist.destroy_process_group()
            sys.exit(1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        it += 1
        if master and (it % cfg.log_every == 0 or it == cfg.iters):
            now = time.time()
            speed = cfg.log_every / max(now - t_last, 1e-9) if it - start >= cfg.log_every else (it - start) / (now - t0)
            t_last = now
            mem = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            row = {"iter": it, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "lr": lr,
                   "it_per_s": speed, "eta_s": (cfg.iters - it) / max(speed, 1e-9), "mem_gb": mem}
            log(f"it {it}/{cfg.iters} | loss {row['loss']:.4f} (" + " ".join(f"{k} {row[k]:.4f}" for k in terms)
                + f") | lr {lr:.2e} | {speed:.2f} it/s | ETA {row['eta_s'] / 60:.1f} min | mem {mem:.2f} GB",
                flush=True)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        if it % cfg.ckpt_every == 0 or it == cfg.iters:
            checkpoint(it)
        if cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iters:
            m = evaluate(model, val_set, cfg, device, rank, world)
            log(f"it {it}: val mIoU {100 * m['miou']:.2f}")
            if master:
                log_file.write(json.dumps({"iter": it, "val": m}) + "\n")

    metrics = evaluate(model, val_set, cfg, device, rank, world)
    metrics.update(iters=cfg.iters, train_time_s=time.time() - t0)
    log(format_metrics(metrics, val_set.class_names))
    if master:
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        log_file.close()
    if ddp:
        dist.destroy_process_group()
    return metrics


def format_metrics(m, class_names):
    lines = [f"val mIoU {100 * m['miou']:.2f} | pixel acc {100 * m['pixel_acc']:.2f}"]
    for i, name in enumerate(class_names):
        iou = m["iou"][i]
        pur = f" | prototype purity {100 * m['purity'][i]:.1f}" if "purity" in m else ""
        lines.append(f"  {name:>20s}: IoU {'  n/a' if math.isnan(iou) else f'{100 * iou:5.1f}'}{pur}")
    if "purity" in m:
        lines.append(f"mean prototype purity {100 * m['mean_purity']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
