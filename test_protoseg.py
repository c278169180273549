"""Tests of the method: every equation of the paper (Eq. 1-14) against a direct transcription, a brute-force
optimum or a known invariant. Tiny sizes, CPU, seconds.

Which test guards which equation (this file: the functions) and which wiring (tests/test_wiring.py: how
ProtoSegHead and seg_loss connect them; each line there was checked by planting the bug named):
  Eq. 1-4   test_eq1_*, test_eq2_*, test_eq4_*                   parametric heads = unified view
  Eq. 3, 5  test_eq3_*                                           similarities, nearest prototype
  Eq. 6     test_eq6_*; wiring: test_head_eq5_eq6_scores_are_cosines_of_unit_norm_embeddings
            (embedding not l2-normalised)
  Eq. 7     test_eq7_*; wiring: test_seg_loss_passes_tau_class_weight_lambdas_and_ignore_index_on
            (class_weight or ignore_index dropped)
  Eq. 8-10  tests/test_sinkhorn.py; wiring: test_head_eq10_targets_from_prototypes_before_update
            (greedy argmax instead of Sinkhorn; kappa/iterations not passed on; losses with the prototypes
            after the update), test_head_labels_larger_than_features_are_brought_down_by_nearest (bilinear labels)
  Eq. 11-13 test_eq11_*, test_eq12_*, test_eq13_*; wiring: test_seg_loss_passes_* (tau not passed on, lambdas)
  Eq. 14    test_eq14_*; wiring: test_head_eq14_new_prototypes_from_sinkhorn_targets (momentum, assignment)
  2 ranks   test_ddp_sinkhorn_and_update_match_single_process (the functions); the head itself:
            test_ddp_head_global_sinkhorn_identical_prototypes_and_local_stats_average (wrong `distributed`
            flag to Sinkhorn or to Eq. 14, local_stats without the cross-rank average or re-normalisation)
  switches  tests/test_head_switches.py: --proto-init data's clustering, an ignore value of 255
  all       test_end_to_end_sgd_steps_match_slow_transcription_of_eq5_to_eq14: 3 SGD steps against loops
            over pixels and classes (catches tau, class weights, bilinear labels, greedy assignment,
            unnormalised embeddings and after-update prototypes again, in one run)
"""
import itertools
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from protoseg import (IGNORE_INDEX, ProtoSegHead, QueryHead, SoftmaxHead, cross_entropy, momentum_update,
                      ppc_loss, ppd_loss, seg_loss, similarities, update_prototypes)
from sinkhorn import sinkhorn


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def free_port():
    """A free TCP port for a 2-rank gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_class(scores, kappa=0.05, iters=3):
    """sinkhorn() on the pixels of a single class."""
    return sinkhorn(scores, torch.zeros(len(scores), dtype=torch.long), 1, kappa, iters)


def dot(embed, protos):
    """i^T p_ck written out: embed (..., D), protos (C, K, D) -> (..., C, K)."""
    return (embed[..., None, None, :] * protos).sum(-1)


def trunk_embedding(head, feats):
    """(B, D, h, w) output of a head's trunk, in eval mode (dropout off)."""
    return head.trunk(feats)


# ----------------------------------------------------------------------------- Eq. 1-4: parametric heads

def test_eq1_eq4_softmax_head_is_unified_view_with_weights_as_prototypes():
    torch.manual_seed(0)
    head = SoftmaxHead(8, 5, embed_dim=6).eval()
    feats = torch.randn(2, 8, 3, 4)
    prob = head(feats)["scores"].softmax(1)                         # Eq. 1
    i = trunk_embedding(head, feats)
    w = head.classifier.weight[:, :, 0, 0]                          # g_c = w_c, (C, D)
    for b, y, x in itertools.product(range(2), range(3), range(4)):
        dist_ = torch.stack([-(w[c] @ i[b, :, y, x]) for c in range(5)])    # <i, g_c> = -g^T i
        eq4 = torch.exp(-dist_) / torch.exp(-dist_).sum()
        torch.testing.assert_close(prob[b, :, y, x], eq4, rtol=1e-5, atol=1e-6)


