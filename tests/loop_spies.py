"""The spies, transcriptions and runs that tests/test_loop.py and tests/test_loop_data.py share (see the docstring of
test_loop.py): what each call of the training loop saw, and the formulas it is compared with."""
import dataclasses
import inspect
import os

import pytest
import torch
import torch.nn.functional as F

import evaluate
import train
from conftest import TINY
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
    """Eq. 7 (CE, class-weighted mean over the labelled pixels), Eq. 11 with temperature tau and Eq. 12 written
    here on the labelled pixels' (N, C*K) rows with F.cross_entropy (not the loop's code), and the aux head's CE."""
    terms = {"ce": F.cross_entropy(out["scores"].float(), labels, weight=class_weight, ignore_index=IGNORE_INDEX)}
    if "proto_sim" in out:
        keep = out["proto_target"] != IGNORE_INDEX
        rows, target = out["proto_sim"].float().permute(0, 2, 3, 1)[keep], out["proto_target"][keep]
        terms["ppc"] = F.cross_entropy(rows / tau, target)
        terms["ppd"] = (1 - rows.gather(1, target[:, None])).pow(2).mean()
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
        real = {name: getattr(train, name) for name in ("make_optimizer", "seg_loss", "update_prototypes",
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
        raw_model.register_forward_pre_hook(self.before_forward)
        raw_model.register_forward_hook(self.after_forward)
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

    def before_forward(self, model, inputs):
        """A training step's forward (model(images, labels) in training mode)."""
        if not (model.training and len(inputs) == 2):
            return
        if self.it == self.stop_at:
            raise KeyboardInterrupt
        protos = model.head.prototypes.clone() if hasattr(model.head, "prototypes") else None
        self.phase = "train"
        self.forwards.append(dict(it=self.it, images=inputs[0].clone(), labels=inputs[1].clone(), protos=protos))

    def after_forward(self, model, inputs, out):
        if model.training and len(inputs) == 2:
            self.phase = None
            self.forwards[-1]["out"] = {k: v.detach().clone() for k, v in out.items()}

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


def run_sgd(out):
    """The SGD run (SGD above), stopped before iteration 3 and resumed; -> its Spies."""
    args = TINY + flags(**SGD) + ["--out-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        spies = Spies(mp, tau=SGD["tau"])
        spies.stop_at = 2
        with pytest.raises(KeyboardInterrupt):
            spies.run(args)
        spies.stop_at = None
        spies.run(args + ["--resume", "auto"])
    return spies


def run_adamw(out):
    """The AdamW run (ADAMW above); -> its Spies."""
    with pytest.MonkeyPatch.context() as mp:
        spies = Spies(mp, tau=ADAMW["tau"])
        spies.run(TINY + flags(**ADAMW) + ["--out-dir", str(out)])
    return spies


RUNS = {"sgd": SGD, "adamw": ADAMW}
