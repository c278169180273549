"""Train and evaluate ProtoSeg (or a softmax / query baseline) on one device or under torchrun.

    python train.py                                   # embedded synthetic dataset, tiny HRNet, 2-core CPU, 4-8 min
    python train.py --dataset cityscapes --data-root /data/cityscapes --pretrained hrnetv2_w48_imagenet.pth
    python train.py --dataset synthetic_modes && python train.py --pretrained runs/synthetic_modes/last.pt
    torchrun --nproc_per_node=8 train.py --dataset cityscapes --data-root ...
    python train.py --resume auto --dataset cityscapes                       # continue runs/cityscapes/last.pt
    python train.py --eval-only --resume runs/cityscapes/last.pt --eval-flip --eval-scales 0.75 1 1.25

Settings (settings.py) = Config defaults, then the dataset's preset, then (when resuming) the checkpoint's, then the
command line. The main ones are printed; all are written to out_dir/config.json and saved in every checkpoint.
out_dir holds last.pt (the latest checkpoint), log.jsonl (one row per logged iteration and evaluation),
metrics.json (the final evaluation) and curves.png (the training curves).
Exact resume: dropout is reseeded from (seed, rank, iteration) every step, data order and augmentation are
functions of (seed, epoch, index), so a resumed run replays the same stream.
"""
import dataclasses
import json
import os
import resource
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import CheckpointError, load_pretrained, load_state, save_checkpoint
from collectives import all_reduce, autocast, rank_and_world, setup_distributed
from commands import Outputs, error_message, exit_with_error, run_command, signals_deferred
from data import EvalTransform, build_dataset, train_transform
from datafiles import DatasetError, check_dataset
from evaluate import evaluate, format_metrics, metrics_report
from labels import CITYSCAPES_CLASS_WEIGHTS
from models import family, model_from_config
from protoseg import data_prototypes, momentum_at, seg_loss, update_prototypes
from runs import (RunLog, check_out_dir, claim_out_dir, completed_run_message, interrupted_line, last_good,
                  out_of_memory_line, peer_lost_line, stop_if_any_rank_failed, write_curves)
from settings import RECIPE_FILES, parse_args, resolve

# ----------------------------------------------------------------------------- set-up

def check_classes(cfg, ckpt, val_set):
    """The checkpoint predicts the classes of the data it is given (checked before the data's files are)."""
    made = ckpt and ckpt["config"]
    if made and made["num_classes"] != val_set.num_classes:
        exit_with_error(f"checkpoint {cfg.resume} predicts {made['num_classes']} classes ({made.get('dataset')}); "
                        f"--dataset {cfg.dataset} has {val_set.num_classes}; expected data of the checkpoint's "
                        f"classes (--dataset {made.get('dataset')} and its --data-root), or a checkpoint trained on "
                        f"{cfg.dataset}")


def make_datasets(cfg, log=print, ckpt=None):
    """(train set or None for --eval-only, val set). Data errors become one-line user errors; data whose classes
    are not the checkpoint's is refused before its files are checked."""
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
        check_classes(cfg, ckpt, val)
        check_out_dir(cfg.out_dir, "--out-dir", cfg.data_root, *(d for d in (train, val) if d is not None))
        if train is not None:                                   # every file checked before the first step
            check_dataset(train, name="train", log=log)
        check_dataset(torch.utils.data.Subset(val, range(min(cfg.val_size or len(val), len(val)))), values=True,
                      name="val", log=log)
    except DatasetError as e:
        exit_with_error(error_message(e))
    return train, val


def build(cfg, ckpt, device, log):
    """-> (model: DDP-wrapped under torchrun, else raw_model; raw_model: the SegModel itself)."""
    torch.manual_seed(cfg.seed)                                 # same initial weights on every rank
    raw_model = model_from_config(cfg)
    if cfg.pretrained and ckpt is None:
        try:
            log(load_pretrained(raw_model.backbone, cfg.pretrained))
        except (CheckpointError, ValueError, RuntimeError, KeyError, AttributeError) as e:
            exit_with_error(f"--pretrained {cfg.pretrained}: {error_message(e, 400)}; expected ImageNet "
                            "backbone weights (.pth) for --backbone " + cfg.backbone)
    if ckpt is not None:
        try:
            load_state(raw_model, ckpt["model"], cfg.resume)
        except CheckpointError as e:
            exit_with_error(str(e))
    raw_model.to(device)
    world = rank_and_world()[1]
    if world > 1 and device.type == "cuda":
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else raw_model
    log(f"model: {cfg.backbone} + {cfg.head} head, {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M "
        f"learnable parameters, {world} rank(s) on {device.type}")
    return model, raw_model