def test_eq2_eq4_query_head_is_unified_view_with_queries_as_prototypes():
    torch.manual_seed(0)
    head = QueryHead(8, 5, embed_dim=6).eval()
    feats = torch.randn(2, 8, 3, 4)
    prob = head(feats)["scores"].softmax(1)                         # Eq. 2
    i = trunk_embedding(head, feats)
    for b, y, x in itertools.product(range(2), range(3), range(4)):
        v = i[b, :, y, x]
        dist_ = torch.stack([-(head.queries[c] @ v) / (head.queries[c].norm() * v.norm()) for c in range(5)])
        eq4 = torch.exp(-dist_) / torch.exp(-dist_).sum()
        torch.testing.assert_close(prob[b, :, y, x], eq4, rtol=1e-5, atol=1e-6)


def test_eq4_parametric_heads_learn_one_prototype_per_class():
    # D x C learnable prototype parameters: the softmax head grows by D per class
    count = lambda m: sum(p.numel() for p in m.parameters())
    d = 6
    assert count(SoftmaxHead(8, 20, embed_dim=d)) - count(SoftmaxHead(8, 19, embed_dim=d)) == d
    assert count(QueryHead(8, 20, embed_dim=d)) - count(QueryHead(8, 19, embed_dim=d)) == d


def test_protoseg_head_learnable_parameters_do_not_depend_on_num_classes():
    count = lambda m: sum(p.numel() for p in m.parameters())
    plain = [count(ProtoSegHead(8, c, class_layernorm=False)) for c in (19, 150, 847)]
    assert plain[0] == plain[1] == plain[2]
    assert count(ProtoSegHead(8, 150)) - plain[1] == 2 * 150                  # class_layernorm: LayerNorm(C)
    head = ProtoSegHead(8, 19, num_prototypes=10)
    assert head.prototypes.shape == (19, 10, 8) and not head.prototypes.requires_grad
    assert "prototypes" in dict(head.named_buffers())


# ----------------------------------------------------------------------------- Eq. 3, 5, 6, 7

def test_eq3_similarities_are_minus_the_distance_for_every_pixel_and_prototype():
    embed, protos = unit(2, 3, 4, 5, seed=22), unit(3, 2, 5, seed=23)          # (B, h, w, D), (C, K, D)
    sim = similarities(embed.permute(0, 3, 1, 2), protos)
    assert sim.shape == (2, 3, 2, 3, 4)                                        # (B, C, K, h, w)
    for b, y, x, c, k in itertools.product(range(2), range(3), range(4), range(3), range(2)):
        distance = -sum(embed[b, y, x, d].item() * protos[c, k, d].item() for d in range(5))   # <i, p> = -i^T p
        assert abs(sim[b, c, k, y, x].item() + distance) < 1e-6


def head_scores(head, feats):
    """The head's scores (B, C, h, w) and its unit embeddings i (B, h, w, D), in eval mode."""
    head.eval()
    return head(feats)["scores"], head.embed(feats)


def test_eq3_eq5_head_predicts_the_class_of_the_nearest_prototype():
    torch.manual_seed(0)
    head = ProtoSegHead(8, 4, embed_dim=6, num_prototypes=3, class_layernorm=False)
    scores, embed = head_scores(head, torch.randn(2, 8, 5, 5))
    for b, y, x in itertools.product(range(2), range(5), range(5)):
        distances = [(-(embed[b, y, x] @ head.prototypes[c, k]).item(), c) for c in range(4) for k in range(3)]
        assert scores[b, :, y, x].argmax().item() == min(distances)[1]         # c* of argmin_(c,k) <i, p_ck>


