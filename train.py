"""Train and evaluate ProtoSeg (or a softmax / query baseline) on one device or under torchrun.

    python train.py                                   # embedded synthetic dataset, tiny HRNet, CPU, ~4 min
    python train.py --dataset cityscapes --data-root /data/cityscapes --pretrained hrnetv2_w48_imagenet.pth
    python train.py --dataset synthetic_modes && python train.py --pretrained runs/synthetic_modes/last.pt
    torchrun --nproc_per_node=8 train.py --dataset cityscapes --data-root ...
    python train.py --resume auto --dataset cityscapes                       # continue runs/cityscapes/last.pt
    python train.py --eval-only --resume runs/cityscapes/last.pt --eval-flip --eval-scales 0.75 1 1.25

Settings = Config defaults, then the dataset's preset, then (when resuming) the checkpoint's, then the command line.
They are printed, written to out_dir/config.json and saved in every checkpoint. out_dir holds last.pt (the latest
checkpoint), log.jsonl (one row per logged iteration and evaluation) and metrics.json (the final evaluation).
Exact resume: dropout is reseeded from (seed, rank, iteration) every step, data order and augmentation are
functions of (seed, epoch, index), so a resumed run replays the same stream.
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import models
from data import DatasetError, EvalTransform, TrainTransform, build_dataset
from evaluate import CheckpointError, autocast, evaluate, format_metrics, load_checkpoint, metrics_report
from models import load_pretrained, model_from_config
from protoseg import cluster_prototypes, seg_loss
from runs import claim_out_dir, fail, is_master, last_good, log_row, one_line, open_log, save_checkpoint
from sinkhorn import all_reduce

# Cityscapes CE class weights (trainId order) of the official HRNet / ProtoSeg configs
CITYSCAPES_CLASS_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
                            0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


@dataclass
class Config:
    dataset: str = "synthetic"        # synthetic | synthetic_modes | cityscapes | ade20k | coco_stuff | folder
    data_root: str = ""               # dataset folder (not needed for synthetic)
    num_classes: int = 0              # folder dataset only
    ignore_value: int = 255           # folder dataset: the mask value meaning 'unlabelled'
    backbone: str = "hrnet18_small_v2"  # see models.BACKBONES
    head: str = "protoseg"            # protoseg | softmax (Eq. 1) | query (Eq. 2)
    pretrained: str = ""              # ImageNet backbone weights (.pth), loaded strictly
    out_dir: str = "runs/synthetic"   # last.pt, log.jsonl, metrics.json, config.json
    crop: tuple = (128, 128)          # training crop: H W, or one N for N x N
    scale: tuple = (0.5, 2.0)         # random scale range
    flip: bool = True                 # random horizontal flip
    batch_size: int = 8               # global, split over ranks
    iters: int = 1000                 # optimizer steps
    optimizer: str = "sgd"            # sgd | adamw
    lr: float = 0.01                  # poly decay to 0 with power lr_power
    lr_power: float = 0.9             # poly exponent
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 5e-4        # none on BN / LayerNorm / biases
    class_weights: str = "none"       # none | cityscapes (official CE weights)
    num_prototypes: int = 10          # K prototypes per class
    kappa: float = 0.05               # Sinkhorn entropy weight (Eq. 9)
    sinkhorn_iters: int = 3           # Sinkhorn-Knopp iterations (Eq. 10)
    proto_momentum: float = 0.999     # mu of Eq. 14
    proto_momentum_warmup: int = 0    # mu rises linearly from MU_START to proto_momentum over this many iterations
    proto_init: str = "random"        # random (paper) | data: first batch's within-class clustering (not in paper)
    lambda_ppc: float = 0.01          # lambda_1 of Eq. 13
    lambda_ppd: float = 0.001         # lambda_2 of Eq. 13
    tau: float = 0.1                  # PPC temperature (Eq. 11); official code: 1
    class_layernorm: bool = True      # official departure 1 (LayerNorm class scores); default by measurement
    embed_layernorm: bool = False     # official departure 2 (LayerNorm on the embedding)
    update_correct_only: bool = False  # official departure 4 (only correct pixels move prototypes)
    local_stats: bool = False         # official departure 6 (per-rank Sinkhorn, averaged prototypes)
    normalize_width: bool = False     # official departure 7 (l2 over the width axis; released checkpoint)
    dropout: float = 0.1              # Dropout2d in the head
    freeze_bn: bool = False           # BatchNorm uses running statistics (tiny per-device batches)
    amp: str = "bf16"                 # bf16 | fp16 | none (GPU only; the CPU runs fp32)
    workers: int = 2                  # DataLoader workers (training and evaluation)
    seed: int = 0                     # weights, data order, augmentation, dropout
    log_every: int = 20               # iterations between progress lines
    eval_every: int = 0               # iterations between evaluations; 0: only at the end
    ckpt_every: int = 500             # iterations between checkpoints (and at the end)
    eval_crop: tuple = (0, 0)         # sliding-window size H W (or N); 0: whole image
    eval_scales: tuple = (1.0,)       # test-time scales, scores summed
    eval_flip: bool = False           # add the horizontally flipped image
    val_size: int = 0                 # evaluate on the first N val images only (0 = all)
    resume: str = ""                  # checkpoint to continue or evaluate ('auto' = out_dir/last.pt if present)
    eval_only: bool = False           # evaluate the --resume checkpoint (its model settings) and stop
    overwrite: bool = False           # start afresh in an out_dir that holds an earlier run's last.pt
    allow_changes: bool = False       # resume with settings that change the training trajectory


# The published recipes. Cityscapes: EQUATIONS.md; ADE20K / COCO-Stuff: the common 512x512 schedules.
PRESETS = {
    # CPU-sized: a tiny HRNet, 700 AdamW steps of batch 16 (~4.3 min on 2 cores). mu stays the paper's 0.999:
    # with 0.99 the prototypes of two classes followed the still-undiscriminating embeddings onto one point (README)
    "synthetic": dict(backbone="hrnet_tiny", iters=700, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                      batch_size=16, ckpt_every=100, log_every=25),
    # the same scenes labelled by mode (15 classes c * 3 + m), softmax head: backbone pretraining for --pretrained
    "synthetic_modes": dict(backbone="hrnet_tiny", iters=700, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                            batch_size=16, ckpt_every=100, log_every=25, head="softmax",
                            out_dir="runs/synthetic_modes"),
    "cityscapes": dict(backbone="hrnet48", crop=(512, 1024), batch_size=8, iters=80000, lr=0.01,
                       class_weights="cityscapes", out_dir="runs/cityscapes", eval_every=8000, ckpt_every=1000),
    "ade20k": dict(backbone="hrnet48", crop=(512, 512), batch_size=16, iters=160000, lr=0.01,
                   out_dir="runs/ade20k", eval_every=16000, ckpt_every=2000),
    "coco_stuff": dict(backbone="hrnet48", crop=(512, 512), batch_size=16, iters=80000, lr=0.01,
                       out_dir="runs/coco_stuff", eval_every=8000, ckpt_every=1000),
    "folder": dict(out_dir="runs/folder"),
}
MODEL_KEYS = ("backbone", "head", "num_classes", "num_prototypes", "class_layernorm", "embed_layernorm",
              "normalize_width")
# settings that change the training trajectory: a resumed run refuses other values unless --allow-changes
TRAJECTORY_KEYS = ("dataset", "crop", "scale", "flip", "batch_size", "iters", "optimizer", "lr", "lr_power",
                   "momentum", "weight_decay", "class_weights", "kappa", "sinkhorn_iters", "proto_momentum",
                   "proto_momentum_warmup", "proto_init", "lambda_ppc", "lambda_ppd", "tau", "update_correct_only",
                   "local_stats", "dropout", "freeze_bn", "amp", "seed")
CHOICES = {"dataset": list(PRESETS), "backbone": models.BACKBONES, "head": ["protoseg", "softmax", "query"],
           "optimizer": ["sgd", "adamw"], "proto_init": ["random", "data"], "class_weights": ["none", "cityscapes"],
           "amp": ["bf16", "fp16", "none"]}
POSITIVE = {"batch_size", "iters", "lr", "log_every", "ckpt_every", "num_prototypes", "kappa", "sinkhorn_iters",
            "tau", "crop"}
NON_NEGATIVE = {"workers", "eval_every", "val_size", "lambda_ppc", "lambda_ppd", "weight_decay", "momentum",
                "dropout", "num_classes", "eval_crop", "lr_power", "seed", "proto_momentum_warmup"}
MU_START = 0.9                        # first mu of the warm-up (--proto-momentum-warmup)


# ----------------------------------------------------------------------------- settings

class Parser(argparse.ArgumentParser):
    def error(self, message):                                   # flag errors: once, not once per rank
        if is_master():
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def number(kind, name):
    """argparse type: int/float with the range this setting allows, named in the error."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if name in POSITIVE and not v > 0 or name in NON_NEGATIVE and not v >= 0:
            raise argparse.ArgumentTypeError(f"{text} must be {'> 0' if name in POSITIVE else '>= 0'}")
        return v
    return parse