def make_optimizer(cfg, raw_model):
    """Parameter groups by (weight decay?, lr multiplier). CNNs: weight decay on norms and biases only with
    --norm-decay (the official ProtoSeg / mmseg HRNet optimisers decay every parameter). MiT / Swin: the family's
    no_weight_decay(name) (norms, position-bias tables); head_lr_mult on the decoder and head."""
    recipe = RECIPE_FILES.get(family(cfg.backbone))
    groups = {}
    for name, p in raw_model.named_parameters():
        decay = not recipe.no_weight_decay(name) if recipe else p.ndim > 1 or cfg.norm_decay
        mult = cfg.head_lr_mult if name.startswith(("neck.", "head.")) else 1.0
        groups.setdefault((decay, mult), []).append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult}
              for (decay, mult), ps in groups.items()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def learning_rate(cfg, it):
    """Poly: lr (1 - it / iters)^power; during a linear warm-up times 1 - (1 - it / warmup)(1 - 1e-6) (mmcv's)."""
    lr = cfg.lr * (1 - it / cfg.iters) ** cfg.lr_power
    if it < cfg.warmup_iters:
        lr *= 1 - (1 - it / cfg.warmup_iters) * (1 - 1e-6)
    return lr


# ----------------------------------------------------------------------------- one iteration's helpers

class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (this rank's share of a (seed, epoch) permutation) that can start mid-epoch."""

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[getattr(self, "skip", 0):])


def batches(cfg, train_set, start, device):
    """Endless (images, labels) from iteration `start` on; epochs restart at the right batch."""
    rank, world = rank_and_world()
    per_rank = cfg.batch_size // world
    sampler = ResumableSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        exit_with_error(f"{len(train_set)} training images are fewer than one batch of {per_rank} per rank; lower "
                        "--batch-size")
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


def next_batch(stream, device):
    """The next batch; a data error on any rank stops every rank, printed once."""
    error, batch = None, None
    try:
        batch = next(stream)
    except DatasetError as e:
        error = error_message(e)
    stop_if_any_rank_failed(error, device)
    return batch


def reseed_dropout(cfg, rank, it):
    """Dropout draws from the global generator: reseeded from (seed, rank, iteration) at every step, a resumed run
    draws the masks the uninterrupted run drew."""
    torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + it)


def stop_if_not_finite(loss, terms, it, cfg, saved_it):
    """A non-finite loss on any rank stops every rank (exit 1) before the optimiser step would spread it."""
    if all_reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)).item():
        exit_with_error(f"non-finite loss at iteration {it + 1} "
                        f"({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); stopping. "
                        f"{last_good(cfg, saved_it)}")


def speed_and_eta(done, iters, steps, seconds):
    """(it/s of the last `steps` iterations, which took `seconds`; the seconds the other iters - done will take)."""
    speed = steps / max(seconds, 1e-9)
    return speed, (iters - done) / max(speed, 1e-9)


def log_progress(cfg, done, loss, terms, lr, steps, seconds, device, log):
    """One line: loss = ce + lambda1 ppc + lambda2 ppd (Eq. 13), lr, speed, ETA, peak memory; and a log.jsonl row."""
    mem = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    speed, eta = speed_and_eta(done, cfg.iters, steps, seconds)
    row = {"iter": done, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "lr": lr,
           "it_per_s": speed, "eta_s": eta, "mem_gb": mem}
    log(f"it {done}/{cfg.iters} | loss {row['loss']:.4f} (" + " ".join(f"{k} {row[k]:.4f}" for k in terms)
        + f") | lr {lr:.2e} | {speed:.2f} it/s | ETA {eta / 60:.1f} min | mem {mem:.2f} GB", flush=True)
    log.row(row)


def checkpoint(cfg, raw_model, opt, scaler, done, saved_it, progress):
    """last.pt after iteration `done` (rank 0), and the record of it for a stop message, both whole; -> done."""
    with signals_deferred():
        saved_it = save_checkpoint(cfg, raw_model, opt, scaler, done, saved_it) if rank_and_world()[0] == 0 else done
        progress["saved"] = saved_it
    return saved_it


def run_evaluation(cfg, model, val_set, log):
    try:
        return evaluate(model, val_set, cfg, log)
    except DatasetError as e:
        exit_with_error(error_message(e))