def test_eq6_head_scores_are_minus_s_the_min_distance_over_k():
    torch.manual_seed(1)
    head = ProtoSegHead(8, 5, embed_dim=4, num_prototypes=4, class_layernorm=False)
    scores, embed = head_scores(head, torch.randn(2, 8, 3, 3))
    assert scores.shape == (2, 5, 3, 3)
    for b, y, x, c in itertools.product(range(2), range(3), range(3), range(5)):
        s = min(-(embed[b, y, x] @ head.prototypes[c, k]).item() for k in range(4))   # s_ic = min_k <i, p_ck>
        assert abs(scores[b, c, y, x].item() + s) < 1e-6
    assert scores.min() >= -1 - 1e-6 and scores.max() <= 1 + 1e-6


def test_eq6_class_layernorm_normalises_each_pixels_c_scores():
    torch.manual_seed(2)
    head = ProtoSegHead(8, 5, embed_dim=4, num_prototypes=2)
    with torch.no_grad():
        head.mask_norm.weight.uniform_(0.5, 2), head.mask_norm.bias.uniform_(-1, 1)
    scores, embed = head_scores(head, torch.randn(1, 8, 3, 3))
    minus_s = dot(embed, head.prototypes).amax(-1)                             # (B, h, w, C)
    mean, var = minus_s.mean(-1, keepdim=True), minus_s.var(-1, unbiased=False, keepdim=True)
    expected = (minus_s - mean) / (var + 1e-5).sqrt() * head.mask_norm.weight + head.mask_norm.bias
    torch.testing.assert_close(scores.permute(0, 2, 3, 1), expected, rtol=1e-4, atol=1e-5)


def test_eq7_cross_entropy_matches_transcription_and_skips_ignore():
    torch.manual_seed(0)
    s = torch.rand(2, 3, 4, 4) * 2 - 1                               # distances s in [-1, 1]
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = IGNORE_INDEX
    loss = cross_entropy(-s, labels)
    total, n = 0.0, 0
    for b, y, x in itertools.product(range(2), range(4), range(4)):
        c = labels[b, y, x].item()
        if c == IGNORE_INDEX:
            continue
        p = math.exp(-s[b, c, y, x]) / sum(math.exp(-s[b, j, y, x]) for j in range(3))   # Eq. 6
        total, n = total - math.log(p), n + 1
    assert abs(loss.item() - total / n) < 1e-5


# ----------------------------------------------------------------------------- Eq. 11-13: losses

def test_eq11_ppc_matches_transcription_and_is_ce_over_scaled_similarities():
    embed, protos = unit(6, 4, seed=10), unit(3, 2, 4, seed=11)
    sim = dot(embed, protos).flatten(1)                               # (N, C*K)
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    tau = 0.1
    expected = 0.0
    for n in range(6):
        pos = math.exp((embed[n] @ protos.reshape(6, 4)[target[n]]).item() / tau)
        neg = sum(math.exp((embed[n] @ protos.reshape(6, 4)[j]).item() / tau)
                  for j in range(6) if j != target[n])
        expected -= math.log(pos / (pos + neg))
    assert abs(ppc_loss(sim, target, tau).item() - expected / 6) < 1e-4
    torch.testing.assert_close(ppc_loss(sim, target, 1.0), F.cross_entropy(sim, target))


def test_eq12_ppd_matches_transcription():
    embed, protos = unit(5, 4, seed=12), unit(2, 3, 4, seed=13)
    sim = dot(embed, protos).flatten(1)
    target = torch.tensor([0, 5, 2, 3, 1])
    expected = sum((1 - embed[n] @ protos.reshape(6, 4)[target[n]]).item() ** 2 for n in range(5)) / 5
    assert abs(ppd_loss(sim, target).item() - expected) < 1e-6