def field_comments():
    """Config field -> its comment above, so --help shows the same words as the source."""
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(Config), re.M))


def make_parser(dataset):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shown = {**dataclasses.asdict(Config()), **PRESETS.get(dataset, {})}
    comments = field_comments()
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), shown[f.name]
        helptext = f"{comments.get(f.name, '')} (default{' for ' + dataset if f.name in PRESETS.get(dataset, {}) else ''}: {default})"
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif f.name in CHOICES:
            p.add_argument(flag, type=str.lower, choices=CHOICES[f.name], default=None, help=helptext)
        elif f.type is tuple:
            kind = type(Config.__dataclass_fields__[f.name].default[0])
            p.add_argument(flag, nargs="+", type=number(kind, f.name), default=None, help=helptext)
        else:
            p.add_argument(flag, type=number(f.type, f.name) if f.type in (int, float) else f.type, default=None,
                           help=helptext)
    return p


def parse_args(argv=None):
    """-> (Config, the names given on the command line). Presets by --dataset; `--crop N` means N x N."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", type=str.lower, default=Config.dataset)
    dataset = pre.parse_known_args(argv)[0].dataset
    p = make_parser(dataset)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    for name in ("crop", "eval_crop"):
        if name in given:
            if len(given[name]) > 2:
                p.error(f"--{name.replace('_', '-')} takes N or H W, got {len(given[name])} numbers")
            given[name] = tuple(given[name] * (3 - len(given[name])))[:2]
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    cfg = Config(**{**PRESETS[dataset], **given})
    if cfg.eval_only and not cfg.resume:
        p.error("--eval-only needs --resume CHECKPOINT")
    return cfg, set(given)


def resolve(cfg, given):
    """Settings for a resumed or evaluated checkpoint -> (cfg, checkpoint or None). The checkpoint's settings fill
    everything not given; a given model setting must agree; a given trajectory setting must agree unless
    --allow-changes (evaluation takes the model from the checkpoint and any other setting from the command line)."""
    path = os.path.join(cfg.out_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and not os.path.isfile(path) or not cfg.resume:
        return cfg, None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        fail(str(e))
    saved = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__ and k not in ("resume", "eval_only")}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    keys = MODEL_KEYS + (() if cfg.eval_only or cfg.allow_changes else TRAJECTORY_KEYS)
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {getattr(cfg, k)!r}" for k in keys
            if k in given and k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        hint = "" if any(k in MODEL_KEYS for k in given if k in saved and saved[k] != getattr(cfg, k)) else \
            "; pass --allow-changes to continue with the new values"
        fail(f"checkpoint {path} was made with other settings: " + "; ".join(diff) + hint)
    base = {**dataclasses.asdict(Config()), **PRESETS.get(saved.get("dataset", cfg.dataset), {}), **saved}
    cfg = Config(**{**base, **{k: getattr(cfg, k) for k in given | {"eval_only", "resume"}}})
    if ckpt.get("official"):
        print(f"{path}: the official ProtoSeg format; evaluating it with official departures 1, 2 and 7 on")
    return cfg, ckpt


# ----------------------------------------------------------------------------- set-up

def setup_distributed():
    """-> (rank, world, device). Under torchrun (RANK set): NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def make_datasets(cfg):
    """(train set or None for --eval-only, val set). Data errors become one-line user errors."""
    kw = dict(num_classes=cfg.num_classes, ignore_value=cfg.ignore_value) if cfg.dataset == "folder" else {}
    try:
        train = None if cfg.eval_only else build_dataset(
            cfg.dataset, cfg.data_root or None, "train", TrainTransform(cfg.crop, cfg.scale, cfg.flip), seed=cfg.seed, **kw)
        val = build_dataset(cfg.dataset, cfg.data_root or None, "val", EvalTransform(), seed=cfg.seed, **kw)
    except DatasetError as e:
        fail(one_line(e))
    return train, val


