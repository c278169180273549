"""Tests of the wiring: how ProtoSegHead and seg_loss connect the equation functions.

The equation functions are tested in test_protoseg.py. Here every expected value is computed independently of
the head's code path: Eq. 10 by calling sinkhorn() per class (or, end to end, by a float64 transcription of
L = diag(u) exp(P^T X / kappa) diag(v)), Eq. 14 by a loop over (c, k), the losses by loops over pixels. Only the
head's public API is used: constructor, .train(), head(feats, labels), .prototypes, .embed(), .trunk, and the
prototype update as train.py applies it after the optimiser step (train_step below).
"""
import copy
import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from conftest import free_port
from layers import upsample
from models import SegModel
from protoseg import IGNORE_INDEX, ProtoSegHead, seg_loss, update_prototypes
from sinkhorn import sinkhorn

C, K, DIN, D = 4, 3, 8, 6
KAPPA, ITERS, MU = 0.08, 4, 0.5          # non-default kappa / iterations: the head must pass them on


def make_head(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"embed_dim": D, "num_prototypes": K, "kappa": KAPPA, "sinkhorn_iters": ITERS, "class_layernorm": False,
          "dropout": 0.0, **kw}
    return ProtoSegHead(DIN, C, **kw).train()


def train_step(head, feats, labels, mu=MU):
    """The head's part of one training iteration as train.py runs it: forward, then Eq. 14 with mu."""
    out = head(feats, labels)
    head.prototypes.copy_(update_prototypes(head.prototypes, out["embed"], out["update_target"], mu,
                                            head.local_stats))
    return out


def unit_embed(head, feats):
    """i of the paper, computed here: the trunk's output l2-normalised over channels.  -> (B, h, w, D)"""
    with torch.no_grad():
        return F.normalize(head.trunk(feats).permute(0, 2, 3, 1), dim=-1)


def labelled(embed, labels):
    """The labelled pixels in (b, y, x) order: (N, D), (N,)."""
    keep = labels.flatten() != IGNORE_INDEX
    return embed.flatten(0, 2)[keep], labels.flatten()[keep]


def eq10_targets(embed, labels, protos, kappa=KAPPA, iters=ITERS):
    """c_i * K + k_i with k_i = argmax_k of Eq. 10, sinkhorn() called class by class (one class a call) on `protos`.
    Also returns each pixel's gap between its two largest entries of L (a fixture must have no near-ties)."""
    num_prototypes = protos.shape[1]
    target, margin = torch.empty_like(labels), torch.empty(len(labels))
    for c in labels.unique().tolist():
        m = labels == c
        L = sinkhorn(embed[m] @ protos[c].T, labels[m] * 0, 1, kappa, iters, distributed=False)
        target[m] = c * num_prototypes + L.argmax(1)
        top = L.topk(2, dim=1).values
        margin[m] = top[:, 0] - top[:, 1]
    return target, margin


def eq14_slow(protos, embed, target, mu=MU):
    """Eq. 14 by a loop over prototypes: p_ck <- normalise(mu p_ck + (1 - mu) normalise(mean of its pixels))."""
    num_classes, num_prototypes, _ = protos.shape
    new = protos.clone()
    for c, k in itertools.product(range(num_classes), range(num_prototypes)):
        members = [embed[n] for n in range(len(target)) if target[n] == c * num_prototypes + k]
        if members:                                                    # no pixel: unchanged
            mean = F.normalize(sum(members) / len(members), dim=0)
            new[c, k] = F.normalize(mu * protos[c, k] + (1 - mu) * mean, dim=0)
    return new


def greedy(embed, labels, protos):
    """What bypassing Sinkhorn would give: c_i * K + argmax_k i^T p_ck."""
    own = torch.einsum("nd,nkd->nk", embed, protos[labels])
    return labels * protos.shape[1] + own.argmax(1)