def test_eq13_total_loss_is_weighted_sum():
    torch.manual_seed(0)
    head = ProtoSegHead(8, 3, embed_dim=6, num_prototypes=2).train()
    labels = torch.randint(0, 3, (2, 8, 8))
    out = head(torch.randn(2, 8, 8, 8), labels)
    total, terms = seg_loss(out, labels, lambda_ppc=0.01, lambda_ppd=0.001, tau=0.1)
    torch.testing.assert_close(total, terms["ce"] + 0.01 * terms["ppc"] + 0.001 * terms["ppd"])
    torch.testing.assert_close(terms["ppc"], ppc_loss(out["proto_sim"], out["proto_target"], 0.1))
    total.backward()
    assert head.trunk.cls_head[0].weight.grad is not None


def feature_map_fixture():
    """(B, C*K, h, w) similarities with one unlabelled pixel; the labelled pixels' rows (N, C*K) and targets (N,)."""
    g = torch.Generator().manual_seed(20)
    sim = (torch.rand(2, 12, 3, 5, generator=g) * 2 - 1).requires_grad_()      # (B, C*K, h, w)
    target = torch.randint(0, 12, (2, 3, 5), generator=g)
    target[0, 1] = IGNORE_INDEX
    keep = target != IGNORE_INDEX
    return sim, target, sim.permute(0, 2, 3, 1)[keep], target[keep]


def test_eq11_ppc_on_feature_maps_averages_over_labelled_pixels_only():
    sim, target, rows, kept = feature_map_fixture()
    torch.testing.assert_close(ppc_loss(sim, target, tau=0.1), F.cross_entropy(rows / 0.1, kept))
    one = torch.full_like(target, IGNORE_INDEX)
    one[1, 2, 3] = target[1, 2, 3]                                             # one labelled pixel: its own loss
    torch.testing.assert_close(ppc_loss(sim, one, tau=0.1), F.cross_entropy(sim[1, :, 2, 3] / 0.1, target[1, 2, 3]))
    ppc = ppc_loss(sim, torch.full_like(target, IGNORE_INDEX))                 # nothing labelled: 0, zero gradient
    assert ppc == 0 and (torch.autograd.grad(ppc, sim)[0] == 0).all()


def test_eq12_ppd_on_feature_maps_averages_over_labelled_pixels_only():
    sim, target, rows, kept = feature_map_fixture()
    torch.testing.assert_close(ppd_loss(sim, target), (1 - rows.gather(1, kept[:, None])).pow(2).mean())
    one = torch.full_like(target, IGNORE_INDEX)
    one[1, 2, 3] = target[1, 2, 3]                                             # one labelled pixel: its own loss
    torch.testing.assert_close(ppd_loss(sim, one), (1 - sim[1, target[1, 2, 3], 2, 3]) ** 2)
    ppd = ppd_loss(sim, torch.full_like(target, IGNORE_INDEX))
    assert ppd == 0 and (torch.autograd.grad(ppd, sim)[0] == 0).all()


def test_eq7_cross_entropy_is_the_weighted_mean_over_labelled_pixels_and_0_without_any():
    g = torch.Generator().manual_seed(21)
    scores, labels = torch.randn(2, 4, 3, 3, generator=g), torch.randint(0, 4, (2, 3, 3), generator=g)
    labels[1, 0] = IGNORE_INDEX
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5])
    for w in (None, weight):
        torch.testing.assert_close(cross_entropy(scores, labels, w),
                                   F.cross_entropy(scores, labels, weight=w, ignore_index=IGNORE_INDEX))
    assert cross_entropy(scores, torch.full_like(labels, IGNORE_INDEX), weight) == 0


