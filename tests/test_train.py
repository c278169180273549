"""Tests of train.py: command line end to end, exact resume, 2-rank gloo == 1 rank, NaN stop, presets and flags,
the optimiser's groups, dropout masks, the settings a resume may not change."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import models
import protoseg
import runs
import settings
import train
from conftest import TINY, free_port, save_image, state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=k)


def test_command_line_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "train.py", *TINY, "--iters", "2", "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "val mIoU" in out.stdout and "prototype purity" in out.stdout and "it 2/2" in out.stdout
    assert (tmp_path / "last.pt").exists() and (tmp_path / "metrics.json").exists()
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 2] and "final" in rows[2]       # 2 steps, then the final metrics
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text                                                    # strict JSON (NaN -> null)
    m = json.loads(text)
    assert set(m["classes"]) == {"background", "alpha", "beta", "gamma", "delta"} and 0 <= m["miou"] <= 1
    assert {"iou", "acc", "purity", "prototypes_in_use"} <= set(m["classes"]["alpha"]) and "macc" in m
    assert json.loads((tmp_path / "config.json").read_text())["iters"] == 2
    assert out.stdout.startswith("settings (all in") and f"wrote {tmp_path / 'curves.png'}" in out.stdout
    ckpt = state(tmp_path / "last.pt")
    assert ckpt["iter"] == 2 and ckpt["config"]["backbone"] == "hrnet_tiny"
    assert ckpt["model"]["head.prototypes"].shape == (5, 3, 120)   # D = 8+16+32+64


def test_help_lists_every_setting_with_its_help_text_and_the_presets_default():
    out = subprocess.run([sys.executable, "train.py", "--dataset", "cityscapes", "--backbone", "mit_b0", "--help"],
                         cwd=ROOT, capture_output=True, text=True)
    text = " ".join(out.stdout.split())
    chosen = settings.preset("cityscapes", "mit_b0")
    assert out.returncode == 0 and chosen["pipeline"] == "mmseg" and chosen["lr"] == 6e-5   # a recipe over a preset
    for f in dataclasses.fields(settings.Config):
        flag = "--" + f.name.replace("_", "-")
        value = chosen.get(f.name, f.default)
        where = " for cityscapes" if f.name in chosen else ""
        about = " ".join(f.metadata["help"].split())
        assert re.search(rf"^  {flag}[ ,\n]", out.stdout, re.M) and f"{about} (default{where}: {value})" in text, f.name


def test_presets_and_overrides():
    cfg, given = settings.parse_args(["--dataset", "Cityscapes", "--iters", "5"])
    assert given == {"dataset", "iters"}
    assert (cfg.backbone, cfg.crop, cfg.batch_size, cfg.lr, cfg.iters) == ("hrnet48", (512, 1024), 8, 0.01, 5)
    assert cfg.class_weights == "cityscapes" and cfg.weight_decay == 5e-4 and cfg.scale == (0.5, 2.0)


def test_proto_momentum_warmup_schedule_values():
    at = protoseg.momentum_at
    assert [at(it, 0.999, 0) for it in (0, 5)] == [0.999, 0.999]               # no warm-up: today's mu
    assert at(0, 0.999, 100) == protoseg.MU_START == 0.9
    assert at(50, 0.999, 100) == pytest.approx(0.9495) and at(99, 0.999, 100) == pytest.approx(0.99801)
    assert at(100, 0.999, 100) == at(500, 0.999, 100) == 0.999
    assert at(3, 0.5, 100) == 0.5                                              # a final mu below the start: no ramp


def test_warmup_passes_each_steps_momentum_to_the_eq14_update(tmp_path, monkeypatch):
    seen, real = [], train.update_prototypes
    monkeypatch.setattr(train, "update_prototypes", lambda *a: seen.append(a[3]) or real(*a))
    train.main(TINY + ["--iters", "3", "--proto-momentum-warmup", "2", "--out-dir", str(tmp_path)])
    assert seen == pytest.approx([0.9, 0.9495, 0.999])


def test_proto_init_data_sets_prototypes_from_first_batch_clustering(tmp_path, monkeypatch):
    """With mu = 1 (Eq. 14 moves nothing) last.pt holds the start: the random one, or the clustering's."""
    args = TINY + ["--iters", "1", "--proto-momentum", "1.0", "--val-size", "1"]
    calls, real = [], protoseg.cluster_prototypes
    monkeypatch.setattr(protoseg, "cluster_prototypes", lambda *a, **k: calls.append([x.clone() for x in a[:3]]) or real(*a, **k))
    train.main(args + ["--out-dir", str(tmp_path / "random")])
    assert not calls
    train.main(args + ["--out-dir", str(tmp_path / "data"), "--proto-init", "data"])
    (start, embed, labels), = calls
    a = state(tmp_path / "random" / "last.pt")["model"]["head.prototypes"]
    b = state(tmp_path / "data" / "last.pt")["model"]["head.prototypes"]
    torch.testing.assert_close(start, a)                                       # clustering began at the random start
    torch.testing.assert_close(embed.norm(dim=-1), torch.ones(len(embed)))     # unit embeddings of labelled pixels
    assert len(labels) > 0 and (labels >= 0).all()                            # the batch's labelled pixels
    present = torch.bincount(labels, minlength=5) > 0
    assert present.sum() >= 2 and not present.all()                           # fixture: several classes, not all
    assert ((a - b).abs().amax((1, 2)) > 0).tolist() == present.tolist()       # absent classes keep their start


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    args = TINY + ["--iters", "4", "--ckpt-every", "2"]
    train.main(args + ["--out-dir", str(tmp_path / "full")])

    real_log_row = runs.log_row
    def interrupted_log(f, row):                               # the run dies after logging iteration 3
        real_log_row(f, row)
        if row.get("iter") == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "log_row", interrupted_log)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out-dir", str(tmp_path / "cut")])
    monkeypatch.setattr(runs, "log_row", real_log_row)
    assert state(tmp_path / "cut" / "last.pt")["iter"] == 2
    assert not (tmp_path / "cut" / "run.lock").exists()                        # released on the way out
    train.main(args + ["--out-dir", str(tmp_path / "cut"), "--resume", "auto"])
    a, b = state(tmp_path / "full" / "last.pt"), state(tmp_path / "cut" / "last.pt")
    assert b["iter"] == 4
    assert_same_state(a["model"], b["model"])                  # weights AND prototypes, bit for bit
    rows = [json.loads(r)["iter"] for r in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 4]                             # iteration 3's first row dropped on resume


