"""Settings of train.py: Config (one line per setting: its default and help), the presets per dataset, the command
line and the settings of a checkpoint being resumed or evaluated.

Settings = Config defaults, then the dataset's preset (for a MiT / Swin backbone on ADE20K or Cityscapes: its
published recipe over it), then (when resuming or evaluating) the checkpoint's, then the command line.
"""
import argparse
import dataclasses
import os
import sys
import textwrap
from dataclasses import dataclass

import segformer
import swin
from checkpoints import CheckpointError, load_checkpoint
from collectives import is_master
from commands import Parser, exit_with_error, ranged
from models import backbone_names, family
from runs import check_outputs, check_paths, checkpoint_path

SYNTHETIC = dict(backbone="hrnet_tiny", iters=700, optimizer="adamw", lr=3e-3, weight_decay=1e-4, batch_size=16,
                 ckpt_every=100, log_every=25, eval_every=100)
HRNET48 = dict(backbone="hrnet48", lr=0.01, norm_decay=True)         # the official optimisers: decay on every parameter
MMSEG_512 = dict(HRNET48, crop=(512, 512), batch_size=16, pipeline="mmseg", img_scale=(2048, 512), cat_max_ratio=0.75,
                 eval_resize=(2048, 512))                            # mmseg's _base_/datasets/ade20k.py, coco-stuff164k.py
PRESETS = {
    "synthetic": SYNTHETIC,   # ~4.4 min on 2 CPU cores; mu the paper's 0.999 (0.99 merged two classes: RESULTS.md)
    # the same scenes labelled by mode (15 classes c * 3 + m), softmax head: backbone pretraining for --pretrained
    "synthetic_modes": dict(SYNTHETIC, head="softmax", out_dir="runs/synthetic_modes"),
    # the paper's recipe, with openseg's pipeline (H_48_D_4_proto.json)
    "cityscapes": dict(HRNET48, crop=(512, 1024), batch_size=8, iters=80000, class_weights="cityscapes",
                       out_dir="runs/cityscapes", eval_every=8000, ckpt_every=1000, pipeline="openseg"),
    "ade20k": dict(MMSEG_512, iters=160000, out_dir="runs/ade20k", eval_every=16000, ckpt_every=2000),
    "ade20k_full": dict(MMSEG_512, iters=160000, out_dir="runs/ade20k_full", eval_every=16000, ckpt_every=2000),
    "coco_stuff": dict(MMSEG_512, iters=80000, out_dir="runs/coco_stuff", eval_every=8000, ckpt_every=1000),
    "folder": dict(out_dir="runs/folder"),
}
RECIPE_FILES = {"mit": segformer, "swin": swin}   # family -> the file with its published RECIPES and no_weight_decay