def evaluate_now(cfg, model, val_set, done, log):
    """An evaluation during training: a line and a log.jsonl row. Returns the seconds it took."""
    t0 = time.time()
    m = run_evaluation(cfg, model, val_set, log)
    log(f"it {done}: val mIoU {100 * m['miou']:.2f}")
    log.row({"iter": done, "val": metrics_report(m, val_set.class_names)})
    return time.time() - t0


def set_train_mode(cfg, model, raw_model):
    """Every module in training mode, except BatchNorm with --freeze-bn (running statistics, no update)."""
    model.train()
    if cfg.freeze_bn:
        for m in raw_model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


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
            exit_with_error(f"checkpoint {cfg.resume}: its optimizer state does not fit --optimizer {cfg.optimizer} "
                            f"({e})")
    log(f"resumed after iteration {ckpt['iter']}")
    return ckpt["iter"]


# ----------------------------------------------------------------------------- training

def train(cfg, model, raw_model, train_set, val_set, ckpt, log, progress):
    """The loop: batch, forward (Eq. 5-10), loss (Eq. 7, 11-13), backward and optimiser step, then the prototypes'
    Eq. 14; log, checkpoint and evaluate now and then. Returns the seconds it took. progress: {"done", "saved"} kept
    current for the line a stopped run ends with (runs.py)."""
    device, rank = next(raw_model.parameters()).device, rank_and_world()[0]
    opt = make_optimizer(cfg, raw_model)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.amp == "fp16")
    start = saved_it = logged = restore(cfg, ckpt, opt, scaler, log)
    progress.update(done=start, saved=start)
    weight = torch.tensor(CITYSCAPES_CLASS_WEIGHTS, device=device) if cfg.class_weights == "cityscapes" else None
    stream = batches(cfg, train_set, start, device)
    set_train_mode(cfg, model, raw_model)
    t0 = t_logged = time.time()
    for it in range(start, cfg.iters):                          # `it` steps done; this one is iteration it + 1
        images, labels = next_batch(stream, device)             # a data error on any rank stops every rank
        lr = learning_rate(cfg, it)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        if it == 0 and cfg.proto_init == "data" and hasattr(raw_model.head, "prototypes"):
            with autocast(cfg.amp, device):                     # not in the paper, which starts random
                raw_model.head.prototypes.copy_(data_prototypes(raw_model, images, labels, cfg.kappa,
                                                                cfg.sinkhorn_iters, distributed=not cfg.local_stats))
        reseed_dropout(cfg, rank, it)
        with autocast(cfg.amp, device):
            out = model(images, labels)                         # Eq. 5-10: scores; ProtoSeg: + Sinkhorn targets
        loss, terms = seg_loss(out, labels, cfg.lambda_ppc, cfg.lambda_ppd, cfg.tau, weight,
                               aux_weight=cfg.aux_loss_weight)  # Eq. 7, 11-13 (+ UperNet's aux CE)
        stop_if_not_finite(loss, terms, it, cfg, saved_it)      # on any rank: every rank stops
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if "update_target" in out:                              # Eq. 14 after the step, with this iteration's mu
            mu = momentum_at(it, cfg.proto_momentum, cfg.proto_momentum_warmup)
            raw_model.head.prototypes.copy_(update_prototypes(raw_model.head.prototypes, out["embed"],
                                                              out["update_target"], mu, cfg.local_stats))
        done = progress["done"] = it + 1
        if done % cfg.log_every == 0 or done == cfg.iters:
            log_progress(cfg, done, loss, terms, lr, done - logged, time.time() - t_logged, device, log)
            logged, t_logged = done, time.time()
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            saved_it = checkpoint(cfg, raw_model, opt, scaler, done, saved_it, progress)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.iters:
            t_logged += evaluate_now(cfg, model, val_set, done, log)   # it/s leaves evaluations out
    return time.time() - t0


# ----------------------------------------------------------------------------- main

def describe(cfg):
    """A few lines for the start of a run: the main settings (config.json has them all)."""
    recipe = RECIPE_FILES.get(family(cfg.backbone))
    head = f"{cfg.head} head" + (f", K {cfg.num_prototypes}, lambda_ppc {cfg.lambda_ppc}, lambda_ppd "
                                 f"{cfg.lambda_ppd}, tau {cfg.tau}, kappa {cfg.kappa}, mu {cfg.proto_momentum}"
                                 if cfg.head == "protoseg" else "")
    return [f"settings (all in {os.path.join(cfg.out_dir, 'config.json')}):",
            f"  data   {cfg.dataset}{' ' + cfg.data_root if cfg.data_root else ''}, {cfg.num_classes} classes, crop "
            f"{cfg.crop[0]}x{cfg.crop[1]}, batch {cfg.batch_size}, {cfg.pipeline} pipeline",
            f"  model  {cfg.backbone} + {head}",
            f"  train  {cfg.iters} iterations of {cfg.optimizer} (lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}"
            f"{', warm-up ' + str(cfg.warmup_iters) if cfg.warmup_iters else ''}), seed {cfg.seed}"
            + (f"; {recipe.__name__}.RECIPES[{cfg.dataset!r}], the published recipe"
               if recipe and cfg.dataset in recipe.RECIPES else ""),
            f"  out    {cfg.out_dir}"]