def test_nan_loss_stops_with_checkpoint_intact(tmp_path, monkeypatch, capsys):
    train.main(TINY + ["--iters", "2", "--ckpt-every", "2", "--out-dir", str(tmp_path)])
    before = (tmp_path / "last.pt").read_bytes()
    real_loss = train.seg_loss
    monkeypatch.setattr(train, "seg_loss", lambda *a, **k: (lambda l, t: (l * float("nan"), t))(*real_loss(*a, **k)))
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--iters", "4", "--ckpt-every", "2", "--out-dir", str(tmp_path), "--resume", "auto",
                           "--allow-changes"])
    assert e.value.code == 1
    assert "non-finite loss at iteration 3" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == before


def test_incompatible_checkpoint_says_what_differs(tmp_path, capsys):
    train.main(TINY + ["--iters", "1", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        train.main(TINY + ["--head", "softmax", "--eval-only", "--resume", str(tmp_path / "last.pt")])
    assert "head: checkpoint 'protoseg' vs now 'softmax'" in capsys.readouterr().err


def _rank(rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.main(args)


def test_ddp_two_ranks_equal_one_rank(tmp_path):
    # same global batch of 4: frozen BN and no dropout, so per-rank statistics cannot differ (CPU has no SyncBN);
    # K = 1 because untrained embeddings make Sinkhorn's split of a class a near-tie that float summation order
    # can flip (the 2-rank Sinkhorn itself is checked in test_protoseg.py)
    args = TINY + ["--num-prototypes", "1", "--iters", "2", "--freeze-bn", "--dropout", "0", "--scale", "1", "1", "--crop", "160", "160",
                   "--proto-momentum", "0.5", "--optimizer", "sgd"]
    train.main(args + ["--out-dir", str(tmp_path / "one")])
    mp.spawn(_rank, args=(2, free_port(), args + ["--out-dir", str(tmp_path / "two")]), nprocs=2)
    a, b = state(tmp_path / "one" / "last.pt"), state(tmp_path / "two" / "last.pt")
    assert_same_state(a["model"], b["model"], atol=1e-4)            # summation order only (--local-stats: 0.045)


# ----------------------------------------------------------------------------- bad input: flags, run dirs, resume

@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--ckpt-every", "0"], ["--crop", "1", "2", "3"],
                                   ["--optimizer", "adam"], ["--lr", "-1"], ["--iters", "x"], ["--eval-only"]])
def test_bad_flags_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit) as e:
        settings.parse_args(flags)
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: ")          # like every user error


