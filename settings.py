"""Settings of train.py: the Config dataclass (every field a --flag, declared once with all its facts), the presets
per dataset, the published transformer recipes, the command line, and the settings of a checkpoint being resumed.

Settings = Config defaults, then the dataset's preset (and, for a MiT / Swin backbone on ADE20K or Cityscapes, the
published recipe), then (when resuming or evaluating) the checkpoint's, then the command line.
"""
import argparse
import dataclasses
import math
import os
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
RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1,
         "in [0, 1)": lambda v: 0 <= v < 1}    # dropout p = 1 would drop every channel


def setting(default, text, role=None, **facts):
    """A Config field with its facts, read by the parser, the checks and --help:
    role:    "model" (a resumed run must agree), "trajectory" (a resumed run refuses another value unless
             --allow-changes), "command" (this command's, never taken from a checkpoint) or None (files, logging,
             evaluation);
    rule:    the range of a number (each number of a tuple), a key of RULES;  choices: the values allowed;
    only:    "protoseg" (only that head reads it) or "folder" (a setting of --dataset folder);
    hw:      "N" means N x N;  added: a checkpoint without it predates it and ran with the default."""
    assert role in (None, "model", "trajectory", "command") and facts.get("only") in (None, "protoseg", "folder")
    assert facts.keys() <= {"rule", "choices", "only", "hw", "added"} and facts.get("rule") in (None, *RULES)
    return dataclasses.field(default=default, metadata=dict(help=text, role=role, **facts))