def train_step_fixture(seed=0):
    head = make_head(seed)
    g = torch.Generator().manual_seed(seed + 100)
    feats = torch.randn(2, DIN, 6, 6, generator=g)
    labels = torch.randint(0, C - 1, (2, 6, 6), generator=g)           # class C-1 absent
    labels[0, :2] = IGNORE_INDEX
    before = head.prototypes.clone()
    embed, y = labelled(unit_embed(head, feats), labels)
    out = train_step(head, feats, labels)
    return head, before, embed, y, out


def labelled_outputs(out):
    """The training dict's (B, C*K, h, w) similarities and (B, h, w) targets at the labelled pixels, in (b, y, x)
    order: (N, C*K) and (N,)."""
    target = out["proto_target"].flatten()
    keep = target != IGNORE_INDEX
    return out["proto_sim"].permute(0, 2, 3, 1).flatten(0, 2)[keep], target[keep]


# ----------------------------------------------------------------------------- one head, one process

def test_head_eq10_targets_from_prototypes_before_update():
    head, before, embed, y, out = train_step_fixture()
    target, margin = eq10_targets(embed, y, before)
    assert margin.min() > 1e-3                                         # fixture: no near-ties
    assert not torch.equal(target, greedy(embed, y, before))          # fixture: Sinkhorn != greedy argmax
    assert not torch.equal(target, eq10_targets(embed, y, head.prototypes)[0])   # fixture: after != before
    sim, head_target = labelled_outputs(out)
    assert torch.equal(head_target, target)
    # the losses' similarities: every labelled pixel to all C*K prototypes as they were before the update
    torch.testing.assert_close(sim, embed @ before.reshape(C * K, D).T)


def test_head_eq14_new_prototypes_from_sinkhorn_targets():
    head, before, embed, y, out = train_step_fixture()
    expected = eq14_slow(before, embed, eq10_targets(embed, y, before)[0])
    torch.testing.assert_close(head.prototypes, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(head.prototypes[C - 1], before[C - 1])         # absent class untouched
    assert out["proto_sim"].requires_grad and not out["embed"].requires_grad   # Eq. 14's input: outside autograd


def test_head_eq5_eq6_scores_are_cosines_of_unit_norm_embeddings():
    head = make_head(1)
    with torch.no_grad():                                              # trunk outputs of norm up to ~10
        last = [m for m in head.trunk.modules() if isinstance(m, nn.Conv2d)][-1]
        last.weight.mul_(20), last.bias.mul_(20)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, DIN, 5, 5, generator=g)
    labels = torch.randint(0, C, (2, 5, 5), generator=g)
    for mode in ("eval", "train"):
        getattr(head, mode)()
        with torch.no_grad():
            assert head.trunk(feats).norm(dim=1).max() > 2              # fixture: the trunk is not unit-norm
            torch.testing.assert_close(head.embed(feats).norm(dim=-1), torch.ones(2, 5, 5))
        i, before = unit_embed(head, feats), head.prototypes.clone()
        out = head(feats, labels if mode == "train" else None)
        scores = out["scores"]
        assert scores.abs().max() <= 1 + 1e-6                          # cosines, no class LayerNorm
        torch.testing.assert_close(scores, torch.einsum("bhwd,ckd->bchwk", i, before).amax(-1))   # -s of Eq. 6
        if mode == "train":
            assert out["proto_sim"].abs().max() <= 1 + 1e-6