def build(cfg, ckpt, device, world, log):
    """-> (model (DDP-wrapped under torchrun), bare model)."""
    torch.manual_seed(cfg.seed)                                 # same initial weights on every rank
    net = model_from_config(cfg)
    if cfg.pretrained and ckpt is None:
        try:
            log(load_pretrained(net.backbone, cfg.pretrained))
        except (ValueError, RuntimeError, OSError, EOFError) as e:
            fail(f"--pretrained {cfg.pretrained}: {' '.join(str(e).split())[:400]}")
    if ckpt is not None:
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            fail(f"checkpoint {cfg.resume} does not fit the model: {' '.join(str(e).split())[:300]}")
    net.to(device)
    if world > 1 and device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    log(f"model: {cfg.backbone} + {cfg.head} head, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
        f"learnable parameters, {world} rank(s) on {device.type}")
    return model, net


def make_optimizer(cfg, net):
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]     # no weight decay on norms and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ----------------------------------------------------------------------------- training

class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (this rank's share of a (seed, epoch) permutation) that can start mid-epoch."""

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[getattr(self, "skip", 0):])


def batches(cfg, train_set, rank, world, start, device):
    """Endless (images, labels) from iteration `start` on; epochs restart at the right batch."""
    per_rank = cfg.batch_size // world
    sampler = ResumableSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        fail(f"{len(train_set)} training images are fewer than one batch of {per_rank} per rank; lower --batch-size")
    loader = torch.utils.data.DataLoader(train_set, per_rank, sampler=sampler, num_workers=cfg.workers,
                                         drop_last=True, pin_memory=device.type == "cuda")
    it = start
    while True:
        epoch, skip = divmod(it, steps_per_epoch)
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=skip * per_rank)
        for batch in loader:
            yield batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            it += 1