@dataclass
class Config:
    dataset: str = setting("synthetic", "synthetic | synthetic_modes | cityscapes | ade20k | ade20k_full | "
                           "coco_stuff | folder", "trajectory", choices=list(PRESETS))
    data_root: str = setting("", "dataset folder (not needed for synthetic)")
    num_classes: int = setting(0, "folder dataset only", "model", rule=">= 0", only="folder")
    ignore_value: int = setting(255, "folder dataset: the mask value meaning 'unlabelled'", "trajectory",
                                rule=">= 0", only="folder")
    binary_masks: bool = setting(None, "folder dataset: 0/255 masks, 255 read as class 1 (None: ask when seen)",
                                 "trajectory", only="folder")
    backbone: str = setting("hrnet18_small_v2", "see models.BACKBONES", "model", choices=models.backbone_names())
    head: str = setting("protoseg", "protoseg | softmax (Eq. 1) | query (Eq. 2)", "model",
                        choices=["protoseg", "softmax", "query"])
    pretrained: str = setting("", "ImageNet backbone weights (.pth), loaded strictly")
    out_dir: str = setting("runs/synthetic", "last.pt, log.jsonl, metrics.json, config.json")
    crop: tuple = setting((128, 128), "training crop: H W, or one N for N x N", "trajectory", rule="> 0", hw=True)
    scale: tuple = setting((0.5, 2.0), "random scale range", "trajectory", rule="> 0")
    flip: bool = setting(True, "random horizontal flip", "trajectory")
    pipeline: str = setting("project", "train augmentation: project (scale, crop, flip, +-10 percent colour) | "
                            "openseg (official ProtoSeg) | mmseg (SegFormer, Swin, mmseg baselines)", "trajectory",
                            choices=["project", "openseg", "mmseg"], added=True)
    aspect: tuple = setting((0.9, 1.1), "openseg: aspect range of the random resize", "trajectory", rule="> 0")
    img_scale: tuple = setting((2048, 512), "mmseg: the (long, short) box the image is rescaled to fit before x "
                               "scale", "trajectory", rule="> 0")
    cat_max_ratio: float = setting(0.75, "mmseg: a crop is re-drawn (10x at most) while one class covers this "
                                   "share", "trajectory", rule="in [0, 1]")
    channel_order: str = setting("rgb", "rgb | bgr: model input channel order (official departure 9; on for the "
                                 "ProtoSeg release)", "trajectory", choices=["rgb", "bgr"], added=True)
    batch_size: int = setting(8, "global, split over ranks", "trajectory", rule="> 0")
    iters: int = setting(1000, "optimizer steps", "trajectory", rule="> 0")
    optimizer: str = setting("sgd", "sgd | adamw", "trajectory", choices=["sgd", "adamw"])
    lr: float = setting(0.01, "poly decay to 0 with power lr_power", "trajectory", rule="> 0")
    lr_power: float = setting(0.9, "poly exponent", "trajectory", rule=">= 0")
    warmup_iters: int = setting(0, "linear lr warm-up from 1e-6 x lr (transformer recipes: 1500)", "trajectory",
                                rule=">= 0")
    head_lr_mult: float = setting(1.0, "lr multiplier of the decoder and head (SegFormer recipe: 10)", "trajectory",
                                  rule="> 0")
    aux_loss_weight: float = setting(0.0, "UperNet's auxiliary FCN head on stage 3 (Swin recipe: 0.4; 0 = none)",
                                     "trajectory", rule=">= 0")
    momentum: float = setting(0.9, "SGD momentum", "trajectory", rule="in [0, 1]")
    weight_decay: float = setting(5e-4, "see no_decay_norms (MiT / Swin: their recipe's groups)", "trajectory",
                                  rule=">= 0")
    no_decay_norms: bool = setting(True, "CNNs: no weight decay on 1-D tensors (BN, biases); official ProtoSeg / "
                                   "mmseg HRNet: decay on all", "trajectory", added=True)
    class_weights: str = setting("none", "none | cityscapes (official CE weights)", "trajectory",
                                 choices=["none", "cityscapes"])
    num_prototypes: int = setting(10, "K prototypes per class", "model", rule="> 0", only="protoseg")
    kappa: float = setting(0.05, "Sinkhorn entropy weight (Eq. 9)", "trajectory", rule="> 0", only="protoseg")
    sinkhorn_iters: int = setting(3, "Sinkhorn-Knopp iterations (Eq. 10)", "trajectory", rule="> 0", only="protoseg")
    proto_momentum: float = setting(0.999, "mu of Eq. 14", "trajectory", rule="in [0, 1]", only="protoseg")
    proto_momentum_warmup: int = setting(0, "mu rises linearly from 0.9 to proto_momentum over this many "
                                         "iterations", "trajectory", rule=">= 0", only="protoseg")
    proto_init: str = setting("random", "random (paper) | data: first batch's within-class clustering (not in "
                              "paper)", "trajectory", choices=["random", "data"], only="protoseg")
    lambda_ppc: float = setting(0.01, "lambda_1 of Eq. 13", "trajectory", rule=">= 0", only="protoseg")
    lambda_ppd: float = setting(0.001, "lambda_2 of Eq. 13", "trajectory", rule=">= 0", only="protoseg")
    tau: float = setting(0.1, "PPC temperature (Eq. 11); official code: 1", "trajectory", rule="> 0", only="protoseg")
    class_layernorm: bool = setting(True, "official departure 1 (LayerNorm class scores); default by measurement",
                                    "model", only="protoseg")
    embed_layernorm: bool = setting(False, "official departure 2 (LayerNorm on the embedding)", "model",
                                    only="protoseg")
    update_correct_only: bool = setting(False, "official departure 4 (only correct pixels move prototypes)",
                                        "trajectory", only="protoseg")
    local_stats: bool = setting(False, "official departure 6 (per-rank Sinkhorn, averaged prototypes)",
                                "trajectory", only="protoseg")
    normalize_width: bool = setting(False, "official departure 7 (l2 over the width axis; released checkpoint)",
                                    "model", only="protoseg")
    dropout: float = setting(0.1, "Dropout2d in the head", "trajectory", rule="in [0, 1)")
    freeze_bn: bool = setting(False, "BatchNorm uses running statistics (tiny per-device batches)", "trajectory")
    amp: str = setting("bf16", "bf16 | fp16 | none (GPU only; the CPU runs fp32)", "trajectory",
                       choices=["bf16", "fp16", "none"])
    workers: int = setting(2, "DataLoader workers (training and evaluation)", rule=">= 0")
    seed: int = setting(0, "weights, data order, augmentation, dropout", "trajectory", rule=">= 0")
    log_every: int = setting(20, "iterations between progress lines", rule="> 0")
    eval_every: int = setting(0, "iterations between evaluations; 0: only at the end", rule=">= 0")
    ckpt_every: int = setting(500, "iterations between checkpoints (and at the end)", rule="> 0")
    eval_crop: tuple = setting((0, 0), "sliding-window size H W (or N); 0: whole image", rule=">= 0", hw=True)
    eval_stride: tuple = setting((0, 0), "sliding-window stride H W (or N); 0: 2/3 of the window", rule=">= 0",
                                 hw=True, added=True)
    eval_resize: tuple = setting((0, 0), "test: rescale to fit (long, short) keeping the ratio, scores resized back "
                                 "to the label; 0: none", rule=">= 0", added=True)
    eval_divisor: int = setting(0, "test: after eval_resize, size rounded up to a multiple of this (SegFormer "
                                "ADE20K: 32)", rule=">= 0", added=True)
    eval_scales: tuple = setting((1.0,), "test-time scales, scores summed", rule="> 0")
    eval_flip: bool = setting(False, "add the horizontally flipped image")
    val_size: int = setting(0, "evaluate on the first N val images only (0 = all)", rule=">= 0")
    resume: str = setting("", "checkpoint to continue or evaluate ('auto' = out_dir/last.pt if present)", "command")
    eval_only: bool = setting(False, "evaluate the --resume checkpoint (its model settings) and stop", "command")
    overwrite: bool = setting(False, "start afresh in an out_dir that holds an earlier run's last.pt", "command")
    allow_changes: bool = setting(False, "resume with settings that change the training trajectory", "command")