def test_flags_are_case_insensitive_and_crop_n_is_square():
    cfg, _ = settings.parse_args(["--dataset", "cityscapes", "--optimizer", "SGD", "--class-weights", "Cityscapes", "--crop", "32",
                               "--eval-crop", "48"])
    assert (cfg.optimizer, cfg.class_weights, cfg.crop, cfg.eval_crop) == ("sgd", "cityscapes", (32, 32), (48, 48))


def test_help_shows_the_chosen_presets_values():
    out = subprocess.run([sys.executable, "train.py", "--dataset", "cityscapes", "--help"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "(default for cityscapes: hrnet48)" in " ".join(out.split()) and "lambda_1 of Eq. 13" in out


def test_resume_refuses_settings_that_change_the_trajectory(tmp_path, capsys):
    args = TINY + ["--iters", "2", "--ckpt-every", "1", "--out-dir", str(tmp_path)]
    train.main(TINY + ["--iters", "1", "--ckpt-every", "1", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        train.main(args + ["--resume", "auto", "--lr", "0.5", "--optimizer", "sgd"])
    err = capsys.readouterr().err
    assert "iters: checkpoint 1 vs now 2" in err and "lr: checkpoint 0.003 vs now 0.5" in err
    assert "optimizer: checkpoint 'adamw' vs now 'sgd'" in err and "--allow-changes" in err
    train.main(args + ["--resume", "auto", "--allow-changes"])    # a longer schedule, knowingly
    assert state(tmp_path / "last.pt")["iter"] == 2


def test_transformer_backbones_take_the_published_recipe():
    cfg, _ = settings.parse_args(["--dataset", "ade20k", "--backbone", "mit_b0"])
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.warmup_iters, cfg.head_lr_mult, cfg.lr_power) == \
        ("adamw", 6e-5, 0.01, 1500, 10.0, 1.0)
    assert (cfg.iters, cfg.batch_size, cfg.crop) == (160000, 16, (512, 512))
    assert train.learning_rate(cfg, 0) == pytest.approx(6e-5 * 1e-6)                    # linear warm-up from 1e-6
    assert train.learning_rate(cfg, 750) == pytest.approx(6e-5 * (1 - 750 / 160000) * (1 - 0.5 * (1 - 1e-6)))
    assert train.learning_rate(cfg, 1500) == pytest.approx(6e-5 * (1 - 1500 / 160000))  # then poly, power 1
    cfg = dataclasses.replace(cfg, num_classes=150)
    net = models.model_from_config(cfg)
    opt = train.make_optimizer(cfg, net)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in net.named_parameters():
        g = group[id(p)]
        assert g["lr_mult"] == (10.0 if name.startswith(("neck.", "head.")) else 1.0), name
        assert g["weight_decay"] == (0.0 if "norm" in name and name.startswith("backbone.") else 0.01), name
    cfg, _ = settings.parse_args(["--dataset", "ade20k", "--backbone", "swin_tiny"])
    assert (cfg.aux_loss_weight, cfg.head_lr_mult, cfg.warmup_iters) == (0.4, 1.0, 1500)
    cfg, _ = settings.parse_args(["--dataset", "synthetic", "--backbone", "mit_b0"])   # no published recipe: the preset
    assert (cfg.lr, cfg.warmup_iters, cfg.iters) == (3e-3, 0, 700)


def test_bad_data_is_one_line_before_training(tmp_path):
    for split in ("train", "val"):
        for i in range(3):
            save_image(tmp_path / "images" / split / f"{i}.png", np.zeros((32, 32, 3)))
            size = (32, 30) if (split, i) == ("val", 2) else (32, 32)             # one val mask of the wrong size
            save_image(tmp_path / "masks" / split / f"{i}.png", np.zeros(size))
    out = subprocess.run([sys.executable, "train.py", "--dataset", "folder", "--data-root", str(tmp_path),
                          "--num-classes", "2", "--out-dir", str(tmp_path / "run"), "--workers", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr
    assert "2.png" in lines[0] and "it 1/" not in out.stdout                   # found before the first step


# ----------------------------------------------------------------------------- optimiser groups, dropout

def no_decay_by_module(net):
    """The CNN recipe's rule stated by module: every parameter of a norm layer and every bias has no weight decay."""
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    names = set()
    for mname, m in net.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            if isinstance(m, norms) or pname == "bias":
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


# (dataset preset, backbone, head, flags): the CNN presets whose recipe keeps norms and biases out of weight decay
CNN_GROUPS = [("synthetic", "hrnet_tiny", "protoseg", dict(embed_layernorm=True)),
              ("cityscapes", "hrnet_tiny", "protoseg", {}), ("ade20k", "resnet18", "softmax", {}),
              ("ade20k", "resnet18", "softmax", dict(norm_decay=False))]


@pytest.mark.parametrize("dataset, backbone, head, flags", CNN_GROUPS)
def test_cnn_optimizer_decays_norms_and_biases_only_where_the_preset_says(dataset, backbone, head, flags):
    """norm_decay False (synthetic): no weight decay on norms and biases; the HRNet presets of the real datasets
    decay every parameter (norm_decay True), as the official optimisers (openseg, mmseg)."""
    cfg = settings.Config(**{**settings.preset(dataset, backbone), "dataset": dataset, "backbone": backbone,
                          "head": head, "num_classes": 5, "weight_decay": 1e-4, **flags})
    net = models.model_from_config(cfg)
    opt = train.make_optimizer(cfg, net)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(net.named_parameters())
    assert len(decay_of) == len(params)                                          # every parameter, once
    free = set() if cfg.norm_decay else no_decay_by_module(net)
    assert cfg.norm_decay == flags.get("norm_decay", dataset != "synthetic")
    assert cfg.norm_decay or 0 < len(free) < len(params)
    for name, p in params.items():
        assert decay_of[id(p)] == (0.0 if name in free else cfg.weight_decay), name


def test_dropout_masks_change_from_iteration_to_iteration(tmp_path, monkeypatch):
    """train.py reseeds from (seed, rank, iteration) before each forward: the head's Dropout2d keeps other channels at
    every step (a reseed by the seed alone would repeat one mask; exact resume: test_resumed_run_equals_...)."""
    masks, real_make_optimizer = [], train.make_optimizer

    def record(module, inputs, output):
        if module.training:                                                      # not the final evaluation
            live = (inputs[0] != 0).flatten(2).any(2)                              # (B, C) channel not all zero
            masks.append(((output != 0).flatten(2).any(2), live))                  # (kept, live)

    def make_optimizer(cfg, raw_model):                                          # called once, before the loop
        for m in raw_model.modules():
            if isinstance(m, torch.nn.Dropout2d):
                m.register_forward_hook(record)
        return real_make_optimizer(cfg, raw_model)

    monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    train.main(TINY + ["--iters", "3", "--dropout", "0.5", "--out-dir", str(tmp_path)])
    assert len(masks) == 3 and all((live & ~kept).any() for kept, live in masks)   # live channels were dropped
    for (k0, l0), (k1, l1) in zip(masks, masks[1:]):                                # another mask next iteration
        assert ((k0 != k1) & l0 & l1).any()


# ----------------------------------------------------------------------------- trajectory settings on resume

# Config fields that do not change the training trajectory (where the files are, logging, evaluation, this command)
NOT_TRAJECTORY = {"data_root", "pretrained", "out_dir", "workers", "log_every", "eval_every", "ckpt_every",
                  "eval_crop", "eval_scales", "eval_flip", "eval_stride", "eval_resize", "eval_divisor", "val_size", "resume", "eval_only", "overwrite",
                  "allow_changes"}


def test_every_setting_is_classified_as_trajectory_model_or_neither():
    fields = {f.name for f in dataclasses.fields(settings.Config)}
    traj, model = set(settings.TRAJECTORY), set(settings.MODEL)
    assert not traj & model and not (traj | model) & NOT_TRAJECTORY
    assert fields == traj | model | NOT_TRAJECTORY, sorted(fields ^ (traj | model | NOT_TRAJECTORY))


def another(name, value):
    """A different valid-looking value of a setting."""
    choices = settings.CHOICES.get(name)
    if choices:
        return next(c for c in choices if c != value)
    if value is None or isinstance(value, bool):
        return not value
    if isinstance(value, tuple):
        return tuple(v * 2 + 1 for v in value)
    return value * 2 + 1


def test_resume_refuses_a_change_of_every_trajectory_and_model_setting(tmp_path, capsys):
    saved = {**dataclasses.asdict(settings.Config()), "num_classes": 5}
    path = tmp_path / "last.pt"
    torch.save({"model": models.model_from_config(saved).state_dict(), "config": saved, "iter": 1}, path)
    for name in settings.TRAJECTORY + settings.MODEL:
        cfg = dataclasses.replace(settings.Config(**{k: v for k, v in saved.items()}), resume=str(path))
        cfg = dataclasses.replace(cfg, **{name: another(name, saved[name])})
        with pytest.raises(SystemExit):
            settings.resolve(cfg, {name})
        assert f"{name}: checkpoint {saved[name]!r} vs now" in capsys.readouterr().err, name
    same = dataclasses.replace(settings.Config(**saved), resume=str(path))
    assert settings.resolve(same, {"dataset", "iters", "lr", "seed", "crop"})[0].num_classes == 5      # unchanged values pass