def check_run(cfg, ckpt, val_set, world):
    """What can only be checked once the data is known: the batch split over ranks, an official checkpoint."""
    if cfg.batch_size % world:
        exit_with_error(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    if not cfg.eval_only and ckpt is not None and ckpt.get("official"):
        exit_with_error(f"{cfg.resume} is an official ProtoSeg checkpoint: it holds no optimizer state; use "
                        "--eval-only, or --pretrained for its backbone")


def finish(cfg, metrics, class_names, log):
    """Rank 0 at the end: metrics.json, the final log.jsonl row and the training curves (curves.png)."""
    report = metrics_report(metrics, class_names)
    Outputs(cfg.out_dir, "--out-dir").text("metrics.json", json.dumps(report, indent=1, allow_nan=False))
    log.row({"iter": cfg.iters, "final": report})
    log(f"wrote {os.path.join(cfg.out_dir, 'metrics.json')}")
    if not cfg.eval_only:
        log(f"wrote {write_curves(cfg.out_dir)}")


def main(argv=None, progress=None):
    cfg, given = parse_args(argv)
    cfg, ckpt = resolve(cfg, given)
    progress = {} if progress is None else progress
    progress.update(cfg=cfg, saved=ckpt.get("iter", 0) if ckpt else 0)
    rank, world, device = setup_distributed()
    log, lock = RunLog(rank), None
    complete = completed_run_message(cfg, ckpt)
    if complete:
        return log(complete)
    try:
        train_set, val_set = make_datasets(cfg, log if rank == 0 else None, ckpt)
        check_run(cfg, ckpt, val_set, world)
        cfg.num_classes = val_set.num_classes
        lock = claim_out_dir(cfg, ckpt is not None) if rank == 0 else None
        log("\n".join(describe(cfg)))
        if rank == 0:
            Outputs(cfg.out_dir, "--out-dir").text("config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
        model, raw_model = build(cfg, ckpt, device, log)
        if device.type == "cpu" and not cfg.eval_only and cfg.backbone != "hrnet_tiny":
            log(f"note: --backbone {cfg.backbone} trains slowly on a CPU; a CPU-sized run: --backbone hrnet_tiny "
                "--crop 128 --batch-size 8 --optimizer adamw --lr 3e-3 --weight-decay 1e-4 (USAGE.md, 'Your data on "
                "a CPU')")
        if not cfg.eval_only:
            log.open(cfg, ckpt["iter"] if ckpt and "iter" in ckpt else 0)
        try:
            seconds = 0.0 if cfg.eval_only else train(cfg, model, raw_model, train_set, val_set, ckpt, log, progress)
        except ValueError as e:                                 # BatchNorm on a 1-value channel
            if "Expected more than 1 value per channel" not in str(e):
                raise
            exit_with_error(f"BatchNorm in training got one value per channel (per-rank batch "
                            f"{cfg.batch_size // world}, crop {cfg.crop}); use a per-rank batch >= 2, a larger "
                            "--crop, or --freeze-bn")
        metrics = run_evaluation(cfg, model, val_set, log)
        metrics["train_time_s"] = seconds
        log(format_metrics(metrics, val_set.class_names))
        if rank == 0:
            finish(cfg, metrics, val_set.class_names, log)
        return metrics
    finally:
        log.close()
        if lock and os.path.exists(lock):
            os.remove(lock)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the command

def cli(argv=None):
    """main() as a command (commands.run_command): Ctrl-C / SIGTERM, a torchrun peer's death and an allocation failure
    end in one line (exit 130 / 143 / 1) with the lock removed and the DataLoader workers stopped."""
    progress = {}
    run_command(lambda: main(argv, progress), lambda: interrupted_line(progress),
                out_of_memory=lambda text: out_of_memory_line(progress, text),
                peer_lost=lambda text: peer_lost_line(progress, text))


if __name__ == "__main__":
    cli()
