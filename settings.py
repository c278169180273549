"""Settings of train.py: the Config dataclass (every field a --flag, its comment the --help text), the presets per
dataset, the published transformer recipes, the command line, and the settings of a checkpoint being resumed.

Settings = Config defaults, then the dataset's preset (and, for a MiT / Swin backbone on ADE20K or Cityscapes, the
published recipe), then (when resuming or evaluating) the checkpoint's, then the command line.
"""
import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass

import models
import segformer
import swin
from checkpoints import CheckpointError, load_checkpoint
from collectives import is_master
from datafiles import path_problem
from runs import fail


@dataclass
class Config:
    dataset: str = "synthetic"        # synthetic | synthetic_modes | cityscapes | ade20k | ade20k_full | coco_stuff | folder
    data_root: str = ""               # dataset folder (not needed for synthetic)
    num_classes: int = 0              # folder dataset only
    ignore_value: int = 255           # folder dataset: the mask value meaning 'unlabelled'
    binary_masks: bool = None         # folder dataset: 0/255 masks, 255 read as class 1 (None: ask when seen)
    backbone: str = "hrnet18_small_v2"  # see models.BACKBONES
    head: str = "protoseg"            # protoseg | softmax (Eq. 1) | query (Eq. 2)
    pretrained: str = ""              # ImageNet backbone weights (.pth), loaded strictly
    out_dir: str = "runs/synthetic"   # last.pt, log.jsonl, metrics.json, config.json
    crop: tuple = (128, 128)          # training crop: H W, or one N for N x N
    scale: tuple = (0.5, 2.0)         # random scale range
    flip: bool = True                 # random horizontal flip
    pipeline: str = "project"         # train augmentation: project (scale, crop, flip, +-10 percent colour) | openseg (official ProtoSeg) | mmseg (SegFormer, Swin, mmseg baselines)
    aspect: tuple = (0.9, 1.1)        # openseg: aspect range of the random resize
    img_scale: tuple = (2048, 512)    # mmseg: the (long, short) box the image is rescaled to fit before x scale
    cat_max_ratio: float = 0.75       # mmseg: a crop is re-drawn (10x at most) while one class covers this share
    channel_order: str = "rgb"        # rgb | bgr: model input channel order (official departure 9; on for the ProtoSeg release)
    batch_size: int = 8               # global, split over ranks
    iters: int = 1000                 # optimizer steps
    optimizer: str = "sgd"            # sgd | adamw
    lr: float = 0.01                  # poly decay to 0 with power lr_power
    lr_power: float = 0.9             # poly exponent
    warmup_iters: int = 0             # linear lr warm-up from 1e-6 x lr (transformer recipes: 1500)
    head_lr_mult: float = 1.0         # lr multiplier of the decoder and head (SegFormer recipe: 10)
    aux_loss_weight: float = 0.0      # UperNet's auxiliary FCN head on stage 3 (Swin recipe: 0.4; 0 = none)
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 5e-4        # see no_decay_norms (MiT / Swin: their recipe's groups)
    no_decay_norms: bool = True       # CNNs: no weight decay on 1-D tensors (BN, biases); official ProtoSeg / mmseg HRNet: decay on all
    class_weights: str = "none"       # none | cityscapes (official CE weights)
    num_prototypes: int = 10          # K prototypes per class
    kappa: float = 0.05               # Sinkhorn entropy weight (Eq. 9)
    sinkhorn_iters: int = 3           # Sinkhorn-Knopp iterations (Eq. 10)
    proto_momentum: float = 0.999     # mu of Eq. 14
    proto_momentum_warmup: int = 0    # mu rises linearly from 0.9 to proto_momentum over this many iterations
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
    eval_stride: tuple = (0, 0)       # sliding-window stride H W (or N); 0: 2/3 of the window
    eval_resize: tuple = (0, 0)       # test: rescale to fit (long, short) keeping the ratio, scores resized back to the label; 0: none
    eval_divisor: int = 0             # test: after eval_resize, size rounded up to a multiple of this (SegFormer ADE20K: 32)
    eval_scales: tuple = (1.0,)       # test-time scales, scores summed
    eval_flip: bool = False           # add the horizontally flipped image
    val_size: int = 0                 # evaluate on the first N val images only (0 = all)
    resume: str = ""                  # checkpoint to continue or evaluate ('auto' = out_dir/last.pt if present)
    eval_only: bool = False           # evaluate the --resume checkpoint (its model settings) and stop
    overwrite: bool = False           # start afresh in an out_dir that holds an earlier run's last.pt
    allow_changes: bool = False       # resume with settings that change the training trajectory


