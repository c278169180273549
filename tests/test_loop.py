"""Tests of the training loop's wiring: every setting train.py reads changes a training step as it should.

The runs are train.main on a tiny HRNet for 1-3 iterations, with spies on what the loop calls (the optimiser's
step, seg_loss, update_prototypes, data_prototypes, the forward, evaluate, save_checkpoint, autocast, the data
loaders) that keep what each call saw. Each test compares that with a direct transcription: the poly / warm-up lr
of each iteration, each parameter's lr and weight decay, the SGD and AdamW updates, Eq. 13's terms with their
weights (in value and gradient), Eq. 14 with the mu of the iteration, the sampler's batches through the transform
the settings name, the dropout mask drawn from (seed, iteration), the train / eval mode of every module in each
pass. The settings take values where a wrong formula, a swap of two settings or the wrong iteration gives another
number. COVERAGE (at the end) names the test of every Config field: a new setting without a test fails there.
"""
import dataclasses
import functools
import inspect
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import collectives
import data
import evaluate
import models
import protoseg
import settings
import swin
import train
from conftest import TINY, save_image, state
from labels import IGNORE_INDEX

HERE = os.path.dirname(os.path.abspath(__file__))


def flags(**settings_):
    """--name value ... of settings given as keywords (a tuple: its values; True / False: --name / --no-name)."""
    out = []
    for name, value in settings_.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            out += [flag, *map(str, value if isinstance(value, tuple) else (value,))]
    return out


# ----------------------------------------------------------------------------- transcriptions

def lr_at(it, s):
    """Poly, lr (1 - it / iters)^power, times a linear warm-up 1 - (1 - it / warmup)(1 - 1e-6) while it < warmup."""
    lr = s["lr"] * (1 - it / s["iters"]) ** s["lr_power"]
    return lr * (1 - (1 - it / s["warmup_iters"]) * (1 - 1e-6)) if it < s["warmup_iters"] else lr


def mu_at(it, s):
    """mu of Eq. 14 at iteration it: 0.9 rising linearly to proto_momentum over proto_momentum_warmup iterations."""
    final, warmup = s["proto_momentum"], s["proto_momentum_warmup"]
    return final if it >= warmup else 0.9 + (final - 0.9) * it / warmup


def is_head(name):
    return name.startswith(("neck.", "head."))


def decays(name, p, s):
    """The CNN rule: weight decay on tensors of 2+ dimensions; on norms and biases too with norm_decay."""
    return p.ndim > 1 or s["norm_decay"]


def eq14(protos, embed, target, mu):
    """Eq. 14 prototype by prototype: p_ck <- normalise(mu p_ck + (1 - mu) normalise(mean of the embeddings of the
    pixels whose target is c*K + k)); a prototype without pixels is unchanged. embed (B, D, h, w), target (B, h, w)."""
    C, K, D = protos.shape
    e, t = embed.permute(0, 2, 3, 1).reshape(-1, D).double(), target.flatten()
    new = protos.double().clone()
    for j in t[t >= 0].unique().tolist():
        c, k = divmod(j, K)
        mean = F.normalize(e[t == j].mean(0), dim=0)
        new[c, k] = F.normalize(mu * new[c, k] + (1 - mu) * mean, dim=0)
    return new.float()


def transcribed_terms(out, labels, tau, class_weight):
    """Eq. 7 (CE, class-weighted mean over the labelled pixels), Eq. 11 with temperature tau and Eq. 12 by
    F.cross_entropy and protoseg's slow transcriptions (not the loop's fused code), and the aux head's CE."""
    terms = {"ce": F.cross_entropy(out["scores"].float(), labels, weight=class_weight, ignore_index=IGNORE_INDEX)}
    if "proto_sim" in out:
        terms["ppc"] = protoseg.ppc_loss(out["proto_sim"], out["proto_target"], tau)
        terms["ppd"] = protoseg.ppd_loss(out["proto_sim"], out["proto_target"])
    if "aux_scores" in out:
        terms["aux"] = F.cross_entropy(out["aux_scores"].float(), labels, ignore_index=IGNORE_INDEX)
    return terms


def sampler_batches(ds, batch, epoch=0):
    """DistributedSampler's order for one rank (torch.randperm seeded with seed + epoch), cut into batches."""
    ds.set_epoch(epoch)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(ds.seed + epoch)).tolist()
    for i in range(0, len(order) - batch + 1, batch):
        items = [ds[j] for j in order[i:i + batch]]
        yield torch.stack([x["image"] for x in items]), torch.stack([x["label"] for x in items])


def relative_error(got, expected):
    got, expected = torch.cat([g.flatten() for g in got]), torch.cat([e.flatten() for e in expected])
    return ((got - expected).norm() / expected.norm()).item()


# ----------------------------------------------------------------------------- spies

@dataclasses.dataclass
class Step:
    """One optimiser step as the optimiser saw it; parameters by name (all of them, or only the watched ones)."""
    it: int
    groups: dict        # name -> its group's settings (lr, weight_decay, momentum / betas, lr_mult, ...)
    before: dict        # name -> value before the step
    grads: dict
    after: dict


