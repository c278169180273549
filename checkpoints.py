"""Every checkpoint read, write, conversion and strict load of the project.

    train.py's last.pt   {"model", "optimizer", "scaler", "iter", "config"}: save_checkpoint writes it (atomically,
                         only when the model is healthy); load_checkpoint reads it
    the official release tfzhou/ProtoSeg's {"state_dict": ...} (openseg layout): load_checkpoint converts it
                         (official_to_project) and switches on the official departures it computes with
    ImageNet backbones   load_pretrained: HRNet-seg, torchvision, NVlabs MiT and microsoft Swin files, strictly
Every file is read with torch.load(weights_only=True) and only from a regular file; weights or buffers that are not
numbers (NaN, Inf) are refused by every loader; every problem is one CheckpointError naming the file.
"""
import dataclasses
import fnmatch
import os
import pickle

import torch

from datafiles import unreadable_reason
from models import model_from_config
from commands import error_message, exit_with_error
from runs import last_good


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, what was found and what was expected."""


# ----------------------------------------------------------------------------- writing

DIVERGED = 1e8   # a weight or buffer above this magnitude: the run diverged; such a model is never checkpointed


def atomic_save(obj, path):
    """Write, fsync, rename: a crash leaves either the old or the new checkpoint, never half of one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):                                 # a failed write leaves nothing behind
            os.remove(tmp)


def not_finite(name, t):
    """'<name> holds N NaN and M Inf of its T values' when the tensor t holds values that are not numbers, else None."""
    if not (torch.is_tensor(t) and t.is_floating_point()) or torch.isfinite(t).all():
        return None
    return f"{name} holds {int(t.isnan().sum())} NaN and {int(t.isinf().sum())} Inf of its {t.numel()} values"


def unhealthy(net):
    """The first parameter or buffer that is non-finite or above DIVERGED, as text; None when all are fine."""
    for name, t in net.state_dict().items():
        if t.is_floating_point():
            problem = not_finite(name, t)
            if problem:
                return problem
            if t.abs().max() > DIVERGED:
                return f"{name} reached |w| = {t.abs().max().item():.3g} (> {DIVERGED:g})"
    return None


def save_checkpoint(cfg, net, opt, scaler, it, saved_it):
    """Checkpoint after `it` steps unless the model is unhealthy (then stop: exit 1). Returns `it`."""
    problem = unhealthy(net)
    if problem:
        exit_with_error(f"the model diverged by iteration {it}: {problem}; not saved. " + last_good(cfg, saved_it))
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "iter": it, "config": dataclasses.asdict(cfg)}
    try:
        atomic_save(state, os.path.join(cfg.out_dir, "last.pt"))
    except (OSError, RuntimeError) as e:
        exit_with_error(f"cannot write checkpoint {os.path.join(cfg.out_dir, 'last.pt')}: "
                        f"{error_message(e, 200)} (disk full?); {last_good(cfg, saved_it)}")
    return it


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path):
    """torch.load with weights_only (never unpickles code) of a regular file (a named pipe would block the read);
    every failure is one CheckpointError naming the file."""
    path = str(path)
    found = unreadable_reason(path)
    if found:
        raise CheckpointError(f"checkpoint {path}: {found}, expected a file written by train.py (runs/*/last.pt) "
                              "or the official ProtoSeg release")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), expected a file written by train.py "
                              "(runs/*/last.pt) or the official ProtoSeg release; it was cut off while written or "
                              "copied")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain containers "
                              f"({error_message(e, 160)}); it was not loaded, since unpickling could run code. Re-save "
                              "only "
                              "its state_dict with torch.save where you trust the file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {error_message(e, 160)}; the file is truncated or not a "
                              "PyTorch checkpoint") from None


def check_finite(state, path):
    """Refuse weights and buffers that are not numbers: the first NaN / Inf tensor of a state dict, named with the
    file, is one CheckpointError (such a model predicts garbage, and PCA or training on it fails further on)."""
    for name, t in state.items():
        problem = not_finite(name, t)
        if problem:
            raise CheckpointError(f"checkpoint {path}: {problem}, expected finite weights; the run that wrote it "
                                  "diverged or the file was damaged: use an earlier checkpoint")


HEAD_KEYS = ("head.prototypes", "head.classifier.weight", "head.queries")


def load_checkpoint(path):
    """{"model": state dict, "config": dict, ...} from a train.py checkpoint or an official ProtoSeg file
    (a dict whose `state_dict` holds the model, keys prefixed `module.` under DDP); adds "official": bool."""
    ckpt = read_checkpoint(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if isinstance(sd, dict):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if is_official(sd):
        check_finite(sd, path)                                 # named by the file's own keys
        model, cfg = official_to_project(sd)
        return {"model": model, "config": cfg, "official": True}
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)):
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} has {keys}; expected train.py's {{'model', 'config', ...}} or the "
                              "official ProtoSeg {'state_dict': {'prototypes', 'backbone.*', ...}}. For ImageNet "
                              "backbone weights use train.py --pretrained")
    _check_content(ckpt, path)
    check_finite(ckpt["model"], path)
    if not ckpt["config"].get("num_classes"):                  # a config without it: read it off the head
        head = {k: v for k, v in ckpt["model"].items() if k in HEAD_KEYS}
        ckpt["config"]["num_classes"] = next(iter(head.values())).shape[0]
    return {**ckpt, "official": False}