def arg(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Config:
    dataset: str = arg("synthetic", "the data, and the preset of every default below")
    data_root: str = arg("", "dataset folder (not needed for synthetic)")
    num_classes: int = arg(0, "folder dataset only")
    ignore_value: int = arg(255, "folder dataset: the mask value meaning 'unlabelled'")
    binary_masks: bool = arg(None, "folder dataset: 0/255 masks, 255 read as class 1 (None: ask when seen)")
    backbone: str = arg("hrnet18_small_v2", "HRNet, ResNet, MiT or Swin preset (models.py)")
    head: str = arg("protoseg", "prototypes, or the baselines softmax (Eq. 1) and query (Eq. 2)")
    pretrained: str = arg("", "ImageNet backbone weights (.pth), loaded strictly")
    out_dir: str = arg("runs/synthetic", "last.pt, log.jsonl, metrics.json, config.json, curves.png")
    # training data and augmentation
    crop: tuple = arg((128, 128), "training crop: H W, or one N for N x N")
    scale: tuple = arg((0.5, 2.0), "random scale range")
    flip: bool = arg(True, "random horizontal flip")
    pipeline: str = arg("project", "train augmentation: ours, official ProtoSeg's, or mmseg's (SegFormer, Swin)")
    aspect: tuple = arg((0.9, 1.1), "openseg: aspect range of the random resize")
    img_scale: tuple = arg((2048, 512), "mmseg: the (long, short) box the image is rescaled to fit before x scale")
    cat_max_ratio: float = arg(0.75, "mmseg: a crop is re-drawn (10x at most) while one class covers this share")
    channel_order: str = arg("rgb", "model input channel order (the ProtoSeg release was trained on bgr)")
    # optimisation
    batch_size: int = arg(8, "global, split over ranks")
    iters: int = arg(1000, "optimizer steps")
    optimizer: str = arg("sgd", "SGD with momentum, or AdamW")
    lr: float = arg(0.01, "poly decay to 0 with power lr_power")
    lr_power: float = arg(0.9, "poly exponent")
    warmup_iters: int = arg(0, "linear lr warm-up from 1e-6 x lr (transformer recipes: 1500)")
    head_lr_mult: float = arg(1.0, "lr multiplier of the decoder and head (SegFormer recipe: 10)")
    aux_loss_weight: float = arg(0.0, "UperNet's auxiliary FCN head on stage 3 (Swin recipe: 0.4; 0 = none)")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(5e-4, "see norm_decay (MiT / Swin: their recipe's groups)")
    norm_decay: bool = arg(False, "CNNs: weight decay on norms and biases too (official ProtoSeg, mmseg HRNet)")
    class_weights: str = arg("none", "CE class weights: cityscapes = the official ones")
    # ProtoSeg (Eq. 6-14)
    num_prototypes: int = arg(10, "K prototypes per class")
    kappa: float = arg(0.05, "Sinkhorn entropy weight (Eq. 9)")
    sinkhorn_iters: int = arg(3, "Sinkhorn-Knopp iterations (Eq. 10)")
    proto_momentum: float = arg(0.999, "mu of Eq. 14")
    proto_momentum_warmup: int = arg(0, "mu rises linearly from 0.9 to proto_momentum over this many iterations")
    proto_init: str = arg("random", "random (paper) | data: first batch's within-class clustering (not in paper)")
    lambda_ppc: float = arg(0.01, "lambda_1 of Eq. 13")
    lambda_ppd: float = arg(0.001, "lambda_2 of Eq. 13")
    tau: float = arg(0.1, "PPC temperature (Eq. 11); official code: 1")
    class_layernorm: bool = arg(True, "official code: LayerNorm over a pixel's class scores (on: better here)")
    embed_layernorm: bool = arg(False, "official code: LayerNorm on the embedding")
    update_correct_only: bool = arg(False, "official code: only correct pixels move prototypes")
    local_stats: bool = arg(False, "official code: per-rank Sinkhorn, averaged prototypes")
    normalize_width: bool = arg(False, "official code: l2 over the width axis (its released checkpoint)")
    dropout: float = arg(0.1, "Dropout2d in the head")
    freeze_bn: bool = arg(False, "BatchNorm uses running statistics (tiny per-device batches)")
    amp: str = arg("bf16", "mixed precision on a GPU (the CPU runs fp32)")
    workers: int = arg(2, "DataLoader workers (training and evaluation)")
    seed: int = arg(0, "weights, data order, augmentation, dropout")
    # logging, checkpoints, evaluation
    log_every: int = arg(20, "iterations between progress lines")
    eval_every: int = arg(0, "iterations between evaluations; 0: only at the end")
    ckpt_every: int = arg(500, "iterations between checkpoints (and at the end)")
    eval_crop: tuple = arg((0, 0), "sliding-window size H W (or N); 0: whole image")
    eval_stride: tuple = arg((0, 0), "sliding-window stride H W (or N); 0: 2/3 of the window")
    eval_resize: tuple = arg((0, 0), "test: rescale to fit (long, short), scores back to the label; 0: none")
    eval_divisor: int = arg(0, "test: after eval_resize, size rounded up to a multiple of this")
    eval_scales: tuple = arg((1.0,), "test-time scales, scores summed")
    eval_flip: bool = arg(False, "add the horizontally flipped image")
    val_size: int = arg(0, "evaluate on the first N val images only (0 = all)")
    # this command
    resume: str = arg("", "checkpoint to continue or evaluate ('auto' = out_dir/last.pt if present)")
    eval_only: bool = arg(False, "evaluate the --resume checkpoint (its model settings) and stop")
    overwrite: bool = arg(False, "start afresh in an out_dir that holds an earlier run's last.pt")
    allow_changes: bool = arg(False, "resume with settings that change the training trajectory")


FIELDS = tuple(f.name for f in dataclasses.fields(Config))
# MODEL: the network (a resumed or evaluated checkpoint must agree); COMMAND: this command's, never a checkpoint's;
# FREE: files, logging, evaluation; TRAJECTORY: the rest (a resumed run refuses a new value but with --allow-changes)
MODEL = ("num_classes", "backbone", "head", "num_prototypes", "class_layernorm", "embed_layernorm", "normalize_width")
COMMAND = ("resume", "eval_only", "overwrite", "allow_changes")
FREE = ("data_root", "pretrained", "out_dir", "workers", "log_every", "eval_every", "ckpt_every", "eval_crop",
        "eval_stride", "eval_resize", "eval_divisor", "eval_scales", "eval_flip", "val_size")
TRAJECTORY = tuple(k for k in FIELDS if k not in MODEL + COMMAND + FREE)
PROTOSEG_ONLY = ("num_prototypes", "kappa", "sinkhorn_iters", "proto_momentum", "proto_momentum_warmup", "proto_init",
                 "lambda_ppc", "lambda_ppd", "tau", "class_layernorm", "embed_layernorm", "update_correct_only",
                 "local_stats", "normalize_width")
FOLDER_ONLY = ("num_classes", "ignore_value", "binary_masks")
# what an evaluation (--eval-only) reads; every other setting is training's
EVALUATION = MODEL + ("dataset", "data_root", "ignore_value", "binary_masks", "out_dir", "channel_order", "amp",
                      "workers", "seed", "eval_crop", "eval_stride", "eval_resize", "eval_divisor", "eval_scales",
                      "eval_flip", "val_size", "resume", "eval_only")
CHOICES = {"dataset": list(PRESETS), "backbone": backbone_names(), "head": ["protoseg", "softmax", "query"],
           "pipeline": ["project", "openseg", "mmseg"], "channel_order": ["rgb", "bgr"], "optimizer": ["sgd", "adamw"],
           "class_weights": ["none", "cityscapes"], "proto_init": ["random", "data"], "amp": ["bf16", "fp16", "none"]}
HW = ("crop", "eval_crop", "eval_stride")               # one number N means N x N
FRACTIONS = ("cat_max_ratio", "momentum", "proto_momentum")
NON_NEGATIVE = ("num_classes", "ignore_value", "lr_power", "warmup_iters", "aux_loss_weight", "weight_decay",
                "proto_momentum_warmup", "lambda_ppc", "lambda_ppd", "workers", "seed", "eval_every", "eval_crop",
                "eval_stride", "eval_resize", "eval_divisor", "val_size")


# ----------------------------------------------------------------------------- the command line

def number(kind, name):
    """argparse type of the number setting `name` (each number of a tuple), in its range (dropout: p = 1 would drop
    every channel; every number not listed above is a size, count or rate: > 0)."""
    return ranged(kind, "in [0, 1)" if name == "dropout" else "in [0, 1]" if name in FRACTIONS else
                  ">= 0" if name in NON_NEGATIVE else "> 0")


def flag(name):
    return "--" + name.replace("_", "-")


def make_parser(dataset, backbone=None):
    """The parser of train.py; --help shows each default as the chosen --dataset (and --backbone) set it."""
    preset_values = preset(dataset, backbone) if dataset in PRESETS else {}
    shown = {**dataclasses.asdict(Config()), **preset_values}
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=protocol({**shown, "backbone": backbone or shown["backbone"]}, dataset))
    for f in dataclasses.fields(Config):
        text = f"{f.metadata['help']} (default{' for ' + dataset if f.name in preset_values else ''}: {shown[f.name]})"
        if f.type is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        elif f.name in CHOICES:
            kw = dict(type=str.lower, choices=CHOICES[f.name])
        elif f.type is tuple:
            kw = dict(nargs="+", type=number(type(f.default[0]), f.name))
        else:
            kw = dict(type=number(f.type, f.name) if f.type in (int, float) else f.type)
        p.add_argument(flag(f.name), default=None, help=text, **kw)
    return p