class Spies:
    """Wraps what train.py calls and keeps what each call saw, with `it` = the iterations done when it came
    (progress["done"]). tau and class_weight: the transcription's (the loss terms' gradients on the head's
    parameters are computed with them before the loop's backward). keep_params: every parameter at each step, else
    only the watched ones (the head's and the auxiliary head's). stop_at: the forward of that iteration raises
    KeyboardInterrupt (a run stopped there)."""

    def __init__(self, mp, tau=0.1, class_weight=None, keep_params=True):
        self.tau, self.class_weight, self.keep_params = tau, class_weight, keep_params
        self.progress, self.phase, self.stop_at = {}, None, None
        self.models, self.opts, self.starts, self.steps, self.forwards, self.losses = [], [], [], [], [], []
        self.updates, self.inits, self.saves, self.evals, self.passes, self.masks = [], [], [], [], [], []
        self.amp, self.scalers, self.workers, self.predicts = [], [], [], []
        real = {name: getattr(train, name) for name in ("make_optimizer", "forward", "seg_loss", "update_prototypes",
                                                        "data_prototypes", "save_checkpoint", "evaluate", "autocast")}
        self.real = real
        for name in real:
            mp.setattr(train, name, getattr(self, name))
        mp.setattr(evaluate, "autocast", lambda amp, device: self.amp.append(("eval", amp)) or real["autocast"](amp, device))
        real_predict = evaluate.predict_scores
        mp.setattr(evaluate, "predict_scores", lambda *a, **k: self.predicts.append(
            (tuple(a[1].shape), inspect.signature(real_predict).bind(*a, **k).arguments)) or real_predict(*a, **k))
        real_scaler = torch.amp.GradScaler
        mp.setattr(torch.amp, "GradScaler", lambda *a, **k: self.scalers.append(k.get("enabled")) or real_scaler(*a, **k))
        spies = self

        class Loader(torch.utils.data.DataLoader):
            def __init__(self, *a, **k):
                spies.workers.append(k.get("num_workers", 0))
                super().__init__(*a, **k)
        mp.setattr(torch.utils.data, "DataLoader", Loader)

    @property
    def it(self):
        return self.progress.get("done", 0)

    def run(self, argv):
        return train.main(argv, self.progress)

    def make_optimizer(self, cfg, raw_model):
        opt = self.real["make_optimizer"](cfg, raw_model)
        self.models.append(raw_model)
        self.opts.append(opt)
        self.starts.append({k: v.clone() for k, v in raw_model.state_dict().items()})
        names = {id(p): n for n, p in raw_model.named_parameters()}
        real_step = opt.step

        def step(*a, **k):
            kept = {n: p for n, p in raw_model.named_parameters() if self.keep_params or n in self.watched}
            groups = {names[id(p)]: {key: v for key, v in g.items() if key != "params"}
                      for g in opt.param_groups for p in g["params"]}
            before = {n: p.detach().clone() for n, p in kept.items()}
            grads = {n: p.grad.clone() for n, p in kept.items() if p.grad is not None}
            result = real_step(*a, **k)
            self.steps.append(Step(self.it, groups, before, grads, {n: p.detach().clone() for n, p in kept.items()}))
            return result
        opt.step = step
        raw_model.backbone.register_forward_pre_hook(lambda m, inputs: self.passes.append(
            (self.phase, self.it, {n: s.training for n, s in raw_model.named_modules()})))
        trunk = getattr(raw_model.head, "trunk", None)
        if trunk is not None:
            trunk.cls_head[2].register_forward_hook(self.record_mask)
        self.watched = [n for n, _ in raw_model.named_parameters() if n.startswith(("head.", "neck.aux_head."))]
        return opt

    def record_mask(self, module, inputs, output):
        if self.phase == "train":
            live = inputs[0].flatten(2).ne(0).any(2)                       # (B, C) channel not all zero
            self.masks.append((self.it, module.p, output.flatten(2).ne(0).any(2), live))

    def forward(self, model, images, labels, cfg):
        if self.it == self.stop_at:
            raise KeyboardInterrupt
        head = getattr(model, "module", model).head
        protos = head.prototypes.clone() if hasattr(head, "prototypes") else None
        self.phase = "train"
        out = self.real["forward"](model, images, labels, cfg)
        self.phase = None
        self.forwards.append(dict(it=self.it, images=images.clone(), labels=labels.clone(), protos=protos,
                                  out={k: v.detach().clone() for k, v in out.items()}))
        return out

    def seg_loss(self, out, labels, *a, **k):
        args = inspect.signature(self.real["seg_loss"]).bind(out, labels, *a, **k)
        args.apply_defaults()
        params = dict(self.models[-1].named_parameters())
        terms = transcribed_terms(out, labels, self.tau, self.class_weight)
        grads = {}
        for name, term in terms.items():
            g = torch.autograd.grad(term, [params[n] for n in self.watched], retain_graph=True, allow_unused=True)
            grads[name] = [torch.zeros_like(params[n]) if x is None else x for n, x in zip(self.watched, g)]
        total, got = self.real["seg_loss"](out, labels, *a, **k)
        self.losses.append(dict(it=self.it, args={k: v for k, v in args.arguments.items() if k not in ("out", "labels")},
                                total=total.item(), terms={k: v.item() for k, v in got.items()},
                                expected={k: v.item() for k, v in terms.items()}, grads=grads))
        return total, got

    def update_prototypes(self, *a, **k):
        args = inspect.signature(self.real["update_prototypes"]).bind(*a, **k)
        args.apply_defaults()
        new = self.real["update_prototypes"](*a, **k)
        self.updates.append(dict(it=self.it, args=dict(args.arguments), new=new.clone()))
        return new

    def data_prototypes(self, *a, **k):
        args = inspect.signature(self.real["data_prototypes"]).bind(*a, **k)
        args.apply_defaults()
        self.phase = "init"
        new = self.real["data_prototypes"](*a, **k)
        self.phase = None
        self.inits.append(dict(it=self.it, args=dict(args.arguments), new=new.clone()))
        return new

    def save_checkpoint(self, cfg, net, opt, scaler, it, saved_it):
        self.saves.append(it)
        return self.real["save_checkpoint"](cfg, net, opt, scaler, it, saved_it)

    def evaluate(self, model, dataset, cfg, log=print):
        self.evals.append(self.it)
        self.phase = "eval"
        try:
            return self.real["evaluate"](model, dataset, cfg, log)
        finally:
            self.phase = None

    def autocast(self, amp, device):
        self.amp.append(("train", amp))
        return self.real["autocast"](amp, device)

    def at(self, records, it):
        found = [r for r in records if (r["it"] if isinstance(r, dict) else r.it) == it]
        assert len(found) == 1, (it, len(found))
        return found[0]