def _check_content(ckpt, path):
    """The right keys with nothing (or the wrong things) in them: one CheckpointError naming what is missing."""
    model, cfg = ckpt["model"], ckpt["config"]
    problem = ("its model holds no weights" if not model else
               "its model holds non-tensor values" if not all(torch.is_tensor(v) for v in model.values()) else
               f"its config lacks {[k for k in ('backbone', 'head') if not isinstance(cfg.get(k), str)]}"
               if not all(isinstance(cfg.get(k), str) for k in ("backbone", "head")) else
               "its model has no head (prototypes or classifier)" if not any(k in model for k in HEAD_KEYS) else None)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}, expected a model state dict and its settings as "
                              "train.py writes them (runs/*/last.pt); the file was written incompletely or by "
                              "another program")


def load_state(model, state, path):
    """model.load_state_dict(state), strict; a mismatch is one CheckpointError naming the file and the keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model it describes: "
                              f"{error_message(e)}") from None
    return model


def load_model(path, device="cpu", defaults=None):
    """(model in eval mode on device, config dict) from any checkpoint load_checkpoint reads."""
    ckpt = load_checkpoint(path)
    cfg = {**(defaults or {}), **ckpt["config"]}
    model = load_state(model_from_config(cfg), ckpt["model"], path)
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------- the official release


def is_official(sd):
    """The official ProtoSeg (openseg) layout: prototypes, backbone.*, cls_head.*, proj_head.* at top level."""
    return isinstance(sd, dict) and "prototypes" in sd and "cls_head.0.weight" in sd and \
        any(k.startswith("backbone.") for k in sd)


def official_to_project(sd):
    """Official state dict -> (this project's state dict, config). Renames the head's keys into ProtoSegHead's,
    drops proj_head.mlp2.* (aliases of proj_head.proj.*), and sets the switches the official model computes
    with: class and embedding LayerNorms, l2 over the width axis, BGR input (and, for training, only correct pixels
    moving the prototypes and per-rank statistics)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("proj_head.mlp2."):
            continue
        if k == "prototypes" or k.startswith(("feat_norm.", "mask_norm.")):
            out["head." + k] = v
        elif k.startswith(("cls_head.", "proj_head.")):
            out["head.trunk." + k] = v
        else:
            out[k] = v
    width = sd["backbone.stage2.0.branches.0.0.conv1.weight"].shape[0]
    deep = "backbone.layer1.3.conv1.weight" in sd
    backbone = {48: "hrnet48", 32: "hrnet32", 18: "hrnet18" if deep else "hrnet18_small_v2"}.get(width)
    if backbone is None:
        raise CheckpointError(f"official checkpoint with HRNet width {width}: expected 18, 32 or 48")
    C, K, _ = sd["prototypes"].shape
    cfg = dict(backbone=backbone, head="protoseg", num_classes=C, num_prototypes=K, class_layernorm="mask_norm.weight" in sd,
               embed_layernorm="feat_norm.weight" in sd, normalize_width=True, update_correct_only=True,
               channel_order="bgr", local_stats=True, kappa=0.05, sinkhorn_iters=3, proto_momentum=0.999, dropout=0.1, tau=1.0,
               dataset="cityscapes" if C == 19 else "folder")
    return out, cfg


# ----------------------------------------------------------------------------- ImageNet backbones


def _short(keys, n=5):
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def load_pretrained(backbone, path):
    """Load backbone weights strictly; returns a one-line summary of what was loaded, skipped and kept.

    Accepts a bare state dict or one wrapped in {"state_dict": ...} / {"model": ...}, keys prefixed by `module.`
    (DDP) and/or `backbone.` (ProtoSeg / SegModel checkpoints, whose non-backbone keys are then ignored).
    Skips only the checkpoint keys matching `backbone.skipped_keys` (pattern -> why: ImageNet classifiers, Swin's
    recomputed buffers); only keys matching `backbone.own_keys` (Swin's norm0-3) or `num_batches_tracked` may be
    missing, and keep their current values. Any other missing or unexpected key, any shape mismatch, or what
    `backbone.check_checkpoint` objects to (Swin: another window size), raises ValueError.
    """
    sd = read_checkpoint(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    skipped = {}  # reason -> keys
    if any(k.startswith("backbone.") for k in sd):
        skipped["not the backbone's"] = [k for k in sd if not k.startswith("backbone.")]
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    for pattern, why in getattr(backbone, "skipped_keys", {}).items():
        keys = [k for k in sd if fnmatch.fnmatchcase(k, pattern)]
        if keys:
            skipped[f"{pattern} ({why})"] = keys
            sd = {k: v for k, v in sd.items() if not fnmatch.fnmatchcase(k, pattern)}
    problem = backbone.check_checkpoint(sd) if hasattr(backbone, "check_checkpoint") else None
    if problem:
        raise ValueError(f"{path}: {problem}")
    check_finite(sd, path)
    own = backbone.state_dict()
    own_only = getattr(backbone, "own_keys", {})
    kept = [k for k in own if k not in sd and any(fnmatch.fnmatchcase(k, p) for p in own_only)]
    for k, v in own.items():
        if k not in sd and (k in kept or k.endswith("num_batches_tracked")):
            sd[k] = v
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not match {type(backbone).__name__}: missing {_short(missing)}; "
                         f"unexpected {_short(unexpected)}; shape mismatches {_short(shapes, 3)}")
    backbone.load_state_dict(sd, strict=True)
    ignored = [k for keys in skipped.values() for k in keys]
    groups = sorted({k.split(".")[0] for k in ignored})
    why = "".join(f"; {len(keys)} {reason}" for reason, keys in skipped.items())
    kept_msg = "".join(f"; kept the init of {n} keys {p} ({r})" for p, r in own_only.items()
                       if (n := sum(fnmatch.fnmatchcase(k, p) for k in kept)))
    return (f"loaded {len(own) - len(kept)} tensors from {path}; ignored {len(ignored)} unused keys {groups}"
            f"{why}{kept_msg}")