MMSEG_512 = dict(pipeline="mmseg", img_scale=(2048, 512), cat_max_ratio=0.75, eval_resize=(2048, 512),
                 no_decay_norms=False)
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
    # openseg's pipeline (H_48_D_4_proto.json) and its optimiser (weight decay on every parameter)
    "cityscapes": dict(backbone="hrnet48", crop=(512, 1024), batch_size=8, iters=80000, lr=0.01,
                       class_weights="cityscapes", out_dir="runs/cityscapes", eval_every=8000, ckpt_every=1000,
                       pipeline="openseg", no_decay_norms=False),
    # the mmseg HRNet baselines' pipeline (_base_/datasets/ade20k.py, coco-stuff164k.py) and optimiser
    "ade20k": dict(backbone="hrnet48", crop=(512, 512), batch_size=16, iters=160000, lr=0.01,
                   out_dir="runs/ade20k", eval_every=16000, ckpt_every=2000, **MMSEG_512),
    "ade20k_full": dict(backbone="hrnet48", crop=(512, 512), batch_size=16, iters=160000, lr=0.01,
                        out_dir="runs/ade20k_full", eval_every=16000, ckpt_every=2000, **MMSEG_512),
    "coco_stuff": dict(backbone="hrnet48", crop=(512, 512), batch_size=16, iters=80000, lr=0.01,
                       out_dir="runs/coco_stuff", eval_every=8000, ckpt_every=1000, **MMSEG_512),
    "folder": dict(out_dir="runs/folder"),
}
FAMILIES = {"mit_": segformer, "swin_": swin}  # backbone prefix -> the file holding its RECIPES
RECIPE_KEYS = ("optimizer", "lr", "weight_decay", "head_lr_mult", "lr_power", "warmup_iters", "iters", "batch_size",
               "crop", "scale", "aux_loss_weight", "pipeline", "img_scale", "cat_max_ratio", "eval_resize",
               "eval_divisor", "eval_crop", "eval_stride")
MODEL_KEYS = ("backbone", "head", "num_classes", "num_prototypes", "class_layernorm", "embed_layernorm",
              "normalize_width")
# settings that change the training trajectory: a resumed run refuses other values unless --allow-changes
TRAJECTORY_KEYS = ("dataset", "ignore_value", "binary_masks", "crop", "scale", "flip", "batch_size", "iters",
                   "optimizer", "lr", "lr_power",
                   "momentum", "weight_decay", "class_weights", "kappa", "sinkhorn_iters", "proto_momentum",
                   "proto_momentum_warmup", "proto_init",
                   "lambda_ppc", "lambda_ppd", "tau", "update_correct_only", "local_stats", "dropout", "freeze_bn",
                   "amp", "seed", "warmup_iters", "head_lr_mult", "aux_loss_weight", "pipeline", "aspect", "img_scale",
                   "cat_max_ratio", "channel_order", "no_decay_norms")
# a checkpoint without these settings was made before they existed, with these values
BEFORE_RECIPES = dict(pipeline="project", no_decay_norms=True, channel_order="rgb", eval_stride=(0, 0),
                      eval_resize=(0, 0), eval_divisor=0)
CHOICES = {"dataset": list(PRESETS), "backbone": models.backbone_names(), "head": ["protoseg", "softmax", "query"],
           "optimizer": ["sgd", "adamw"], "proto_init": ["random", "data"], "class_weights": ["none", "cityscapes"],
           "pipeline": ["project", "openseg", "mmseg"], "channel_order": ["rgb", "bgr"], "amp": ["bf16", "fp16", "none"]}
POSITIVE = {"batch_size", "iters", "lr", "log_every", "ckpt_every", "num_prototypes", "kappa", "sinkhorn_iters",
            "tau", "crop", "img_scale", "aspect", "scale", "eval_scales", "head_lr_mult"}