def _transcribed_training_step(head, feats, labels, lambda_ppc, lambda_ppd, tau, mu):
    """The head's training step written out per labelled pixel (boolean selection, (N, C*K) similarities):
    Eq. 6-14 as the equation sheet states them. Returns (total loss, PPC target, new prototypes)."""
    C, K = head.num_classes, head.num_prototypes
    embed = head.embed(feats)                                                  # (B, h, w, D)
    protos = F.normalize(head.prototypes, dim=-1)
    sim = dot(embed, protos)                                                   # (B, h, w, C, K)
    scores = sim.amax(-1).permute(0, 3, 1, 2)                                  # Eq. 6, -s
    keep = labels.flatten() != IGNORE_INDEX
    lab, pix, s = labels.flatten()[keep], embed.flatten(0, 2)[keep], sim.flatten(0, 2)[keep]
    own = s[torch.arange(len(lab)), lab].detach()                              # (N, K)
    assign = torch.cat([one_class(own[lab == c], head.kappa, head.sinkhorn_iters).argmax(1)
                        for c in range(C)])[torch.argsort(torch.argsort(lab, stable=True))]   # class by class
    target = lab * K + assign
    new = momentum_update(head.prototypes, pix.detach(), lab, assign, mu)
    s = s.flatten(1)                                                           # (N, C*K)
    ce = F.cross_entropy(scores, labels, ignore_index=IGNORE_INDEX)            # Eq. 7
    ppc = F.cross_entropy(s / tau, target)                                     # Eq. 11
    ppd = (1 - s.gather(1, target[:, None])).pow(2).mean()                     # Eq. 12
    return ce + lambda_ppc * ppc + lambda_ppd * ppd, target, new               # Eq. 13