PIPELINES = {"project": "the project's: scale, crop, flip, +-10 percent colour jitter",
             "openseg": "openseg's: scale x aspect (bicubic), crop, pad at a random offset, flip, brightness +-10",
             "mmseg": "mmseg's: resize to fit img_scale x scale, RandomCrop, flip, PhotoMetricDistortion, pad"}


def protocol(s, dataset):
    """What --help ends with: how settings s (a dict) train and test."""
    crop, stride = tuple(s["eval_crop"]), tuple(s["eval_stride"])
    test = f"sliding window {crop}, stride {stride if stride[0] else '2/3 of the window'}" if crop[0] else \
        "whole image"
    if s["eval_resize"][0]:
        test += f", rescaled to fit {tuple(s['eval_resize'])} (multiple of {s['eval_divisor'] or 1}), scores back"
    decay = "the recipe's no-decay groups" if family(s["backbone"]) in RECIPE_FILES else \
        "weight decay on every parameter" if s["norm_decay"] else "no weight decay on norms and biases"
    lines = [f"train: crop {tuple(s['crop'])}, batch {s['batch_size']}, {s['iters']} iterations, "
             f"{PIPELINES[s['pipeline']]} (scale {tuple(s['scale'])}); {decay}",
             f"test: {test}; scales {tuple(s['eval_scales'])}; input channel order {s['channel_order']}"]
    return f"How --dataset {dataset} --backbone {s['backbone']} trains and tests:\n" + \
        "\n".join(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="    ") for line in lines)