# ----------------------------------------------------------------------------- the runs

# SGD, prototypes initialised from data, a warm-up of lr and of mu. The run stops before iteration 3 (after the
# checkpoint of iteration 2) and resumes: iterations 0, 1 fresh and 2 resumed, all inside both warm-ups. One process:
# local_stats changes no number, only what the loop passes on.
SGD = dict(iters=3, optimizer="sgd", lr=0.02, lr_power=2.0, warmup_iters=3, head_lr_mult=3.0, momentum=0.8,
           weight_decay=0.01, norm_decay=False, lambda_ppc=0.3, lambda_ppd=0.7, tau=0.5, kappa=0.2, sinkhorn_iters=5,
           proto_momentum=0.95, proto_momentum_warmup=4, proto_init="data", dropout=0.3, seed=3, crop=(32, 48),
           batch_size=3, scale=(0.75, 1.25), flip=False, channel_order="bgr", amp="fp16", ckpt_every=2, log_every=3,
           eval_every=1, val_size=1, eval_resize=(48, 48), local_stats=True, update_correct_only=False)
# AdamW with decay on every parameter, frozen BatchNorm and the official departures; 2 iterations, an evaluation
# between them with every test-time setting.
ADAMW = dict(iters=2, optimizer="adamw", lr=0.004, lr_power=1.5, warmup_iters=0, head_lr_mult=2.0, weight_decay=0.05,
             norm_decay=True, freeze_bn=True, local_stats=False, update_correct_only=True, class_layernorm=False,
             embed_layernorm=True, normalize_width=True, proto_momentum=0.8, proto_momentum_warmup=0,
             num_prototypes=2, crop=(32, 32), batch_size=2, eval_every=1, eval_crop=(24, 24), eval_stride=(8, 16),
             eval_scales=(1.0, 0.5), eval_flip=True, eval_resize=(40, 30), eval_divisor=16, val_size=1,
             lambda_ppc=0.01, lambda_ppd=0.001, tau=0.1)