def test_eq13_eq14_head_training_step_matches_per_pixel_transcription():
    torch.manual_seed(0)
    head = ProtoSegHead(8, 4, embed_dim=6, num_prototypes=3, class_layernorm=False, dropout=0.0).train()
    ref = ProtoSegHead(8, 4, embed_dim=6, num_prototypes=3, class_layernorm=False, dropout=0.0).train()
    ref.load_state_dict(head.state_dict())
    feats = torch.randn(2, 8, 5, 6)
    labels = torch.randint(0, 3, (2, 5, 6))                                    # class 3 absent
    labels[0, :2] = IGNORE_INDEX
    out = head(feats, labels)
    total, _ = seg_loss(out, labels, lambda_ppc=0.1, lambda_ppd=0.05, tau=0.1)
    head.prototypes.copy_(update_prototypes(head.prototypes, out["embed"], out["update_target"], 0.9))
    ref_total, ref_target, ref_new = _transcribed_training_step(ref, feats, labels, 0.1, 0.05, 0.1, 0.9)
    torch.testing.assert_close(total, ref_total)
    keep = labels != IGNORE_INDEX
    assert torch.equal(out["proto_target"][keep], ref_target) and (out["proto_target"][~keep] == IGNORE_INDEX).all()
    torch.testing.assert_close(head.prototypes, ref_new)
    total.backward()
    ref_total.backward()
    for (name, p), q in zip(head.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# ----------------------------------------------------------------------------- Eq. 14: prototype update

def test_eq14_momentum_update_matches_transcription():
    protos = unit(3, 2, 4, seed=14)
    embed = unit(10, 4, seed=15)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    assign = torch.tensor([0, 1, 0, 0, 0, 0, 0, 1, 1, 1])               # class 2 empty, (1,1) 1 pixel
    for mu in (0.0, 0.3, 0.999, 1.0):
        new = momentum_update(protos, embed, labels, assign, mu)
        for c, k in itertools.product(range(3), range(2)):
            members = [embed[n] for n in range(10) if labels[n] == c and assign[n] == k]
            if not members:
                expected = protos[c, k]                                 # no pixel: unchanged
            else:
                mean = F.normalize(torch.stack(members).mean(0), dim=0)
                expected = F.normalize(mu * protos[c, k] + (1 - mu) * mean, dim=0)
            torch.testing.assert_close(new[c, k], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new.norm(dim=-1), torch.ones(3, 2))
    torch.testing.assert_close(momentum_update(protos, embed, labels, assign, 1.0), protos)


def test_eq14_forward_never_moves_prototypes_the_update_does_and_gets_no_gradient():
    torch.manual_seed(0)
    head = ProtoSegHead(8, 4, embed_dim=6, num_prototypes=3)
    feats = torch.randn(2, 8, 6, 6)
    labels = torch.randint(0, 2, (2, 6, 6))                             # classes 2, 3 absent
    before = head.prototypes.clone()
    assert head.eval()(feats, labels).keys() == {"scores", "embed"}     # eval: nothing for the losses or Eq. 14
    out = head.train()(feats, labels)
    assert torch.equal(head.prototypes, before)                         # no state changed by forward
    head.prototypes.copy_(update_prototypes(head.prototypes, out["embed"], out["update_target"], 0.5))
    assert not torch.equal(head.prototypes[:2], before[:2])
    assert torch.equal(head.prototypes[2:], before[2:])                 # absent classes untouched
    seg_loss(out, labels)[0].backward()
    assert head.prototypes.grad is None and not head.prototypes.requires_grad
    assert out["proto_sim"].shape == (2, 12, 6, 6) and out["proto_target"].max() < 6


def test_head_all_ignored_batch_is_finite_and_moves_nothing():
    head = ProtoSegHead(8, 4, embed_dim=6, num_prototypes=3).train()
    labels = torch.full((2, 4, 4), IGNORE_INDEX)
    before = head.prototypes.clone()
    out = head(torch.randn(2, 8, 4, 4), labels)
    total, terms = seg_loss(out, labels)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    assert torch.equal(head.prototypes, before)


def test_official_switches_update_correct_only_and_layernorms():
    torch.manual_seed(0)
    head = ProtoSegHead(8, 3, embed_dim=6, num_prototypes=2, update_correct_only=True,
                        class_layernorm=True, embed_layernorm=True).train()
    assert head.mask_norm.normalized_shape == (3,) and head.feat_norm.normalized_shape == (6,)
    feats, labels = torch.randn(1, 8, 4, 4), torch.randint(0, 3, (1, 4, 4))
    before = head.prototypes.clone()
    out = head(feats, labels)
    head.prototypes.copy_(update_prototypes(head.prototypes, out["embed"], out["update_target"], 0.0))
    correct = out["scores"].argmax(1).flatten() == labels.flatten()
    touched = {divmod(t.item(), 2) for t in out["proto_target"].flatten()[correct]}
    for c, k in itertools.product(range(3), range(2)):
        assert torch.equal(head.prototypes[c, k], before[c, k]) == ((c, k) not in touched)


# ----------------------------------------------------------------------------- distributed (gloo, 2 ranks)

def _rank_worker(rank, world, port, scores, labels, embed, protos, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    part = slice(rank, None, world)                                    # each rank: every other pixel
    L = sinkhorn(scores[part], labels[part], 4, kappa=0.05, iters=3)
    one = one_class(scores[part][labels[part] == 1], kappa=0.05, iters=3)
    new = momentum_update(protos, embed[part], labels[part], L.argmax(1), momentum=0.5)
    results[rank] = (L, one, new)
    dist.destroy_process_group()


def test_ddp_sinkhorn_and_update_match_single_process():
    g = torch.Generator().manual_seed(16)
    labels = torch.randint(0, 3, (64,), generator=g)                   # class 3 absent
    scores = torch.rand(64, 5, generator=g) * 2 - 1
    embed, protos = unit(64, 6, seed=17), unit(4, 5, 6, seed=18)
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(2, free_port(), scores, labels, embed, protos, results), nprocs=2)
    L = sinkhorn(scores, labels, 4, kappa=0.05, iters=3)
    one = one_class(scores[labels == 1], kappa=0.05, iters=3)
    new = momentum_update(protos, embed, labels, L.argmax(1), momentum=0.5)
    for rank in range(2):
        part = slice(rank, None, 2)
        r_L, r_one, r_new = results[rank]
        torch.testing.assert_close(r_L, L[part])
        torch.testing.assert_close(r_one, one[(torch.arange(64)[labels == 1] % 2) == rank])
        torch.testing.assert_close(r_new, new)                         # identical prototypes on all ranks
