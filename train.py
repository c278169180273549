"""Train and evaluate ProtoSeg (or a softmax / query baseline) on one device or under torchrun.

    python train.py                                   # embedded synthetic dataset, tiny HRNet, 2-core CPU, 4-8 min
    python train.py --dataset cityscapes --data-root /data/cityscapes --pretrained hrnetv2_w48_imagenet.pth
    python train.py --dataset synthetic_modes && python train.py --pretrained runs/synthetic_modes/last.pt
    torchrun --nproc_per_node=8 train.py --dataset cityscapes --data-root ...
    python train.py --resume auto --dataset cityscapes                       # continue runs/cityscapes/last.pt
    python train.py --eval-only --resume runs/cityscapes/last.pt --eval-flip --eval-scales 0.75 1 1.25

Settings (settings.py) = Config defaults, then the dataset's preset, then (when resuming) the checkpoint's, then the
command line. They are printed, written to out_dir/config.json and saved in every checkpoint. out_dir holds last.pt (the latest
checkpoint), log.jsonl (one row per logged iteration and evaluation) and metrics.json (the final evaluation).
Exact resume: dropout is reseeded from (seed, rank, iteration) every step, data order and augmentation are
functions of (seed, epoch, index), so a resumed run replays the same stream.
"""
import dataclasses
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import CheckpointError, load_pretrained, load_state, save_checkpoint
from collectives import all_reduce, is_master, setup_distributed
from data import DatasetError, EvalTransform, build_dataset, check_dataset, train_transform
from evaluate import autocast, evaluate, format_metrics, metrics_report
from labels import CITYSCAPES_CLASS_WEIGHTS
from models import model_from_config
from protoseg import data_prototypes, momentum_at, seg_loss, update_prototypes
from runs import (claim_out_dir, fail, interrupted_line, last_good, log_row, one_line, open_log, out_of_memory_line,
                  peer_lost_line, run_command, run_complete, signals_deferred)
from settings import Config, family, parse_args, resolve  # noqa: F401  (Config: for users and tests)

# ----------------------------------------------------------------------------- set-up

def make_datasets(cfg, log=print):
    """(train set or None for --eval-only, val set). Data errors become one-line user errors."""
    kw = dict(num_classes=cfg.num_classes, ignore_value=cfg.ignore_value,
              binary_masks=cfg.binary_masks) if cfg.dataset == "folder" else {}
    augment = train_transform(cfg.pipeline, cfg.crop, cfg.scale, cfg.flip, cfg.channel_order, **(
        dict(aspect=cfg.aspect) if cfg.pipeline == "openseg" else
        dict(img_scale=cfg.img_scale, cat_max_ratio=cfg.cat_max_ratio) if cfg.pipeline == "mmseg" else {}))
    try:
        train = None if cfg.eval_only else build_dataset(
            cfg.dataset, cfg.data_root or None, "train", augment, seed=cfg.seed, **kw)
        val = build_dataset(cfg.dataset, cfg.data_root or None, "val",
                            EvalTransform(cfg.channel_order, cfg.eval_resize, cfg.eval_divisor), seed=cfg.seed, **kw)
        say = log if is_master() else None                      # every file checked before the first step
        if train is not None:
            check_dataset(train, name="train", log=say)
        check_dataset(torch.utils.data.Subset(val, range(min(cfg.val_size or len(val), len(val)))), values=True,
                      name="val", log=say)
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
        except (CheckpointError, ValueError, RuntimeError, KeyError, AttributeError) as e:
            fail(f"--pretrained {cfg.pretrained}: {' '.join(str(e).split())[:400]}; expected ImageNet backbone weights "
                 "(.pth) for --backbone " + cfg.backbone)
    if ckpt is not None:
        try:
            load_state(net, ckpt["model"], cfg.resume)
        except CheckpointError as e:
            fail(str(e))
    net.to(device)
    if world > 1 and device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    log(f"model: {cfg.backbone} + {cfg.head} head, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
        f"learnable parameters, {world} rank(s) on {device.type}")
    return model, net


def make_optimizer(cfg, net):
    """Parameter groups by (weight decay?, lr multiplier). CNNs: no decay on norms and biases with no_decay_norms,
    else decay on every parameter (the official ProtoSeg / mmseg HRNet optimisers). MiT / Swin: the family's
    no_weight_decay(name) (norms, position-bias tables); head_lr_mult on the decoder and head."""
    fam = family(cfg.backbone)
    groups = {}
    for name, p in net.named_parameters():
        decay = not fam.no_weight_decay(name) if fam else p.ndim > 1 or not cfg.no_decay_norms
        mult = cfg.head_lr_mult if name.startswith(("neck.", "head.")) else 1.0
        groups.setdefault((decay, mult), []).append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult}
              for (decay, mult), ps in groups.items()]
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