NON_NEGATIVE = {"workers", "eval_every", "val_size", "lambda_ppc", "lambda_ppd", "weight_decay", "num_classes",
                "eval_crop", "lr_power", "seed", "proto_momentum_warmup", "warmup_iters", "aux_loss_weight",
                "ignore_value", "eval_stride", "eval_resize", "eval_divisor"}
FRACTION = {"momentum", "proto_momentum", "cat_max_ratio"}    # in [0, 1]
BELOW_ONE = {"dropout"}                      # in [0, 1): p = 1 drops every channel
# flags that only the ProtoSeg head reads: given with --head softmax / query they would do nothing
PROTO_KEYS = ("num_prototypes", "kappa", "sinkhorn_iters", "proto_momentum", "proto_momentum_warmup", "proto_init",
              "lambda_ppc", "lambda_ppd", "tau", "class_layernorm", "embed_layernorm", "update_correct_only",
              "local_stats", "normalize_width")
FOLDER_KEYS = ("num_classes", "ignore_value", "binary_masks")          # the folder dataset's own settings


# ----------------------------------------------------------------------------- settings

class Parser(argparse.ArgumentParser):
    def error(self, message):                                   # a flag error is a user error like any other
        fail(f"{message} (python {self.prog} --help lists every setting)")


def number(kind, name):
    """argparse type: int/float with the range this setting allows, named in the error; inf and nan refused."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} "
                                             f"{'integer' if kind is int else 'number'}") from None
        rule = ("> 0" if name in POSITIVE else ">= 0" if name in NON_NEGATIVE else "in [0, 1]" if name in FRACTION
                else "in [0, 1)" if name in BELOW_ONE else None)
        ok = {"> 0": v > 0, ">= 0": v >= 0, "in [0, 1]": 0 <= v <= 1, "in [0, 1)": 0 <= v < 1, None: True}[rule]
        if not math.isfinite(v) or not ok:
            raise argparse.ArgumentTypeError(f"{text} must be a finite number{' ' + rule if rule else ''}")
        return v
    return parse


def field_comments():
    """Config field -> its comment above, so --help shows the same words as the source."""
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(Config), re.M))


def make_parser(dataset, backbone=None):
    chosen = preset(dataset, backbone) if dataset in PRESETS else {}
    shown = {**dataclasses.asdict(Config()), **chosen}
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=protocol(shown, f"--dataset {dataset}" + (f" --backbone {backbone}" if backbone else "")))
    comments = field_comments()
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), shown[f.name]
        helptext = f"{comments.get(f.name, '')} (default{' for ' + dataset if f.name in chosen else ''}: {default})"
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


def protocol(s, chosen=""):
    """The train and test protocol of settings s (a dict), in words: what --help ends with."""
    train = {"project": f"the project's (scale {s['scale']}, crop, flip, +-10 percent colour jitter)",
             "openseg": f"openseg's (scale {s['scale']} x aspect {s['aspect']} bicubic, crop at random, padded at a "
                        "random offset, flip, brightness shift +-10)",
             "mmseg": f"mmseg's (Resize to fit {s['img_scale']} x {s['scale']}, RandomCrop cat_max_ratio "
                      f"{s['cat_max_ratio']}, flip, PhotoMetricDistortion, Pad)"}[s["pipeline"]]
    crop, stride = tuple(s["eval_crop"]), tuple(s["eval_stride"])
    test = "whole image" if not crop[0] else \
        f"sliding window {crop}, stride {stride if stride[0] else '2/3 of the window'}"
    if s["eval_resize"][0]:
        test += f", rescaled to fit {tuple(s['eval_resize'])} keeping the ratio" + \
            (f" (size a multiple of {s['eval_divisor']})" if s["eval_divisor"] else "") + ", scores back to the label"
    decay = "norms and biases without weight decay" if s["no_decay_norms"] else "weight decay on every parameter"
    decay = "the recipe's no-decay groups" if family(s["backbone"]) else decay
    return textwrap.fill(f"{chosen or 'these settings'}: crop {tuple(s['crop'])}, batch {s['batch_size']}, {s['iters']} iterations; "
            f"train pipeline {train}; {decay}; test {test}, scales {tuple(s['eval_scales'])}; input channel "
            f"order {s['channel_order']}", 100)


def family(backbone):
    """The module (segformer / swin) whose published recipe a transformer backbone trains with, or None."""
    prefix = next((p for p in FAMILIES if backbone.startswith(p)), None)
    return FAMILIES[prefix] if prefix else None


def preset(dataset, backbone=None):
    """The dataset's preset; for a MiT / Swin backbone on ADE20K or Cityscapes, the published transformer recipe
    (segformer.RECIPES / swin.RECIPES) over it."""
    out = dict(PRESETS.get(dataset, {}))
    fam = family(backbone or out.get("backbone", Config.backbone))
    recipe = fam.RECIPES.get("ade20k" if dataset == "ade20k_full" else dataset) if fam is not None else None
    if recipe is not None:
        out.update({k: v for k, v in recipe.items() if k in RECIPE_KEYS})
        if backbone == "mit_b5" and dataset in getattr(fam, "MIT_B5", {}):
            out.update(fam.MIT_B5[dataset])
    return out


def parse_args(argv=None):
    """-> (Config, the names given on the command line). Presets by --dataset (and a transformer --backbone);
    `--crop N` means N x N."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", type=str.lower, default=Config.dataset)
    pre.add_argument("--backbone", type=str.lower, default=None)
    known = pre.parse_known_args(argv)[0]
    dataset, backbone = known.dataset, known.backbone
    p = make_parser(dataset, backbone)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    for name in ("crop", "eval_crop", "eval_stride"):
        if name in given:
            if len(given[name]) > 2:
                p.error(f"--{name.replace('_', '-')} takes N or H W, got {len(given[name])} numbers")
            given[name] = tuple(given[name] * (3 - len(given[name])))[:2]
    if "scale" in given and (len(given["scale"]) != 2 or given["scale"][0] > given["scale"][1]):
        p.error(f"argument --scale: {' '.join(map(str, given['scale']))}, expected two numbers MIN MAX with "
                "0 < MIN <= MAX (e.g. 0.5 2)")
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    cfg = Config(**{**preset(dataset, backbone), **given})
    if cfg.eval_only and not cfg.resume:
        p.error("--eval-only needs --resume CHECKPOINT")
    check_paths(cfg, set(given))
    if not cfg.resume:                          # when resuming, the checkpoint's settings are checked in resolve()
        check_combinations(cfg, set(given))
    return cfg, set(given)