@pytest.fixture(scope="module")
def sgd(tmp_path_factory):
    out = tmp_path_factory.mktemp("sgd")
    args = TINY + flags(**SGD) + ["--out-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        spies = Spies(mp, tau=SGD["tau"])
        spies.stop_at = 2
        with pytest.raises(KeyboardInterrupt):
            spies.run(args)
        spies.stop_at = None
        spies.run(args + ["--resume", "auto"])
    return spies, out


@pytest.fixture(scope="module")
def adamw(tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw")
    with pytest.MonkeyPatch.context() as mp:
        spies = Spies(mp, tau=ADAMW["tau"])
        spies.run(TINY + flags(**ADAMW) + ["--out-dir", str(out)])
    return spies, out


RUNS = {"sgd": SGD, "adamw": ADAMW}


# ----------------------------------------------------------------------------- the optimiser

def test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed(sgd, adamw):
    for (spies, _), s in ((sgd, SGD), (adamw, ADAMW)):
        assert [step.it for step in spies.steps] == list(range(s["iters"]))       # iters steps, resumed included
        for step in spies.steps:
            assert step.groups["backbone.conv1.weight"]["lr"] == pytest.approx(lr_at(step.it, s), rel=1e-12), step.it
    # fixture: these settings tell the formula from its likely slips
    slips = {"it + 1": lambda it: lr_at(it + 1, SGD),
             "power inverted": lambda it: lr_at(it, dict(SGD, lr_power=1 / SGD["lr_power"])),
             "no warm-up": lambda it: lr_at(it, dict(SGD, warmup_iters=0)),
             "warm-up from 0": lambda it: lr_at(it, dict(SGD, warmup_iters=0)) * it / SGD["warmup_iters"]}
    right = [lr_at(it, SGD) for it in range(3)]
    for name, slip in slips.items():
        assert [slip(it) for it in range(3)] != pytest.approx(right, rel=1e-9), name


@pytest.mark.parametrize("run", ["sgd", "adamw"])
def test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay(run, request):
    spies, _ = request.getfixturevalue(run)
    s = RUNS[run]
    params = dict(spies.models[0].named_parameters())
    assert {is_head(n) for n in params} == {True, False}
    assert {decays(n, p, s) for n, p in params.items()} == ({True} if s["norm_decay"] else {True, False})
    for step in spies.steps:
        assert step.groups.keys() == params.keys()                                  # every parameter, once
        for name, g in step.groups.items():
            mult = s["head_lr_mult"] if is_head(name) else 1.0
            assert g["lr"] == pytest.approx(lr_at(step.it, s) * mult, rel=1e-12), (step.it, name)
            assert g["weight_decay"] == (s["weight_decay"] if decays(name, params[name], s) else 0.0), name


def test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume(sgd):
    """p <- p - lr b, b <- momentum b + (g + wd p) (b = g + wd p at the first step); the resumed step continues
    the checkpoint's buffers."""
    spies, _ = sgd
    assert [type(opt) for opt in spies.opts] == [torch.optim.SGD] * 2               # the fresh and the resumed run
    buf = {}
    for prev, step in zip([None] + spies.steps, spies.steps):
        if prev is not None:
            for n in step.before:                                                   # the resumed run starts here
                torch.testing.assert_close(step.before[n], prev.after[n], rtol=0, atol=0)
        for n, p in step.before.items():
            g = step.groups[n]
            assert g["momentum"] == SGD["momentum"] and not g["nesterov"] and g["dampening"] == 0
            d = step.grads[n] + g["weight_decay"] * p
            buf[n] = d if n not in buf else SGD["momentum"] * buf[n] + d
            torch.testing.assert_close(step.after[n], p - g["lr"] * buf[n], rtol=1e-5, atol=1e-7, msg=(step.it, n))


def test_adamw_update_is_decoupled_decay_then_adam_with_torchs_betas(adamw):
    """p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + 1e-8), m, v: running means of g and g^2 (betas 0.9, 0.999),
    bias-corrected."""
    spies, _ = adamw
    m, v = {}, {}
    for t, step in enumerate(spies.steps, 1):
        for n, p in step.before.items():
            g, grad = step.groups[n], step.grads[n]
            assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and not g["amsgrad"]
            m[n] = 0.9 * m.get(n, 0) + 0.1 * grad
            v[n] = 0.999 * v.get(n, 0) + 0.001 * grad * grad
            update = (m[n] / (1 - 0.9 ** t)) / ((v[n] / (1 - 0.999 ** t)).sqrt() + 1e-8)
            expected = p * (1 - g["lr"] * g["weight_decay"]) - g["lr"] * update
            torch.testing.assert_close(step.after[n], expected, rtol=1e-5, atol=1e-4 * g["lr"], msg=(t, n))


# ----------------------------------------------------------------------------- the loss

def test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau(sgd, adamw):
    """Eq. 13 in value (each term with this tau, the total with these lambdas) and in gradient: the head's
    gradient at the optimiser step is that of ce + lambda_ppc ppc + lambda_ppd ppd."""
    for (spies, _), s in ((sgd, SGD), (adamw, ADAMW)):
        weights = {"ce": 1.0, "ppc": s["lambda_ppc"], "ppd": s["lambda_ppd"]}
        assert [loss["it"] for loss in spies.losses] == list(range(s["iters"]))
        for loss in spies.losses:
            args = loss["args"]
            assert (args["lambda_ppc"], args["lambda_ppd"], args["tau"]) == (s["lambda_ppc"], s["lambda_ppd"], s["tau"])
            assert args["class_weight"] is None and args["aux_weight"] == 0.0
            assert loss["terms"].keys() == weights.keys()
            for k in weights:
                assert loss["terms"][k] == pytest.approx(loss["expected"][k], rel=1e-5), k
            assert loss["total"] == pytest.approx(sum(w * loss["expected"][k] for k, w in weights.items()), rel=1e-5)
            step = spies.at(spies.steps, loss["it"])
            got = [step.grads[n] for n in spies.watched]
            combine = lambda w: [sum(w[k] * loss["grads"][k][i] for k in w) for i in range(len(spies.watched))]
            assert relative_error(got, combine(weights)) < 1e-4, loss["it"]
            if s is SGD:                                                # fixture: a swap of the lambdas shows
                swapped = dict(weights, ppc=weights["ppd"], ppd=weights["ppc"])
                assert relative_error(combine(swapped), combine(weights)) > 1e-2
    loss = sgd[0].losses[0]                                                            # fixture: tau matters
    out = sgd[0].forwards[0]["out"]
    assert abs(protoseg.ppc_loss(out["proto_sim"], out["proto_target"], 0.1).item() - loss["terms"]["ppc"]) > 0.1


# ----------------------------------------------------------------------------- the prototypes

@pytest.mark.parametrize("run", ["sgd", "adamw"])
def test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration(run, request):
    """Also after the first step of the resumed run (iteration 2 of the SGD run): mu of iteration 2 applied to the
    checkpoint's prototypes. The Eq. 14 targets are the head's update_target (only correctly classified pixels
    with update_correct_only, the AdamW run)."""
    spies, out = request.getfixturevalue(run)
    s = RUNS[run]
    final = state(out / "last.pt")["model"]["head.prototypes"]
    assert [f["it"] for f in spies.forwards] == [u["it"] for u in spies.updates] == list(range(s["iters"]))
    for f, update in zip(spies.forwards, spies.updates):
        it, mu = f["it"], mu_at(f["it"], s)
        assert update["args"]["momentum"] == pytest.approx(mu, rel=1e-12), it
        assert update["args"]["local_stats"] == s["local_stats"]
        after = spies.at(spies.forwards, it + 1)["protos"] if it + 1 < s["iters"] else final
        expected = eq14(f["protos"], f["out"]["embed"], f["out"]["update_target"], mu)
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6, msg=it)
        if mu != mu_at(0, s):                                        # fixture: the mu of iteration 0 would show
            assert (eq14(f["protos"], f["out"]["embed"], f["out"]["update_target"], mu_at(0, s)) - after).abs().max() > 1e-4
    if run == "sgd":
        assert mu_at(2, s) != mu_at(0, s) and spies.starts[1]["head.prototypes"].ne(final).any()
    else:                                                            # fixture: some labelled pixels are wrong
        f = spies.forwards[0]["out"]
        assert (f["update_target"] != f["proto_target"]).any()


def test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume(sgd, adamw):
    spies, _ = sgd
    (init,) = spies.inits                                            # one call in the fresh and the resumed run
    first = spies.at(spies.forwards, 0)
    assert init["it"] == 0 and torch.equal(init["args"]["images"], first["images"])
    assert torch.equal(init["args"]["labels"], first["labels"])
    assert (init["args"]["kappa"], init["args"]["sinkhorn_iters"]) == (SGD["kappa"], SGD["sinkhorn_iters"])
    assert init["args"]["distributed"] == (not SGD["local_stats"])
    assert torch.equal(first["protos"], init["new"])                # the first forward sees them
    # the resumed run starts from the prototypes of the last step before the stop, not a new clustering
    assert torch.equal(spies.at(spies.forwards, 2)["protos"], spies.at(spies.updates, 1)["new"])
    spies, _ = adamw                                                 # random: the seeded start
    assert not spies.inits
    assert torch.equal(spies.forwards[0]["protos"], spies.starts[0]["head.prototypes"])


# ----------------------------------------------------------------------------- modes, dropout, seed

def test_every_module_trains_in_the_training_forward_and_evaluates_in_evaluation(sgd):
    spies, _ = sgd
    phases = {phase for phase, _, _ in spies.passes}
    assert phases == {"train", "eval", "init"}
    for phase, it, modes in spies.passes:
        drop = {n for n, m in spies.models[0].named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)}
        if phase == "train":
            assert all(modes.values()), (it, [n for n, t in modes.items() if not t])
        elif phase == "eval":
            assert not any(modes.values()), (it, [n for n, t in modes.items() if t])
        else:                                                        # data init: batch statistics, no dropout
            assert drop and {n for n, t in modes.items() if not t} == drop