def fact(name, key):
    """One fact of a setting (see setting()), None where it has none."""
    return Config.__dataclass_fields__[name].metadata.get(key)


def names(**facts):
    """The settings with these facts, in Config order: names(role="model"), names(only="protoseg")."""
    return tuple(f.name for f in dataclasses.fields(Config) if all(fact(f.name, k) == v for k, v in facts.items()))


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
        rule = fact(name, "rule")
        if not math.isfinite(v) or rule and not RULES[rule](v):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number{' ' + rule if rule else ''}")
        return v
    return parse


def make_parser(dataset, backbone=None):
    chosen = preset(dataset, backbone) if dataset in PRESETS else {}
    shown = {**dataclasses.asdict(Config()), **chosen}
    used = {**shown, "backbone": backbone or shown["backbone"]}                # what this command would train
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=protocol(used, f"--dataset {dataset}" + (f" --backbone {backbone}" if backbone else "")))
    for f in dataclasses.fields(Config):
        helptext = f"{f.metadata['help']} (default{' for ' + dataset if f.name in chosen else ''}: {shown[f.name]})"
        if f.type is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        elif f.metadata.get("choices"):
            kw = dict(type=str.lower, choices=f.metadata["choices"])
        elif f.type is tuple:
            kw = dict(nargs="+", type=number(type(f.default[0]), f.name))
        else:
            kw = dict(type=number(f.type, f.name) if f.type in (int, float) else f.type)
        p.add_argument(flag(f.name), default=None, help=helptext, **kw)
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
        out.update(recipe)
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
    for name in names(hw=True):
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
    proto = [k for k in names(only="protoseg") if k in given]
    if cfg.head != "protoseg" and proto:
        problems.append(f"{flag(proto[0])}: only --head protoseg has prototypes, --head {cfg.head} would ignore it")
    folder = [k for k in names(only="folder") if k in given]
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
    saved = {k: v for k, v in ckpt["config"].items() if k in names() and fact(k, "role") != "command"}  # not its command
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    if not ckpt.get("official"):                 # checkpoints from before these settings: what they trained with
        saved = {**{k: getattr(Config, k) for k in names(added=True) if k not in saved}, **saved}
    model = names(role="model")
    keys = model + (() if cfg.eval_only or cfg.allow_changes else names(role="trajectory"))
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {getattr(cfg, k)!r}" for k in keys
            if k in given and k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        hint = "" if any(k in model for k in given if k in saved and saved[k] != getattr(cfg, k)) else \
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