def check_combinations(cfg, given):
    """Flags that make no sense for this dataset / backbone / head / optimizer: one error naming the flag."""
    problems = []
    if cfg.class_weights == "cityscapes" and cfg.dataset != "cityscapes":
        problems.append(f"--class-weights cityscapes: the official weights are 19 values in Cityscapes' trainId "
                        f"order, --dataset {cfg.dataset} has other classes; expected --class-weights none")
    if cfg.aux_loss_weight > 0 and not cfg.backbone.startswith("swin_"):
        problems.append(f"--aux-loss-weight {cfg.aux_loss_weight}: --backbone {cfg.backbone} has no auxiliary head "
                        "(UperNet's, swin_* backbones only); expected 0")
    proto = [k for k in PROTO_KEYS if k in given]
    if cfg.head != "protoseg" and proto:
        problems.append(f"{flag(proto[0])}: only --head protoseg has prototypes, --head {cfg.head} would ignore it")
    folder = [k for k in FOLDER_KEYS if k in given]
    if cfg.dataset != "folder" and folder:
        problems.append(f"{flag(folder[0])}: a setting of --dataset folder; --dataset {cfg.dataset} has its own "
                        "classes")
    if cfg.dataset.startswith("synthetic") and "data_root" in given:
        problems.append(f"--data-root {cfg.data_root}: --dataset {cfg.dataset} is generated and reads no files; "
                        "expected no --data-root (or --dataset folder / cityscapes / ...)")
    if cfg.optimizer == "adamw" and "momentum" in given:
        problems.append("--momentum: an SGD setting; --optimizer adamw keeps its betas (0.9, 0.999)")
    if problems:
        fail(problems[0])


def flag(name):
    return "--" + name.replace("_", "-")