def test_freeze_bn_keeps_batchnorm_in_eval_in_every_training_forward_and_its_statistics_unchanged(adamw):
    """Also in the forward after an evaluation (which puts every module in eval mode and back)."""
    spies, out = adamw
    bn = {n for n, m in spies.models[0].named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert bn and spies.evals[0] == 1                                  # fixture: an evaluation between the steps
    train_passes = [(it, modes) for phase, it, modes in spies.passes if phase == "train"]
    assert [it for it, _ in train_passes] == [0, 1]
    for it, modes in train_passes:
        assert {n for n, t in modes.items() if not t} == bn, it
    saved, start = state(out / "last.pt")["model"], spies.starts[0]
    stats = [k for k in saved if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(saved[k], start[k]) for k in stats)


def test_dropout_mask_of_each_iteration_is_drawn_from_seed_and_iteration(sgd):
    """torch.manual_seed(seed * 1_000_003 + rank * 7919 + it) before the forward; the head's Dropout2d (p =
    dropout) is the first draw: Bernoulli(1 - p) per (image, channel). Also in the resumed run."""
    spies, _ = sgd
    assert [it for it, *_ in spies.masks] == [0, 1, 2]
    kept = []
    for it, p, got, live in spies.masks:
        assert p == SGD["dropout"]
        g = torch.Generator().manual_seed(SGD["seed"] * 1_000_003 + it)
        expected = torch.empty(got.shape).bernoulli_(1 - p, generator=g).bool()
        assert live.float().mean() > 0.5 and not (got[live]).all()       # fixture: channels alive and dropped
        assert torch.equal(got[live], expected[live]), it
        kept.append(expected)
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])


def test_initial_weights_are_the_model_seeded_with_seed(sgd):
    spies, _ = sgd
    torch.manual_seed(SGD["seed"])
    expected = models.build_model("hrnet_tiny", "protoseg", 5, num_prototypes=3).state_dict()
    torch.manual_seed(0)
    other = models.build_model("hrnet_tiny", "protoseg", 5, num_prototypes=3).state_dict()
    start = spies.starts[0]
    assert start.keys() == expected.keys()
    assert all(torch.equal(start[k], expected[k]) for k in start)
    assert not torch.equal(start["backbone.conv1.weight"], other["backbone.conv1.weight"])


# ----------------------------------------------------------------------------- data

def test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name(sgd):
    """Per-rank batch batch_size, crop H x W, scale range, no flip, BGR input, seed: the synthetic train set through
    TrainTransform in DistributedSampler's order; the resumed run continues at its batch."""
    spies, _ = sgd
    ds = data.SyntheticDataset("train", data.TrainTransform(SGD["crop"], SGD["scale"], SGD["flip"],
                                                            channel_order=SGD["channel_order"]), seed=SGD["seed"])
    expected = sampler_batches(ds, SGD["batch_size"])
    for f, (images, labels) in zip(spies.forwards, expected):
        assert images.shape == (SGD["batch_size"], 3, *SGD["crop"])
        assert torch.equal(f["images"], images) and torch.equal(f["labels"], labels), f["it"]
    assert [f["it"] for f in spies.forwards] == [0, 1, 2]


def test_batches_restart_each_epoch_in_its_order_and_resume_mid_epoch():
    """batches(start): epoch = start // steps per epoch, skipping the batches already done; drop_last."""
    cfg = settings.Config(batch_size=3, seed=5, workers=0)
    ds = data.SyntheticDataset("train", data.TrainTransform((16, 16)), seed=5, length=7, size=32)   # 2 per epoch
    stream = train.batches(cfg, ds, 3, torch.device("cpu"))
    expected = list(sampler_batches(ds, 3, epoch=1))[1:] + list(sampler_batches(ds, 3, epoch=2))
    for images, labels in expected:
        got = next(stream)
        assert torch.equal(got[0], images) and torch.equal(got[1], labels)


@pytest.mark.parametrize("pipeline, recipe", [("openseg", dict(aspect=(0.6, 1.6))),
                                              ("mmseg", dict(img_scale=(300, 100), cat_max_ratio=0.3))])
def test_recipe_pipelines_get_their_settings(pipeline, recipe):
    """make_datasets: the training items are RecipeTransform(pipeline, crop, scale, flip, aspect / img_scale,
    cat_max_ratio, channel_order) of the train set; the val items EvalTransform(channel_order, eval_resize,
    eval_divisor)."""
    s = dict(pipeline=pipeline, crop=(40, 24), scale=(0.6, 1.4), flip=False, channel_order="bgr", seed=2,
             eval_resize=(90, 70), eval_divisor=8, **recipe)
    cfg = settings.parse_args(TINY + flags(**s))[0]
    train_set, val_set = train.make_datasets(cfg, log=None)
    expected = data.RecipeTransform(pipeline, s["crop"], s["scale"], s["flip"], channel_order="bgr", **recipe)
    ref = data.SyntheticDataset("train", expected, seed=2)
    for i in range(4):
        got, want = train_set[i], ref[i]
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"]), i
    for name in recipe:                                              # fixture: each recipe setting changes items
        default = data.RecipeTransform(pipeline, s["crop"], s["scale"], s["flip"], channel_order="bgr",
                                       **{k: v for k, v in recipe.items() if k != name})
        other = data.SyntheticDataset("train", default, seed=2)
        assert any(not torch.equal(other[i]["label"], ref[i]["label"]) for i in range(4)), name
    want = data.SyntheticDataset("val", data.EvalTransform("bgr", (90, 70), 8), seed=2)[0]
    assert val_set[0]["image"].shape == (3, 72, 72) and torch.equal(val_set[0]["image"], want["image"])