def test_head_labels_larger_than_features_are_brought_down_by_nearest():
    head = make_head(2)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, DIN, 5, 5, generator=g)
    small = torch.randint(0, C, (2, 5, 5), generator=g)
    small[1, 0] = IGNORE_INDEX
    # 4x larger labels: F.interpolate(mode="nearest") reads pixel (4y, 4x); the rest of each 4x4 block holds
    # another class, so bilinear (and nearest-exact) read something else
    fill = torch.where(small == IGNORE_INDEX, torch.zeros_like(small), (small + 1) % C)
    big = fill.repeat_interleave(4, 1).repeat_interleave(4, 2)
    big[:, ::4, ::4] = small
    before = head.prototypes.clone()
    embed, y = labelled(unit_embed(head, feats), small)
    out = head(feats, big)
    target = labelled_outputs(out)[1]
    assert torch.equal(target // K, y)
    assert torch.equal(target, eq10_targets(embed, y, before)[0])


def test_seg_loss_passes_tau_class_weight_lambdas_and_ignore_index_on():
    g = torch.Generator().manual_seed(4)
    B, H, W = 2, 3, 4
    scores = torch.randn(B, C, H, W, generator=g)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[0, 0, :2] = IGNORE_INDEX
    n = 10
    proto_sim = torch.rand(n, C * K, generator=g) * 2 - 1
    proto_target = torch.randint(0, C * K, (n,), generator=g)
    out = {"scores": scores, "proto_sim": proto_sim, "proto_target": proto_target}
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    tau, lam1, lam2 = 0.7, 0.3, 0.2
    # Eq. 11 and Eq. 12 by loops over pixels, with this tau
    ppc = ppd = 0.0
    for i in range(n):
        t = proto_target[i].item()
        ppc -= proto_sim[i, t].item() / tau - math.log(sum(math.exp(s / tau) for s in proto_sim[i].tolist()))
        ppd += (1 - proto_sim[i, t].item()) ** 2
    ppc, ppd = ppc / n, ppd / n
    for ignore in (IGNORE_INDEX, 1):                                   # 1: a real class, ignored on request
        # Eq. 7, class-weighted mean over the pixels not ignored
        num = den = 0.0
        for b, yy, xx in itertools.product(range(B), range(H), range(W)):
            c = labels[b, yy, xx].item()
            if c in (ignore, IGNORE_INDEX):
                continue
            logits = scores[b, :, yy, xx].tolist()
            logp = logits[c] - math.log(sum(math.exp(v) for v in logits))
            num, den = num - weight[c].item() * logp, den + weight[c].item()
        ce = num / den
        lab = labels.clone() if ignore == IGNORE_INDEX else torch.where(labels == IGNORE_INDEX, 1, labels)
        total, terms = seg_loss(out, lab, lambda_ppc=lam1, lambda_ppd=lam2, tau=tau, class_weight=weight,
                                ignore_index=ignore)
        assert set(terms) == {"ce", "ppc", "ppd"}
        assert abs(terms["ce"].item() - ce) < 1e-5
        assert abs(terms["ppc"].item() - ppc) < 1e-5
        assert abs(terms["ppd"].item() - ppd) < 1e-5
        assert abs(total.item() - (ce + lam1 * ppc + lam2 * ppd)) < 1e-5
        plain, _ = seg_loss({"scores": scores}, lab, class_weight=weight, ignore_index=ignore)   # scores only: CE
        assert abs(plain.item() - ce) < 1e-5
    aux = torch.randn(B, C, H, W, generator=g)                       # UperNet's auxiliary head: its CE, unweighted
    total, terms = seg_loss({"scores": scores, "aux_scores": aux}, labels, class_weight=weight, aux_weight=0.4)
    assert terms["aux"].item() == pytest.approx(F.cross_entropy(aux, labels, ignore_index=IGNORE_INDEX).item())
    assert total.item() == pytest.approx((terms["ce"] + 0.4 * terms["aux"]).item())


# ----------------------------------------------------------------------------- the head under 2 ranks (gloo)

def _head_rank_worker(rank, world, port, state, feats, labels, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for local in (False, True):
        head = make_head(local_stats=local)
        head.load_state_dict(state)
        head.trunk.eval()                       # BN on running stats: a pixel's embedding is batch-independent
        out = train_step(head, feats[rank], labels[rank])
        results[(rank, local)] = (labelled_outputs(out)[1], head.prototypes.clone())
    dist.destroy_process_group()


def test_ddp_head_global_sinkhorn_identical_prototypes_and_local_stats_average():
    head = make_head(10)
    head.trunk.eval()
    g = torch.Generator().manual_seed(10)
    feats = [torch.randn(1, DIN, 6, 6, generator=g), torch.randn(2, DIN, 6, 6, generator=g)]   # uneven
    labels = [torch.randint(0, 2, (1, 6, 6), generator=g), torch.randint(0, 3, (2, 6, 6), generator=g)]
    labels[1][0, :3] = IGNORE_INDEX
    before = head.prototypes.clone()
    parts = [labelled(unit_embed(head, f), lab) for f, lab in zip(feats, labels)]
    embed, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    sizes = [len(p[1]) for p in parts]

    results = mp.Manager().dict()
    mp.spawn(_head_rank_worker, args=(2, free_port(), head.state_dict(), feats, labels, results), nprocs=2)

    # global: Eq. 10 and Eq. 14 over the concatenated batch, = one process holding all of it
    target, margin = eq10_targets(embed, y, before)
    assert margin.min() > 1e-3
    local = [eq10_targets(e, lab, before) for e, lab in parts]
    assert not torch.equal(target, torch.cat([t for t, _ in local]))  # fixture: local Sinkhorn differs
    expected = eq14_slow(before, embed, target)
    single = copy.deepcopy(head)
    single_out = train_step(single, torch.cat(feats), torch.cat(labels))
    assert torch.equal(labelled_outputs(single_out)[1], target)
    torch.testing.assert_close(single.prototypes, expected, rtol=1e-5, atol=1e-6)
    for rank, t in enumerate(target.split(sizes)):
        assert torch.equal(results[(rank, False)][0], t)
    assert torch.equal(results[(0, False)][1], results[(1, False)][1])   # identical on both ranks
    torch.testing.assert_close(results[(0, False)][1], single.prototypes, rtol=1e-5, atol=1e-6)

    # local_stats (official): Sinkhorn and Eq. 14 on each rank's batch, then the ranks' prototypes averaged
    assert min(m.min() for _, m in local) > 1e-3
    news = [eq14_slow(before, e, t) for (e, _), (t, _) in zip(parts, local)]
    assert not torch.allclose(news[0], news[1])                       # fixture: the average matters
    for rank in range(2):
        assert torch.equal(results[(rank, True)][0], local[rank][0])
    assert torch.equal(results[(0, True)][1], results[(1, True)][1])
    torch.testing.assert_close(results[(0, True)][1], F.normalize(news[0] + news[1], dim=-1),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- end to end: SGD steps

def sinkhorn_slow(scores, kappa, iters):
    """Eq. 10 as written, in float64: L = diag(u) exp(P^T X / kappa) diag(v), K x N; u rescales the prototype
    marginals to N/K, then v the pixel marginals to 1. scores: (N, K) -> L^T: (N, K)."""
    Q = torch.exp(scores.double().T / kappa)
    k, n = Q.shape
    u, v = torch.ones(k, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    for _ in range(iters):
        u = (n / k) / (Q @ v)
        v = 1.0 / (Q.T @ u)
    return (u[:, None] * Q * v[None, :]).T


def slow_step(model, opt, images, labels, lambda_ppc, lambda_ppd, tau, weight, kappa, iters, mu):
    """One training step of Eq. 5-14 by loops over pixels and classes; updates model (SGD) and its prototypes."""
    protos = model.head.prototypes.clone()                             # as before this step
    nc, nk, _ = protos.shape
    emb = F.normalize(model.head.trunk(model.backbone(images)), dim=1)  # i: (B, D, h, w)
    B, _, h, w = emb.shape
    H, W = labels.shape[1:]
    # Eq. 6: -s_{i,c} = max_k i^T p_ck at the feature resolution, then upsampled to the image as the model does
    neg_s = torch.stack([torch.stack([(emb * protos[c, k][None, :, None, None]).sum(1) for k in range(nk)])
                         .amax(0) for c in range(nc)], 1)
    scores = upsample(neg_s, (H, W), True)
    # Eq. 7: class-weighted cross-entropy of p(c|i) = exp(-s_c) / sum_c' exp(-s_c')
    num, den = 0.0, 0.0
    for b, y, x in itertools.product(range(B), range(H), range(W)):
        c = labels[b, y, x].item()
        if c != IGNORE_INDEX:
            num = num - weight[c] * (scores[b, c, y, x] - torch.logsumexp(scores[b, :, y, x], 0))
            den = den + weight[c]
    ce = num / den
    # the labelled pixels at the feature resolution (nearest: pixel (y*H//h, x*W//w))
    pix, cls = [], []
    for b, y, x in itertools.product(range(B), range(h), range(w)):
        c = labels[b, y * H // h, x * W // w].item()
        if c != IGNORE_INDEX:
            pix.append(emb[b, :, y, x])
            cls.append(c)
    # Eq. 8-10 per class on the prototypes before the update, k_i = argmax
    assign, margins = [0] * len(cls), []
    for c in set(cls):
        members = [n for n in range(len(cls)) if cls[n] == c]
        L = sinkhorn_slow(torch.stack([pix[n].detach() for n in members]) @ protos[c].T, kappa, iters)
        top = L.topk(2, dim=1).values
        margins.append((top[:, 0] - top[:, 1]).min().item())
        for n, k in zip(members, L.argmax(1).tolist()):
            assign[n] = k
    # Eq. 11, 12: over all C*K prototypes, target (c_i, k_i)
    flat = protos.reshape(nc * nk, -1)
    ppc, ppd = 0.0, 0.0
    for n, i in enumerate(pix):
        t = cls[n] * nk + assign[n]
        sims = torch.stack([i @ flat[j] for j in range(nc * nk)])
        ppc = ppc - (sims[t] / tau - torch.logsumexp(sims / tau, 0))
        ppd = ppd + (1 - sims[t]) ** 2
    ppc, ppd = ppc / len(pix), ppd / len(pix)
    total = ce + lambda_ppc * ppc + lambda_ppd * ppd                    # Eq. 13
    opt.zero_grad()
    total.backward()
    opt.step()
    # Eq. 14 with the embeddings of this step
    targets = torch.tensor([c * nk + k for c, k in zip(cls, assign)])
    with torch.no_grad():
        model.head.prototypes.copy_(eq14_slow(protos, torch.stack(pix).detach(), targets, mu))
    return {"ce": ce.item(), "ppc": ppc.item(), "ppd": ppd.item(), "total": total.item()}, min(margins)


def test_end_to_end_sgd_steps_match_slow_transcription_of_eq5_to_eq14():
    nc, nk = 3, 2
    hyper = {"lambda_ppc": 0.5, "lambda_ppd": 0.3, "tau": 0.2, "class_weight": torch.tensor([1.0, 2.0, 0.5])}
    torch.manual_seed(6)
    backbone = nn.Sequential(nn.Conv2d(3, DIN, 3, stride=2, padding=1), nn.BatchNorm2d(DIN), nn.ReLU())
    head = ProtoSegHead(DIN, nc, embed_dim=D, num_prototypes=nk, kappa=0.05, sinkhorn_iters=3, class_layernorm=False,
                        dropout=0.0)
    model = SegModel(backbone, nn.Identity(), head, family="hrnet").train()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 12, 12, generator=g)
    labels = torch.randint(0, nc, (2, 12, 12), generator=g)
    labels[0, :3] = IGNORE_INDEX
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    start = head.prototypes.clone()
    for step in range(3):
        out = model(images, labels)
        total, terms = seg_loss(out, labels, ignore_index=IGNORE_INDEX, **hyper)
        opt.zero_grad()
        total.backward()
        opt.step()
        head.prototypes.copy_(update_prototypes(head.prototypes, out["embed"], out["update_target"], MU))  # Eq. 14
        expected, margin = slow_step(ref, ref_opt, images, labels, weight=hyper["class_weight"], kappa=0.05,
                                     iters=3, mu=MU, **{k: hyper[k] for k in ("lambda_ppc", "lambda_ppd", "tau")})
        assert margin > 1e-4, step                                      # fixture: no near-ties
        got = {**{k: v.item() for k, v in terms.items()}, "total": total.item()}
        for k in expected:
            assert abs(got[k] - expected[k]) < 1e-4 * max(1.0, abs(expected[k])), (step, k, got, expected)
        torch.testing.assert_close(head.prototypes, ref.head.prototypes, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(head.prototypes, start)