def train(cfg, model, net, train_set, val_set, ckpt, device, rank, world, log, log_file, progress=None):
    """The loop: lr schedule, one step, log, checkpoint, evaluate now and then. Returns the seconds it took;
    exits (code 1) on a non-finite loss, a diverged model or a data error. progress: {"done", "saved"} kept
    current for the interrupt message (cli)."""
    opt = make_optimizer(cfg, net)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.amp == "fp16")
    start = saved_it = restore(cfg, ckpt, opt, scaler, log)
    progress = {} if progress is None else progress
    progress.update(done=start, saved=start)
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
        lr = learning_rate(cfg, it)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        if it == 0 and cfg.proto_init == "data" and hasattr(net.head, "prototypes"):
            with autocast(cfg.amp, device):                     # not in the paper, which starts random
                net.head.prototypes.copy_(data_prototypes(net, images, labels, cfg.kappa, cfg.sinkhorn_iters,
                                                          distributed=not cfg.local_stats))
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + it)             # dropout: a function of it
        with autocast(cfg.amp, device):
            out = forward(model, images, labels, cfg)           # Eq. 5-10 (ProtoSeg: + Sinkhorn targets)
        loss, terms = seg_loss(out, labels, cfg.lambda_ppc, cfg.lambda_ppd, cfg.tau, weight,
                               aux_weight=cfg.aux_loss_weight)  # Eq. 7, 11-13 (+ UperNet's aux CE)
        if all_reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)).item():
            fail(f"non-finite loss at iteration {it + 1} ({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); "
                 f"stopping. {last_good(cfg, saved_it)}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if "update_target" in out:                              # Eq. 14 after the step, mu of this iteration
            mu = momentum_at(it, cfg.proto_momentum, cfg.proto_momentum_warmup)
            net.head.prototypes.copy_(update_prototypes(net.head.prototypes, out["embed"], out["update_target"],
                                                        mu, cfg.local_stats))
        done = progress["done"] = it + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.iters):
            speed = (done - max(start, done - cfg.log_every)) / max(time.time() - t_last, 1e-9)
            t_last = time.time()
            log_progress(cfg, done, loss, terms, lr, speed, device, log, log_file)
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            with signals_deferred():                            # the file and the record of it, whole
                saved_it = save_checkpoint(cfg, net, opt, scaler, done, saved_it) if rank == 0 else done
                progress["saved"] = saved_it
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.iters:
            m = run_evaluation(cfg, model, val_set, device, rank, world, log)
            log(f"it {done}: val mIoU {100 * m['miou']:.2f}")
            log_row(log_file, {"iter": done, "val": metrics_report(m, val_set.class_names)})
    return time.time() - t0


def restore(cfg, ckpt, opt, scaler, log):
    """Optimizer and scaler state from the checkpoint; returns the iterations it had done (0 for a fresh run)."""
    if ckpt is None:
        return 0
    if ckpt["config"].get("optimizer") != cfg.optimizer:           # allowed by --allow-changes
        log(f"--optimizer {cfg.optimizer}: the checkpoint's {ckpt['config'].get('optimizer')} state is not restored")
    else:
        try:
            opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError) as e:
            fail(f"checkpoint {cfg.resume}: its optimizer state does not fit --optimizer {cfg.optimizer} ({e})")
    log(f"resumed after iteration {ckpt['iter']}")
    return ckpt["iter"]


def learning_rate(cfg, it):
    """Poly: lr (1 - it / iters)^power; during a linear warm-up times 1 - (1 - it / warmup)(1 - 1e-6) (mmcv's)."""
    lr = cfg.lr * (1 - it / cfg.iters) ** cfg.lr_power
    if it < cfg.warmup_iters:
        lr *= 1 - (1 - it / cfg.warmup_iters) * (1 - 1e-6)
    return lr


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
                        cfg.val_size, cfg.workers, rank, world, log, stride=cfg.eval_stride)
    except DatasetError as e:
        fail(one_line(e))


# ----------------------------------------------------------------------------- main

def main(argv=None, progress=None):
    cfg, given = parse_args(argv)
    cfg, ckpt = resolve(cfg, given)
    progress = {} if progress is None else progress
    progress.update(cfg=cfg, saved=ckpt.get("iter", 0) if ckpt else 0)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    lock = None
    if run_complete(cfg, ckpt):
        return log(run_complete(cfg, ckpt))
    try:
        train_set, val_set = make_datasets(cfg, log)
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
        fam = family(cfg.backbone)
        if fam is not None and cfg.dataset in fam.RECIPES:
            log(f"recipe: {fam.__name__}.RECIPES[{cfg.dataset!r}], the published {cfg.backbone} recipe")
        log("settings: " + json.dumps(dataclasses.asdict(cfg)))
        if rank == 0:
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
        model, net = build(cfg, ckpt, device, world, log)
        log_file = open_log(cfg, ckpt["iter"] if ckpt and not cfg.eval_only and "iter" in ckpt else 0) \
            if rank == 0 and not cfg.eval_only else None
        seconds = 0.0 if cfg.eval_only else train(cfg, model, net, train_set, val_set, ckpt, device, rank, world,
                                                   log, log_file, progress)
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


# ----------------------------------------------------------------------------- the command

def cli(argv=None):
    """main() as a command (runs.run_command): Ctrl-C / SIGTERM, a torchrun peer's death and an allocation failure
    end in one line (exit 130 / 143 / 1) with the lock removed and the DataLoader workers stopped."""
    progress = {}
    run_command(lambda: main(argv, progress), lambda: interrupted_line(progress),
                out_of_memory=lambda text: out_of_memory_line(progress, text),
                peer_lost=lambda text: peer_lost_line(progress, text))


if __name__ == "__main__":
    cli()