def test_folder_dataset_settings_shape_the_labels_the_loop_trains_on(tmp_path, monkeypatch):
    """data_root, num_classes, ignore_value and binary_masks: mask 255 -> class 1, 7 (ignore_value) -> ignored."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:30], mask[24:, :10] = 255, 7
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            save_image(tmp_path / "data/images" / split / f"{i}.png", rng.integers(0, 255, (32, 32, 3)))
            save_image(tmp_path / "data/masks" / split / f"{i}.png", mask)
    spies = Spies(monkeypatch)
    spies.run(TINY + flags(dataset="folder", data_root=tmp_path / "data", num_classes=2, ignore_value=7,
                           binary_masks=True, crop=32, scale=(1, 1), flip=False, batch_size=2, iters=1, val_size=1,
                           out_dir=tmp_path / "run"))
    expected = torch.from_numpy(np.select([mask == 255, mask == 7], [1, IGNORE_INDEX], 0).astype(np.int64))
    assert torch.equal(spies.forwards[0]["labels"], expected.expand(2, -1, -1))
    assert spies.models[0].head.prototypes.shape[0] == 2


# ----------------------------------------------------------------------------- the model, evaluation, amp

@pytest.mark.parametrize("run", ["sgd", "adamw"])
def test_model_settings_reach_the_network(run, request):
    spies, _ = request.getfixturevalue(run)
    s = {**dataclasses.asdict(settings.Config()), "num_prototypes": 3, **RUNS[run]}      # TINY: K = 3
    net = spies.models[0]
    head = net.head
    assert isinstance(net.backbone, models.HRNet) and net.backbone.channels == [8, 16, 32, 64]   # hrnet_tiny
    assert isinstance(head, protoseg.ProtoSegHead) and head.prototypes.shape[:2] == (5, s["num_prototypes"])
    assert (head.kappa, head.sinkhorn_iters) == (s["kappa"], s["sinkhorn_iters"])
    assert (head.mask_norm is not None, head.feat_norm is not None, head.normalize_width) == \
        (s["class_layernorm"], s["embed_layernorm"], s["normalize_width"])
    assert (head.update_correct_only, head.local_stats) == (s["update_correct_only"], s["local_stats"])
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout2d)] == [s["dropout"]]


def test_evaluation_gets_every_test_setting(adamw):
    """eval_crop, eval_stride, eval_scales, eval_flip reach predict_scores; eval_resize / eval_divisor the image
    (160 x 160 fits (40, 30) as 30 x 30, then a multiple of 16: 32 x 32), the scores go back to the label's size;
    val_size images per evaluation; eval_every: one between the steps, then the final one."""
    spies, _ = adamw
    assert spies.evals == [1, 2]
    assert len(spies.predicts) == 2 * ADAMW["val_size"]
    for shape, args in spies.predicts:
        assert shape == (1, 3, 32, 32)
        assert (args["crop"], args["stride"], args["scales"], args["flip"]) == \
            (ADAMW["eval_crop"], ADAMW["eval_stride"], ADAMW["eval_scales"], ADAMW["eval_flip"])
        assert tuple(args["size"]) == (160, 160)


def test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations(sgd):
    """done % ckpt_every == 0 or done == iters; done % log_every == 0 or the last; done % eval_every == 0 before
    the last, whose evaluation is the final one."""
    spies, out = sgd
    every = lambda n, done: done % n == 0 or done == SGD["iters"]
    done = range(1, SGD["iters"] + 1)
    assert spies.saves == [d for d in done if every(SGD["ckpt_every"], d)] == [2, 3]
    assert spies.evals == [d for d in done if d % SGD["eval_every"] == 0] == [1, 2, 3]
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in logged] == [d for d in done if every(SGD["log_every"], d)] == [3]
    assert [r["iter"] for r in rows if "val" in r] == [1, 2] and "final" in rows[-1]
    assert logged[0]["lr"] == pytest.approx(lr_at(2, SGD), rel=1e-12)
    assert logged[0]["loss"] == pytest.approx(spies.at(spies.losses, 2)["total"], rel=1e-6)


def test_amp_reaches_every_autocast_and_the_cpu_trains_in_fp32(sgd):
    spies, _ = sgd
    assert {where for where, _ in spies.amp} == {"train", "eval"} and {a for _, a in spies.amp} == {SGD["amp"]}
    assert spies.scalers == [False, False]                           # GradScaler: fp16 on a GPU only
    assert all(f["out"]["scores"].dtype == torch.float32 for f in spies.forwards)
    with warnings.catch_warnings():                                  # a CPU-only torch: "CUDA is not available"
        warnings.simplefilter("ignore")
        cuda = [collectives.autocast(a, torch.device("cuda")).fast_dtype for a in ("fp16", "bf16")]
    assert cuda == [torch.float16, torch.bfloat16] and not collectives.autocast("fp16", torch.device("cpu"))._enabled


# ----------------------------------------------------------------------------- Cityscapes, a softmax head, workers

def cityscapes_tree(root):
    """Two train images and one val image in the Cityscapes layout, labelIds road 7, car 26, vegetation 21,
    unlabelled 0."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            name = f"c_{i:06d}_000019"
            save_image(root / f"leftImg8bit/{split}/c/{name}_leftImg8bit.png", rng.integers(0, 255, (40, 48, 3)))
            ids = np.full((40, 48), 7)
            ids[5:20, 10:40], ids[25:, :20], ids[:3] = 26, 21, 0
            save_image(root / f"gtFine/{split}/c/{name}_gtFine_labelIds.png", ids)
    return root


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """Cityscapes (its preset: class weights, openseg pipeline), softmax head, an ImageNet-style backbone file,
    one DataLoader worker."""
    tmp = tmp_path_factory.mktemp("cityscapes")
    torch.manual_seed(11)
    torch.save(models.build_backbone("hrnet_tiny").state_dict(), tmp / "backbone.pth")
    table = json.loads(open(os.path.join(HERE, "testdata", "cityscapes_class_weights.json")).read())
    weight = torch.tensor(table["class_weights"])
    with pytest.MonkeyPatch.context() as mp:
        spies = Spies(mp, class_weight=weight)
        spies.run(flags(dataset="cityscapes", data_root=cityscapes_tree(tmp / "data"), backbone="hrnet_tiny",
                        head="softmax", crop=32, batch_size=2, iters=1, workers=1, val_size=1,
                        pretrained=tmp / "backbone.pth", out_dir=tmp / "run"))
    return spies, weight, tmp