def next_batch(stream, world):
    """The next batch; a data error on any rank stops every rank (printed once, by the first failing rank)."""
    error, batch = None, None
    try:
        batch = next(stream)
    except DatasetError as e:
        error = one_line(e)
    if world == 1:
        return batch if error is None else fail(error)
    flags = torch.zeros(world)
    flags[dist.get_rank()] = error is not None
    flags = all_reduce(flags.to("cuda" if torch.cuda.is_available() else "cpu")).cpu()
    if flags.any():
        if error is not None and dist.get_rank() == int(flags.nonzero()[0]):
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    return batch


def train(cfg, model, net, train_set, val_set, ckpt, device, rank, world, log, log_file):
    """The loop: poly lr, one step, log, checkpoint, evaluate now and then. Returns nothing; exits on failure."""
    opt = make_optimizer(cfg, net)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.amp == "fp16")
    start = saved_it = 0
    if ckpt is not None and not ckpt.get("official"):
        try:
            opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError) as e:
            fail(f"checkpoint {cfg.resume}: its optimizer state does not fit --optimizer {cfg.optimizer} ({e})")
        start = saved_it = ckpt["iter"]
        log(f"resumed after iteration {start}")
    weight = torch.tensor(CITYSCAPES_CLASS_WEIGHTS, device=device) if cfg.class_weights == "cityscapes" else None
    stream = batches(cfg, train_set, rank, world, start, device)
    model.train()
    if cfg.freeze_bn:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    t0 = t_last = time.time()
    for it in range(start, cfg.iters):                          # `it` steps done; this one is iteration it + 1
        images, labels = next_batch(stream, world)
        lr = cfg.lr * (1 - it / cfg.iters) ** cfg.lr_power                     # poly schedule
        for g in opt.param_groups:
            g["lr"] = lr
        if it == 0 and cfg.proto_init == "data" and hasattr(net.head, "prototypes"):
            init_prototypes(cfg, net, images, labels)
        if hasattr(net.head, "momentum"):
            net.head.momentum = proto_momentum_at(it, cfg.proto_momentum, cfg.proto_momentum_warmup)
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + it)             # dropout: a function of it
        with autocast(cfg.amp, device):
            out = forward(model, images, labels, cfg)
        loss, terms = seg_loss(out, labels, cfg.lambda_ppc, cfg.lambda_ppd, cfg.tau, weight)
        if all_reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)).item():
            fail(f"non-finite loss at iteration {it + 1} ({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); "
                 f"stopping. {last_good(cfg, saved_it)}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        done = it + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.iters):
            speed = (done - max(start, done - cfg.log_every)) / max(time.time() - t_last, 1e-9)
            t_last = time.time()
            log_progress(cfg, done, loss, terms, lr, speed, device, log, log_file)
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            saved_it = save_checkpoint(cfg, net, opt, scaler, done, saved_it) if rank == 0 else done
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.iters:
            m = run_evaluation(cfg, model, val_set, device, rank, world, log)
            log(f"it {done}: val mIoU {100 * m['miou']:.2f}")
            log_row(log_file, {"iter": done, "val": metrics_report(m, val_set.class_names)})
    return time.time() - t0


def proto_momentum_at(it, final, warmup, start=MU_START):
    """mu of Eq. 14 for iteration it (0-based): linear from `start` to `final` over `warmup` iterations, then final."""
    if it >= warmup or start >= final:
        return final
    return start + (final - start) * it / warmup


@torch.no_grad()
def init_prototypes(cfg, net, images, labels):
    """--proto-init data: the K prototypes of each class from the first batch's within-class clustering
    (protoseg.cluster_prototypes). Embeddings in training mode (BatchNorm batch statistics), dropout off."""
    drops = [m for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in drops:
        m.eval()
    with autocast(cfg.amp, images.device):
        embed = net.embed(images)                                              # (B, h, w, D)
    for m in drops:
        m.train()
    lab = torch.nn.functional.interpolate(labels[:, None].float(), size=embed.shape[1:3], mode="nearest")
    lab = lab.long().flatten()
    keep = lab != net.head.ignore_index
    net.head.prototypes.copy_(cluster_prototypes(net.head.prototypes, embed.flatten(0, 2)[keep], lab[keep],
                                                 cfg.kappa, cfg.sinkhorn_iters, distributed=not cfg.local_stats))


def forward(model, images, labels, cfg):
    try:
        return model(images, labels)
    except ValueError as e:                                     # BatchNorm on a 1-value channel
        if "Expected more than 1 value per channel" not in str(e):
            raise
        fail(f"BatchNorm in training got one value per channel (per-rank batch {len(images)}, crop {cfg.crop}); "
             "use a per-rank batch >= 2, a larger --crop, or --freeze-bn")


def log_progress(cfg, it, loss, terms, lr, speed, device, log, log_file):
    """One line: loss = ce + lambda1 ppc + lambda2 ppd (Eq. 13), lr, speed, ETA, peak memory; and a log.jsonl row."""
    mem = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    row = {"iter": it, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "lr": lr,
           "it_per_s": speed, "eta_s": (cfg.iters - it) / max(speed, 1e-9), "mem_gb": mem}
    log(f"it {it}/{cfg.iters} | loss {row['loss']:.4f} (" + " ".join(f"{k} {row[k]:.4f}" for k in terms)
        + f") | lr {lr:.2e} | {speed:.2f} it/s | ETA {row['eta_s'] / 60:.1f} min | mem {mem:.2f} GB", flush=True)
    log_row(log_file, row)


def run_evaluation(cfg, model, val_set, device, rank, world, log):
    try:
        return evaluate(model, val_set, device, cfg.eval_crop, cfg.eval_scales, cfg.eval_flip, cfg.amp,
                        cfg.val_size, cfg.workers, rank, world, log)
    except DatasetError as e:
        fail(one_line(e))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = parse_args(argv)
    cfg, ckpt = resolve(cfg, given)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    lock = None
    try:
        train_set, val_set = make_datasets(cfg)
        if ckpt is not None and ckpt["config"]["num_classes"] != val_set.num_classes:
            fail(f"checkpoint {cfg.resume} predicts {ckpt['config']['num_classes']} classes "
                 f"({ckpt['config'].get('dataset')}); --dataset {cfg.dataset} has {val_set.num_classes}")
        cfg.num_classes = val_set.num_classes
        if cfg.batch_size % world:
            fail(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks ({world})")
        if not cfg.eval_only and ckpt is not None and ckpt.get("official"):
            fail(f"{cfg.resume} is an official ProtoSeg checkpoint: it holds no optimizer state; use --eval-only, "
                 "or --pretrained for its backbone")
        lock = claim_out_dir(cfg, ckpt is not None) if rank == 0 else None
        log("settings: " + json.dumps(dataclasses.asdict(cfg)))
        if rank == 0:
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
        model, net = build(cfg, ckpt, device, world, log)
        log_file = open_log(cfg, ckpt["iter"] if ckpt and not cfg.eval_only and "iter" in ckpt else 0) \
            if rank == 0 and not cfg.eval_only else None
        seconds = 0.0 if cfg.eval_only else train(cfg, model, net, train_set, val_set, ckpt, device, rank, world,
                                                   log, log_file)
        metrics = run_evaluation(cfg, model, val_set, device, rank, world, log)
        metrics["train_time_s"] = seconds
        log(format_metrics(metrics, val_set.class_names))
        if rank == 0:
            report = metrics_report(metrics, val_set.class_names)
            with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
                json.dump(report, f, indent=1, allow_nan=False)
            log_row(log_file, {"iter": cfg.iters, "final": report})
            log(f"wrote {os.path.join(cfg.out_dir, 'metrics.json')}")
        return metrics
    finally:
        if lock and os.path.exists(lock):
            os.remove(lock)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