def check_paths(cfg, given):
    """The kind of each path flag before anything runs: a folder where a folder is meant, a file where a file is."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        fail(f"--out-dir {cfg.out_dir} is a file, expected a folder (created if missing)")
    if cfg.data_root and not os.path.isdir(cfg.data_root):
        found = "a file" if os.path.exists(cfg.data_root) else path_problem(cfg.data_root)
        fail(f"--data-root {cfg.data_root}: {found}, expected the dataset's folder")
    if cfg.pretrained and not os.path.isfile(cfg.pretrained):
        found = "a folder" if os.path.isdir(cfg.pretrained) else path_problem(cfg.pretrained)
        fail(f"--pretrained {cfg.pretrained}: {found}, expected a weights file (.pth, or a run's last.pt)")


def checkpoint_path(cfg):
    """The file --resume names: 'auto' = out_dir/last.pt (None if absent, which starts afresh; --eval-only fails);
    a run folder = its last.pt."""
    if cfg.resume == "auto":
        path = os.path.join(cfg.out_dir, "last.pt")
        if os.path.isfile(path):
            return path
        if cfg.eval_only:
            fail(f"--eval-only --resume auto: no last.pt in {cfg.out_dir} ({path_problem(path)}), expected a run's "
                 "checkpoint there; give --out-dir RUN or --resume CHECKPOINT")
        return None
    if os.path.isdir(cfg.resume):
        path = os.path.join(cfg.resume, "last.pt")
        if not os.path.isfile(path):
            fail(f"--resume {cfg.resume}: a folder without last.pt, expected a checkpoint file or a run folder "
                 "holding last.pt")
        return path
    if not os.path.isfile(cfg.resume):
        fail(f"--resume {cfg.resume}: {path_problem(cfg.resume)}, expected a checkpoint file (runs/*/last.pt), "
             "a run folder or 'auto'")
    return cfg.resume


def resolve(cfg, given):
    """Settings for a resumed or evaluated checkpoint -> (cfg, checkpoint or None). The checkpoint's settings fill
    everything not given; a given model setting must agree; a given trajectory setting must agree unless
    --allow-changes (evaluation takes the model from the checkpoint and any other setting from the command line)."""
    if not cfg.resume:
        return cfg, None
    path = checkpoint_path(cfg)
    if path is None:                                            # --resume auto, no last.pt yet: a fresh run
        check_combinations(cfg, given)
        return cfg, None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        fail(str(e))
    if not cfg.eval_only and not isinstance(ckpt.get("iter"), int) and not ckpt.get("official"):
        fail(f"checkpoint {path} has no iteration count ('iter'), expected a train.py checkpoint to continue; "
             "evaluate it with --eval-only")
    run_control = ("resume", "eval_only", "overwrite", "allow_changes")              # this command's, not the run's
    saved = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__ and k not in run_control}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    if not ckpt.get("official"):                 # checkpoints from before these settings: what they trained with
        saved = {**{k: v for k, v in BEFORE_RECIPES.items() if k not in saved}, **saved}
    keys = MODEL_KEYS + (() if cfg.eval_only or cfg.allow_changes else TRAJECTORY_KEYS)
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {getattr(cfg, k)!r}" for k in keys
            if k in given and k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        hint = "" if any(k in MODEL_KEYS for k in given if k in saved and saved[k] != getattr(cfg, k)) else \
            "; pass --allow-changes to continue with the new values"
        fail(f"checkpoint {path} was made with other settings: " + "; ".join(diff) + hint)
    base = {**dataclasses.asdict(Config()), **preset(saved.get("dataset", cfg.dataset), saved.get("backbone")), **saved}
    cfg = Config(**{**base, **{k: getattr(cfg, k) for k in given | {"eval_only", "resume"}}})
    if cfg.resume != "auto":
        cfg.resume = path
    if cfg.eval_only:                            # never over the training run's record: its own folder
        cfg.out_dir = os.path.join(cfg.out_dir if "out_dir" in given else os.path.dirname(path) or ".", "eval")
    check_combinations(cfg, given)
    if ckpt.get("official") and is_master():
        print(f"{path}: the official ProtoSeg format; evaluating it with official departures 1, 2, 7 and 9 (BGR "
              "input) on")
    return cfg, ckpt