def preset(dataset, backbone=None):
    """The dataset's preset; for a MiT / Swin backbone on ADE20K or Cityscapes, its published recipe over it."""
    out = dict(PRESETS.get(dataset, {}))
    recipes = RECIPE_FILES.get(family(backbone or out.get("backbone", Config.backbone)))
    recipe = recipes.RECIPES.get("ade20k" if dataset == "ade20k_full" else dataset) if recipes else None
    if recipe is not None:
        out.update(recipe)
        if backbone == "mit_b5":
            out.update(getattr(recipes, "MIT_B5", {}).get(dataset, {}))
    return out


def dataset_and_backbone(argv):
    """The --dataset and --backbone of the command line (None: not given), for the preset and its --help."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", type=str.lower, default=Config.dataset)
    pre.add_argument("--backbone", type=str.lower, default=None)
    known = pre.parse_known_args(argv)[0]                       # an unknown name: the full parser says so
    return known.dataset if known.dataset in PRESETS else Config.dataset, \
        known.backbone if known.backbone in CHOICES["backbone"] else None


def parse_args(argv=None):
    """-> (Config, the names given on the command line)."""
    argv = sys.argv[1:] if argv is None else argv
    dataset, backbone = dataset_and_backbone(argv)
    p = make_parser(dataset, backbone)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    for name in HW:
        if len(given.get(name, ())) > 2:
            p.error(f"{flag(name)} takes N or H W, got {len(given[name])} numbers")
    if "scale" in given and (len(given["scale"]) != 2 or given["scale"][0] > given["scale"][1]):
        p.error(f"argument --scale: {' '.join(map(str, given['scale']))}, expected two numbers MIN MAX with "
                "0 < MIN <= MAX (e.g. 0.5 2)")
    given = {k: tuple(v * 2 if k in HW and len(v) == 1 else v) if isinstance(v, list) else v for k, v in given.items()}
    cfg = Config(**{**preset(dataset, backbone), **given})
    if cfg.eval_only and not cfg.resume:
        p.error("--eval-only needs --resume CHECKPOINT")
    if cfg.resume and cfg.overwrite:
        exit_with_error(f"--resume {cfg.resume} and --overwrite exclude each other: --resume continues the run in "
                        f"{cfg.out_dir}, --overwrite starts it over; expected one of them")
    if cfg.allow_changes and not cfg.resume:
        exit_with_error("--allow-changes lets a resumed run take new settings, and this run resumes nothing; expected "
                        "it with --resume")
    check_paths(cfg)
    if not cfg.resume:                          # when resuming, the checkpoint's settings are checked in resolve()
        check_combinations(cfg, set(given))
    return cfg, set(given)


def check_combinations(cfg, given):
    """Flags that make no sense for this dataset / backbone / head / optimizer: one error naming the flag."""
    protoseg = [k for k in PROTOSEG_ONLY if k in given]
    folder = [k for k in FOLDER_ONLY if k in given]
    if cfg.class_weights == "cityscapes" and cfg.dataset != "cityscapes":
        exit_with_error(f"--class-weights cityscapes: the official weights are 19 values in Cityscapes' trainId order, "
                        f"--dataset {cfg.dataset} has other classes; expected --class-weights none")
    if cfg.aux_loss_weight > 0 and family(cfg.backbone) != "swin":
        exit_with_error(f"--aux-loss-weight {cfg.aux_loss_weight}: --backbone {cfg.backbone} has no auxiliary head "
                        "(UperNet's, swin_* backbones only); expected 0")
    if cfg.head != "protoseg" and protoseg:
        exit_with_error(f"{flag(protoseg[0])}: only --head protoseg has prototypes, --head {cfg.head} would ignore it")
    if cfg.dataset != "folder" and folder:
        exit_with_error(f"{flag(folder[0])}: a setting of --dataset folder; --dataset {cfg.dataset} has its own "
                        "classes")
    if cfg.dataset.startswith("synthetic") and "data_root" in given:
        exit_with_error(f"--data-root {cfg.data_root}: --dataset {cfg.dataset} is generated and reads no files; "
                        "expected no --data-root (or --dataset folder / cityscapes / ...)")
    if cfg.optimizer == "adamw" and "momentum" in given:
        exit_with_error("--momentum: an SGD setting; --optimizer adamw keeps its betas (0.9, 0.999)")
    for name, needs in (("eval_stride", "eval_crop"), ("eval_divisor", "eval_resize")):
        if name in given and not getattr(cfg, needs)[0]:
            exit_with_error(f"{shown(cfg, name)}: used with {flag(needs)} only, which is {shown(cfg, needs)} here; "
                            f"expected {flag(needs)} with it, or no {flag(name)}")


def shown(cfg, name):
    """A setting as the command line gives it: --crop 64 64, --eval-flip / --no-eval-flip."""
    value = getattr(cfg, name)
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    return f"{flag(name)} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"


def check_unused(cfg, given, saved):
    """The rule for a flag the chosen mode does not use: refused, naming it and the mode. A setting given with the
    value the checkpoint was made with changes nothing (the run's own command line, run again) and passes."""
    defaults = dataclasses.asdict(Config())
    same = lambda k: getattr(cfg, k) == saved.get(k, defaults[k])
    if cfg.eval_only:
        unused = [k for k in FIELDS if k in given and k not in EVALUATION and not same(k)]
        if unused:
            exit_with_error(f"--eval-only evaluates {cfg.resume} and trains nothing, so it would ignore "
                            f"{', '.join(shown(cfg, k) for k in unused)}; expected none of them with --eval-only")
    elif "pretrained" in given and not same("pretrained"):
        exit_with_error(f"--pretrained {cfg.pretrained}: a resumed run takes its weights from --resume {cfg.resume} "
                        f"(which started from {saved.get('pretrained') or 'random weights'}); expected no --pretrained "
                        "when resuming")


# ----------------------------------------------------------------------------- resuming and evaluating

def refuse_changes(cfg, given, saved, path):
    """A given MODEL setting must equal the checkpoint's; so must a given TRAJECTORY setting when training on
    without --allow-changes (an evaluation takes any other setting from the command line)."""
    keys = MODEL + (() if cfg.eval_only or cfg.allow_changes else TRAJECTORY)
    changed = [k for k in keys if k in given and k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        hint = "" if set(changed) & set(MODEL) else "; pass --allow-changes to continue with the new values"
        exit_with_error(f"checkpoint {path} was made with other settings: " +
                        "; ".join(f"{k}: checkpoint {saved[k]!r} vs now {getattr(cfg, k)!r}" for k in changed) + hint)


def resolve(cfg, given):
    """Settings for a resumed or evaluated checkpoint -> (cfg, checkpoint or None): the checkpoint's settings fill
    every setting not given on the command line (refuse_changes guards the given ones)."""
    path = checkpoint_path(cfg) if cfg.resume else None
    if path is None:                                            # a fresh run (also --resume auto without last.pt)
        if cfg.resume:
            check_combinations(cfg, given)
        check_outputs(cfg)
        return cfg, None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        exit_with_error(str(e))
    if not cfg.eval_only and not isinstance(ckpt.get("iter"), int) and not ckpt.get("official"):
        exit_with_error(f"checkpoint {path} has no iteration count ('iter'), expected a train.py checkpoint to "
                        "continue; evaluate it with --eval-only")
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()
             if k in FIELDS and k not in COMMAND}
    refuse_changes(cfg, given, saved, path)
    base = {**dataclasses.asdict(Config()), **preset(saved.get("dataset", cfg.dataset), saved.get("backbone")), **saved}
    cfg = Config(**{**base, **{k: getattr(cfg, k) for k in given | {"eval_only", "resume"}}})
    if cfg.resume != "auto":
        cfg.resume = path
    if cfg.eval_only:                            # never over the training run's record: its own folder
        cfg.out_dir = os.path.join(cfg.out_dir if "out_dir" in given else os.path.dirname(path) or ".", "eval")
    check_combinations(cfg, given)
    check_unused(cfg, given, saved)
    check_outputs(cfg, path)
    if ckpt.get("official") and is_master():
        print(f"{path}: the official ProtoSeg format; evaluated with official departures 1, 2, 7, 9 (BGR input) on")
    return cfg, ckpt