def test_class_weights_cityscapes_weight_the_ce_by_the_official_table(cityscapes):
    spies, weight, _ = cityscapes
    (loss,) = spies.losses
    assert torch.equal(loss["args"]["class_weight"], weight)
    assert loss["terms"].keys() == {"ce"} and loss["terms"]["ce"] == pytest.approx(loss["expected"]["ce"], rel=1e-5)
    got = [spies.steps[0].grads[n] for n in spies.watched]
    assert relative_error(got, loss["grads"]["ce"]) < 1e-4
    out, labels = spies.forwards[0]["out"], spies.forwards[0]["labels"]                # fixture: weights matter
    plain = F.cross_entropy(out["scores"], labels, ignore_index=IGNORE_INDEX).item()
    assert abs(plain - loss["expected"]["ce"]) > 1e-4


def test_softmax_head_trains_without_prototypes(cityscapes):
    spies, _, _ = cityscapes
    assert isinstance(spies.models[0].head, protoseg.SoftmaxHead) and spies.models[0].head.classifier.out_channels == 19
    assert not spies.updates and not spies.inits and set(spies.forwards[0]["out"]) == {"scores"}


def test_pretrained_backbone_is_the_start_of_a_fresh_run(cityscapes):
    spies, _, tmp = cityscapes
    file = torch.load(tmp / "backbone.pth", weights_only=True)
    start = spies.starts[0]
    assert all(torch.equal(start["backbone." + k], v) for k, v in file.items())
    torch.manual_seed(0)                                             # fixture: the seeded init differs
    assert not torch.equal(models.build_backbone("hrnet_tiny").conv1.weight, file["conv1.weight"])


def test_workers_reach_every_data_loader(cityscapes):
    spies, _, _ = cityscapes
    assert spies.workers == [1, 1]                                   # training and the final evaluation


# ----------------------------------------------------------------------------- UperNet's auxiliary head

def test_aux_loss_weight_adds_upernets_auxiliary_ce_with_that_weight(tmp_path, monkeypatch):
    """A Swin backbone and UperNet of the smallest widths (the preset swin_tiny and UperNet's 512 channels shrunk
    for this test) with UperNet's auxiliary FCN head: the gradient of the head and of the auxiliary head is that of
    ce + lambda_ppc ppc + lambda_ppd ppd + aux_loss_weight aux."""
    monkeypatch.setitem(swin.SWIN_PRESETS, "swin_tiny", dict(embed_dim=8, depths=(1, 1, 1, 1), heads=(1, 1, 1, 1),
                                                             window=2))
    monkeypatch.setattr(models, "UperNet", functools.partial(swin.UperNet, channels=16))
    spies = Spies(monkeypatch, keep_params=False)
    spies.run(TINY + flags(backbone="swin_tiny", aux_loss_weight=0.3, crop=32, batch_size=2, iters=1, val_size=1,
                           eval_resize=(32, 32), out_dir=tmp_path))
    (loss,) = spies.losses
    weights = {"ce": 1.0, "ppc": 0.01, "ppd": 0.001, "aux": 0.3}
    assert loss["args"]["aux_weight"] == 0.3 and loss["terms"].keys() == weights.keys()
    assert loss["terms"]["aux"] == pytest.approx(loss["expected"]["aux"], rel=1e-5)
    assert any(n.startswith("neck.aux_head.") for n in spies.watched)
    got = [spies.steps[0].grads[n] for n in spies.watched]
    combine = lambda w: [sum(w[k] * loss["grads"][k][i] for k in w) for i in range(len(spies.watched))]
    assert relative_error(got, combine(weights)) < 1e-4
    assert relative_error(combine(dict(weights, aux=0.4)), combine(weights)) > 1e-2   # fixture: the default shows


# ----------------------------------------------------------------------------- every setting has a test

# Config field -> the tests that fail when its effect on training is lost, swapped or mistimed ("file::test" for
# another file). Settings that training does not read (files, this command) name the test that shows their effect.
COVERAGE = {
    "dataset": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on",
                "test_class_weights_cityscapes_weight_the_ce_by_the_official_table"],
    "data_root": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "num_classes": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "ignore_value": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "binary_masks": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "backbone": ["test_model_settings_reach_the_network", "test_aux_loss_weight_adds_upernets_auxiliary_ce_with_that_weight"],
    "head": ["test_softmax_head_trains_without_prototypes", "test_model_settings_reach_the_network"],
    "pretrained": ["test_pretrained_backbone_is_the_start_of_a_fresh_run"],
    "out_dir": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations",
                "test_train.py::test_command_line_runs_end_to_end"],
    "crop": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
             "test_recipe_pipelines_get_their_settings"],
    "scale": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
              "test_recipe_pipelines_get_their_settings"],
    "flip": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
             "test_recipe_pipelines_get_their_settings"],
    "pipeline": ["test_recipe_pipelines_get_their_settings"],
    "aspect": ["test_recipe_pipelines_get_their_settings"],
    "img_scale": ["test_recipe_pipelines_get_their_settings"],
    "cat_max_ratio": ["test_recipe_pipelines_get_their_settings"],
    "channel_order": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
                      "test_recipe_pipelines_get_their_settings"],
    "batch_size": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
                   "test_batches_restart_each_epoch_in_its_order_and_resume_mid_epoch"],
    "iters": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed",
              "test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations"],
    "optimizer": ["test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume",
                  "test_adamw_update_is_decoupled_decay_then_adam_with_torchs_betas"],
    "lr": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed"],
    "lr_power": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed"],
    "warmup_iters": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed"],
    "head_lr_mult": ["test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay"],
    "aux_loss_weight": ["test_aux_loss_weight_adds_upernets_auxiliary_ce_with_that_weight"],
    "momentum": ["test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume"],
    "weight_decay": ["test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay",
                     "test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume",
                     "test_adamw_update_is_decoupled_decay_then_adam_with_torchs_betas"],
    "norm_decay": ["test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay"],
    "class_weights": ["test_class_weights_cityscapes_weight_the_ce_by_the_official_table"],
    "num_prototypes": ["test_model_settings_reach_the_network"],
    "kappa": ["test_model_settings_reach_the_network",
              "test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume",
              "test_wiring.py::test_head_eq10_targets_from_prototypes_before_update"],
    "sinkhorn_iters": ["test_model_settings_reach_the_network",
                       "test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume",
                       "test_wiring.py::test_head_eq10_targets_from_prototypes_before_update"],
    "proto_momentum": ["test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration"],
    "proto_momentum_warmup": [
        "test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration"],
    "proto_init": ["test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume"],
    "lambda_ppc": ["test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau"],
    "lambda_ppd": ["test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau"],
    "tau": ["test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau"],
    "class_layernorm": ["test_model_settings_reach_the_network",
                        "test_protoseg.py::test_official_switches_update_correct_only_and_layernorms"],
    "embed_layernorm": ["test_model_settings_reach_the_network",
                        "test_protoseg.py::test_official_switches_update_correct_only_and_layernorms"],
    "update_correct_only": [
        "test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration",
        "test_model_settings_reach_the_network"],
    "local_stats": ["test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration",
                    "test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume",
                    "test_model_settings_reach_the_network",
                    "test_wiring.py::test_ddp_head_global_sinkhorn_identical_prototypes_and_local_stats_average"],
    "normalize_width": ["test_model_settings_reach_the_network"],
    "dropout": ["test_dropout_mask_of_each_iteration_is_drawn_from_seed_and_iteration",
                "test_model_settings_reach_the_network"],
    "freeze_bn": ["test_freeze_bn_keeps_batchnorm_in_eval_in_every_training_forward_and_its_statistics_unchanged"],
    "amp": ["test_amp_reaches_every_autocast_and_the_cpu_trains_in_fp32"],
    "workers": ["test_workers_reach_every_data_loader"],
    "seed": ["test_initial_weights_are_the_model_seeded_with_seed",
             "test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
             "test_dropout_mask_of_each_iteration_is_drawn_from_seed_and_iteration"],
    "log_every": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations"],
    "eval_every": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations",
                   "test_evaluation_gets_every_test_setting"],
    "ckpt_every": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations"],
    "eval_crop": ["test_evaluation_gets_every_test_setting"],
    "eval_stride": ["test_evaluation_gets_every_test_setting"],
    "eval_resize": ["test_evaluation_gets_every_test_setting", "test_recipe_pipelines_get_their_settings"],
    "eval_divisor": ["test_evaluation_gets_every_test_setting", "test_recipe_pipelines_get_their_settings"],
    "eval_scales": ["test_evaluation_gets_every_test_setting"],
    "eval_flip": ["test_evaluation_gets_every_test_setting"],
    "val_size": ["test_evaluation_gets_every_test_setting"],
    # this command (not training): resuming, evaluating, the run folder
    "resume": ["test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume",
               "test_train.py::test_resumed_run_equals_uninterrupted_run"],
    "eval_only": ["test_bad_input.py::test_eval_only_never_touches_the_training_record_and_a_finished_run_stays_finished"],
    "overwrite": ["test_runs.py::test_out_dir_belongs_to_one_run"],
    "allow_changes": ["test_train.py::test_resume_refuses_settings_that_change_the_trajectory"],
}


def test_every_setting_names_the_tests_of_its_effect():
    fields = {f.name for f in dataclasses.fields(settings.Config)}
    missing, stale = sorted(fields - COVERAGE.keys()), sorted(COVERAGE.keys() - fields)
    assert not missing, f"settings without a test of their effect on training: {missing}; add a test to " \
                        "tests/test_loop.py and name it in COVERAGE"
    assert not stale, f"COVERAGE names settings Config no longer has: {stale}"
    here = open(__file__).read()
    for field, tests in COVERAGE.items():
        for name in tests:
            file, _, test = name.rpartition("::")
            path = os.path.join(os.path.dirname(HERE), file) if file == "test_protoseg.py" else \
                os.path.join(HERE, file) if file else __file__
            text = here if not file else open(path).read()
            assert re.search(rf"^def {re.escape(test)}\(", text, re.M), f"{field}: no test {name}"
