"""ProtoSeg: nonparametric prototype head, its losses and its prototype update (Eq. 1-7, 11-14).

One training iteration, as train.py runs it (paper Sec. 3):
    out = model(images, labels)           # head: scores, similarities, Sinkhorn targets (Eq. 5-10)
    loss = seg_loss(out, labels, ...)     # Eq. 7, 11-13 (+ UperNet's aux CE when out has aux_scores)
    loss.backward(); opt.step()
    prototypes <- update_prototypes(prototypes, out["embed"], out["update_target"], mu)   # Eq. 14

Shapes: B batch, C classes, K prototypes per class, D embedding size, h x w feature map, N labelled pixels.
Embeddings i and prototypes p are l2-normalised; the paper's distance is <i, p> = -i^T p (negative cosine).
Sinkhorn clustering (Eq. 8-10) lives in sinkhorn.py. The file reads top to bottom: the equations as training runs
them, the heads, the data-driven start, and last the slow transcriptions of Eq. 3-6, 11 and 12 that the tests
compare the fast code against (training never calls them).

Switches for the official code's departures from the paper (README has the table). All are off by default except
class_layernorm, which is on because it measured better (README):
  class_layernorm      learnable LayerNorm over the C class scores, used as logits (official item 1)
  embed_layernorm      learnable LayerNorm on the embedding before l2 normalisation (official item 2)
  update_correct_only  only correctly predicted pixels move the prototypes (official item 4)
  local_stats          Sinkhorn and Eq. 14 on the local batch, prototypes averaged over ranks (item 6)
  normalize_width      the projection output is l2-normalised over the WIDTH axis, not D (item 7; only to
                       reproduce the released checkpoint)
  PPC without temperature (official item 3) is simply tau = 1 in seg_loss().
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from collectives import all_reduce, is_distributed
from labels import IGNORE_INDEX
from layers import labels_to
from sinkhorn import sinkhorn_batched


# ----------------------------------------------------------------------------- the equations, as training runs them

def l2_normalize(x, dim=-1):
    """F.normalize(x, dim=dim), i.e. x / max(|x|, 1e-12), written as x * rsqrt(max(|x|^2, 1e-24)): the same
    values in half the autograd work (F.normalize's division differentiates both of its operands)."""
    return x * x.pow(2).sum(dim, keepdim=True).clamp(min=1e-24).rsqrt()


def similarity_map(embed, prototypes):
    """i^T p (Eq. 6 before its max over k) for every pixel and prototype, channels first: a 1x1 convolution whose C*K filters are the
    prototypes. embed: (B, D, h, w), prototypes: (C, K, D) -> (B, C*K, h, w), channel c*K + k."""
    return F.conv2d(embed, prototypes.reshape(-1, prototypes.shape[-1], 1, 1))


def cross_entropy(scores, labels, class_weight=None, ignore_index=IGNORE_INDEX):
    """Eq. 7: L_CE = -log p(c_i | i) with p(c|i) = softmax_c(scores[:, c]) (Eq. 6: scores = -s), averaged over the
    labelled pixels; with class_weight w, weighted as F.cross_entropy does: sum w_{c_i} L_i / sum w_{c_i}.

    scores: (B, C, H, W) logits; labels: (B, H, W) class ids, ignore_index where unlabelled; class_weight: (C,) or
    None. Returns a float32 scalar, 0 when no pixel is labelled, without asking the device whether there is one
    (no host sync: no .item(), no data-dependent branch)."""
    loss = F.cross_entropy(scores.float(), labels, weight=class_weight, ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    count = valid.sum() if class_weight is None else (class_weight[labels.clamp(min=0)] * valid).sum()
    return loss / count.clamp(min=1e-12)


@torch.no_grad()
def sinkhorn_targets(proto_sim, labels, num_classes, kappa=0.05, iters=3, local_stats=False,
                     ignore_index=IGNORE_INDEX):
    """Eq. 8-10: each labelled pixel's prototype k_i within its class, as the PPC/PPD target c_i*K + k_i.

    proto_sim: (B, C*K, h, w) similarities to the prototypes; labels: (B, h, w) at the feature resolution,
    ignore_index where unlabelled. local_stats: Sinkhorn on the local batch (official item 6), else its
    marginals are global. Returns (B, h, w), IGNORE_INDEX where unlabelled (whatever the labels' ignore value: a
    target c*K + k may equal it). Every pixel is processed (no data-dependent shapes): unlabelled pixels are
    clustered as an extra class C.
    """
    b, ck, h, w = proto_sim.shape
    num_prototypes = ck // num_classes
    valid = labels != ignore_index
    labels = labels.where(valid, num_classes).flatten()                        # (N,), unlabelled -> C
    sim = proto_sim.view(b, num_classes, num_prototypes, h * w)
    index = labels.clamp(max=num_classes - 1).view(b, 1, 1, h * w).expand(-1, -1, num_prototypes, -1)
    own = sim.gather(1, index).squeeze(1).transpose(1, 2).reshape(-1, num_prototypes)   # (N, K) own class
    assign = sinkhorn_batched(own, labels, num_classes + 1, kappa, iters, distributed=not local_stats).argmax(1)
    return (labels * num_prototypes + assign).view(b, h, w).where(valid, IGNORE_INDEX)


CHANNEL_BLOCK = 512   # PPC's forward sums exp over the C*K channels in blocks this wide (temporaries stay small)


class PrototypeLosses(torch.autograd.Function):
    """Eq. 11 and 12 together, storing nothing of size C*K but the similarities themselves: the forward
    reads them in channel blocks, the backward writes softmax(sim / tau) into ONE new tensor and adds both
    targets' terms in place. F.cross_entropy would keep log_softmax (another C*K-sized tensor) and its
    backward allocates three more."""

    @staticmethod
    def forward(ctx, proto_sim, target, tau, ignore_index):
        """Returns (L_PPC, L_PPD), two float32 scalars. With s = proto_sim[:, t] = i^T p_{c_i, k_i}, t = c_i*K + k_i:
        Eq. 11: L_PPC = mean over labelled pixels of log sum_{C*K} exp(i^T p / tau) - s / tau;
        Eq. 12: L_PPD = mean over labelled pixels of (1 - s)^2; both 0 when no pixel is labelled.
        proto_sim: (B, C*K, h, w); target: (B, h, w), ignore_index where unlabelled. Saves in ctx what backward
        needs; reads proto_sim in blocks of CHANNEL_BLOCK channels (no other C*K-sized tensor)."""
        valid = target != ignore_index
        t = target.clamp(min=0).unsqueeze(1)                                        # (B, 1, h, w)
        s_t = proto_sim.gather(1, t).squeeze(1).float()                             # i^T p_{c_i, k_i}
        m = proto_sim.amax(1, keepdim=True).float()                                 # max over C*K, for exp
        sum_exp = torch.zeros_like(m)                                               # sum exp((sim - m) / tau)
        for block in proto_sim.split(CHANNEL_BLOCK, dim=1):                         # no C*K-sized temporary
            sum_exp += block.float().sub(m).mul_(1 / tau).exp_().sum(1, keepdim=True)
        sum_exp = sum_exp.squeeze(1)
        lse = m.squeeze(1) / tau + sum_exp.log()                                    # log sum_{C*K} exp(sim / tau)
        n = valid.sum().clamp(min=1)
        ppc = ((lse - s_t / tau) * valid).sum() / n                                 # Eq. 11
        ppd = ((1 - s_t).pow(2) * valid).sum() / n                                  # Eq. 12
        ctx.save_for_backward(proto_sim, t, valid, s_t, lse, n)
        ctx.tau = tau
        return ppc, ppd

    @staticmethod
    def backward(ctx, g_ppc, g_ppd):
        """Returns d(g_ppc L_PPC + g_ppd L_PPD) / d proto_sim, (B, C*K, h, w), and None for target, tau, ignore_index.
        At a labelled pixel (n of them): g_ppc / (n tau) (softmax_{C*K}(proto_sim / tau) - onehot(t)) from Eq. 11,
        plus -2 g_ppd (1 - s) / n at the target channel t from Eq. 12; 0 at unlabelled pixels."""
        proto_sim, t, valid, s_t, lse, n = ctx.saved_tensors
        tau = ctx.tau
        w = valid / n                                                               # d mean / d pixel
        grad = torch.add(-lse.unsqueeze(1), proto_sim, alpha=1 / tau)               # the one C*K-sized tensor
        grad.exp_().mul_((g_ppc * w / tau).unsqueeze(1))                            # softmax part of Eq. 11
        at_target = (-g_ppc / tau - 2 * g_ppd * (1 - s_t)) * w                       # -1/tau (Eq. 11), Eq. 12
        grad.scatter_add_(1, t, at_target.unsqueeze(1))
        return grad.to(proto_sim.dtype), None, None, None


def prototype_losses(proto_sim, target, tau=0.1, ignore_index=IGNORE_INDEX):
    """(L_PPC, L_PPD) of Eq. 11-12, equal in value and gradient to (ppc_loss, ppd_loss): here in one autograd
    node (PrototypeLosses), lean in memory. proto_sim: (B, C*K, h, w) similarities i^T p_ck, channel c*K + k;
    target: (B, h, w) c_i*K + k_i, ignore_index where unlabelled. Returns two float32 scalars."""
    return PrototypeLosses.apply(proto_sim, target, tau, ignore_index)


def seg_loss(out, labels, lambda_ppc=0.01, lambda_ppd=0.001, tau=0.1, class_weight=None,
             ignore_index=IGNORE_INDEX, aux_weight=0.4):
    """Eq. 13: L = L_CE + lambda1 L_PPC + lambda2 L_PPD (+ aux_weight L_CE(aux) for UperNet's auxiliary head,
    unweighted by class as mmseg's). Returns (total, {name: detached unweighted term}).

    out: the output dict of SegModel (or of a head): 'scores' (B, C, H, W) used as logits (for ProtoSeg: -s of
    Eq. 6); in training, for ProtoSeg, 'proto_sim' (B, C*K, h, w) and 'proto_target' (B, h, w); 'aux_scores'
    (B, C, H, W) when the model has an aux head.
    """
    terms = {}
    if "proto_sim" in out:
        # before CE: backward then frees CE's full-resolution tensors before it builds the C*K-sized gradient
        ppc, ppd = prototype_losses(out["proto_sim"], out["proto_target"], tau)    # targets: IGNORE_INDEX
    terms["ce"] = total = cross_entropy(out["scores"], labels, class_weight, ignore_index)
    if "proto_sim" in out:
        terms.update(ppc=ppc, ppd=ppd)
        total = total + lambda_ppc * ppc + lambda_ppd * ppd
    if "aux_scores" in out:
        terms["aux"] = cross_entropy(out["aux_scores"], labels, None, ignore_index)
        total = total + aux_weight * terms["aux"]
    return total, {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def momentum_update(prototypes, embed, labels, assign, momentum=0.999, distributed=True):
    """Eq. 14: p_ck <- normalise(mu p_ck + (1 - mu) i-bar_ck), i-bar_ck = normalise(mean of the pixels assigned
    to p_ck).

    prototypes: (C, K, D) unit vectors; embed: (N, D); labels, assign: (N,) class and prototype of each
    pixel, labels < 0 (IGNORE_INDEX) for pixels that move nothing. A prototype with no pixel in the (global)
    batch is left unchanged. Returns new (C, K, D) in the prototypes' dtype (computed in float32). With distributed
    and a process group the per-prototype sums and counts are all-reduced (collectives.all_reduce, a no-op without
    one), so every rank gets the same prototypes.
    """
    num_classes, num_prototypes, dim = prototypes.shape
    size = num_classes * num_prototypes
    index = torch.where(labels >= 0, labels * num_prototypes + assign, size)   # (N,) flat (c, k); skipped: row C*K
    # sums as (D, C*K) columns: index_add_ over the pixel axis reads channels-first embeddings without a transpose
    sums = embed.new_zeros(dim, size + 1, dtype=torch.float32).index_add_(1, index, embed.float().T)
    counts = sums.new_zeros(size + 1).index_add_(0, index, sums.new_ones(len(index)))   # no bincount: it syncs on CUDA
    stats = torch.cat([sums, counts[None]])[:, :size].T                        # (C*K, D + 1) sums | count
    if distributed:
        stats = all_reduce(stats.contiguous())
    mean = F.normalize(stats[:, :dim], dim=1)                                  # i-bar_ck
    old = prototypes.float().reshape(-1, dim)
    new = F.normalize(momentum * old + (1 - momentum) * mean, dim=1)
    new = torch.where(stats[:, dim:] > 0, new, old)                            # empty: unchanged
    return new.reshape(num_classes, num_prototypes, dim).to(prototypes.dtype)


@torch.no_grad()
def update_prototypes(prototypes, embed, target, momentum=0.999, local_stats=False):
    """Eq. 14 "after each training iteration": every prototype moves to the mean of the pixels assigned to it.

    prototypes: (C, K, D); embed: (B, D, h, w) the step's unit embeddings; target: (B, h, w) c*K + k of each
    pixel that moves a prototype, IGNORE_INDEX (< 0) for the others; momentum: mu of this iteration.
    local_stats: Eq. 14 on the local batch, then the prototypes averaged over ranks (official item 6).
    Returns the new (C, K, D).
    """
    num_classes, num_prototypes, dim = prototypes.shape
    target = target.flatten()
    labels = torch.where(target >= 0, target // num_prototypes, -1)            # (N,) class, -1: moves nothing
    pixels = embed.transpose(0, 1).reshape(dim, -1).T                         # (N, D), a view of (D, N) memory
    new = momentum_update(prototypes, pixels, labels, target.clamp(min=0) % num_prototypes, momentum,
                          distributed=not local_stats)
    if local_stats and is_distributed():                                      # official: average the ranks
        new = F.normalize(all_reduce(new.clone()), dim=-1)
    return new


MU_START = 0.9                        # first mu of the warm-up (--proto-momentum-warmup)


def momentum_at(it, final, warmup=0, start=MU_START):
    """mu of Eq. 14 for iteration it (0-based): linear from `start` to `final` over `warmup` iterations, then final
    (warmup 0: the paper's constant mu)."""
    if it >= warmup or start >= final:
        return final
    return start + (final - start) * it / warmup


# ----------------------------------------------------------------------------- heads

class Trunk(nn.Module):
    """The official head before the classifier: 3x3 conv-BN-ReLU-Dropout(0.1), then 1x1 conv-ReLU-1x1 conv.
    Module names follow the official ProtoSeg checkpoint (cls_head.*, proj_head.proj.*)."""

    def __init__(self, in_channels, embed_dim, dropout=0.1):
        super().__init__()
        self.cls_head = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1),
            nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)),
            nn.Dropout2d(dropout))
        self.proj_head = nn.ModuleDict({"proj": nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, embed_dim, 1))})

    def forward(self, feats):                                                  # (B, Din, h, w)
        return self.proj_head["proj"](self.cls_head(feats))                    # (B, D, h, w)


class SoftmaxHead(nn.Module):
    """Eq. 1: p(c|i) = softmax_c(w_c^T i), learnable W: (C, D). Eq. 4 with g_c = w_c, <i, g> = -g^T i."""

    def __init__(self, in_channels, num_classes, embed_dim=None, dropout=0.1):
        super().__init__()
        embed_dim = embed_dim or in_channels
        self.trunk = Trunk(in_channels, embed_dim, dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1, bias=False)       # the C learned w_c

    def forward(self, feats, labels=None):
        """Eq. 1: the logits of p(c|i) = softmax_c(w_c^T i), i = self.trunk(feats) (not normalised), w_c the rows
        of self.classifier (a 1x1 convolution). feats: (B, Din, h, w) -> {"scores": (B, C, h, w)}."""
        return {"scores": self.classifier(self.trunk(feats))}                  # (B, C, h, w)


class QueryHead(nn.Module):
    """Eq. 2: p(c|i) = softmax_c(e_c * i), '*' = cosine, learnable queries E: (C, D).
    Eq. 4 with g_c = e_c and <i, g> = negative cosine."""

    def __init__(self, in_channels, num_classes, embed_dim=None, dropout=0.1):
        super().__init__()
        embed_dim = embed_dim or in_channels
        self.trunk = Trunk(in_channels, embed_dim, dropout)
        self.queries = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.02)

    def forward(self, feats, labels=None):
        """Eq. 2: the logits of p(c|i) = softmax_c(e_c * i), '*' the cosine of i = self.trunk(feats) and the query
        e_c = self.queries[c]. feats: (B, Din, h, w) -> {"scores": (B, C, h, w)}, each in [-1, 1]."""
        embed = F.normalize(self.trunk(feats), dim=1)
        return {"scores": torch.einsum("bdhw,cd->bchw", embed, F.normalize(self.queries, dim=1))}


class ProtoSegHead(nn.Module):
    """Nonparametric head: C x K prototypes as a buffer (never learned by SGD, no gradient reaches them).

    forward(feats) -> {"scores": class scores (B, C, h, w) = -s of Eq. 6 (or LayerNorm of max cosine, official
    item 1)}. In training with labels (B, H, W) it also clusters (Eq. 8-10) and adds what the losses (Eq. 11-13)
    and the prototype update need; it never changes the prototypes: the training loop applies Eq. 14
    (update_prototypes) after the optimiser step. class_layernorm is on by default, as train.py's Config.
    """

    def __init__(self, in_channels, num_classes, embed_dim=None, num_prototypes=10, kappa=0.05,
                 sinkhorn_iters=3, class_layernorm=True, embed_layernorm=False, update_correct_only=False,
                 local_stats=False, dropout=0.1, ignore_index=IGNORE_INDEX, normalize_width=False):
        super().__init__()
        embed_dim = embed_dim or in_channels
        self.num_classes, self.num_prototypes = num_classes, num_prototypes
        self.kappa, self.sinkhorn_iters = kappa, sinkhorn_iters
        self.update_correct_only, self.local_stats = update_correct_only, local_stats
        self.ignore_index, self.normalize_width = ignore_index, normalize_width
        self.trunk = Trunk(in_channels, embed_dim, dropout)
        self.feat_norm = nn.LayerNorm(embed_dim) if embed_layernorm else None
        self.mask_norm = nn.LayerNorm(num_classes) if class_layernorm else None
        # official init: truncated normal (std 0.02), then l2-normalised
        protos = nn.init.trunc_normal_(torch.empty(num_classes, num_prototypes, embed_dim), std=0.02)
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))

    def embed_map(self, feats):
        """Pixel embeddings, l2-normalised, channels first: (B, Din, h, w) -> (B, D, h, w)."""
        x = self.trunk(feats)                                                  # (B, D, h, w)
        if self.normalize_width:                                               # official 7: l2 over w, not D
            x = l2_normalize(x, dim=3)
        if self.feat_norm is not None:                                         # LayerNorm over D (official 2)
            x = x if self.normalize_width else l2_normalize(x, dim=1)
            x = self.feat_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return l2_normalize(x, dim=1)

    def embed(self, feats):
        """Pixel embeddings, l2-normalised: (B, Din, h, w) -> (B, h, w, D)."""
        return self.embed_map(feats).permute(0, 2, 3, 1)

    def unit_prototypes(self):
        """(C, K, D) unit vectors: the only place they are normalised for reading (a buffer loaded from the
        official release need not be unit; the official forward normalises it too)."""
        return F.normalize(self.prototypes, dim=-1)

    def classify(self, embed):
        """Eq. 6: -s_{i,c} = -min_k <i, p_ck> = max_k i^T p_ck, the class scores used as logits.

        embed: (B, D, h, w) unit embeddings i. Returns (scores (B, C, h, w), sim (B, C*K, h, w)): sim = i^T p_ck
        for the prototypes self.unit_prototypes() at channel c*K + k (similarity_map); scores = -s, or, when
        self.mask_norm is set (official item 1), that LayerNorm over the C scores of each pixel."""
        sim = similarity_map(embed, self.unit_prototypes())                                    # i^T p  (B, C*K, h, w)
        class_sim = sim.unflatten(1, (self.num_classes, self.num_prototypes)).max(2).values  # -s, Eq. 6 (B, C, h, w)
        scores = class_sim
        if self.mask_norm is not None:                                         # LayerNorm over C (official 1)
            scores = self.mask_norm(class_sim.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return scores, sim

    def forward(self, feats, labels=None):
        """-> {"scores": (B, C, h, w)}; in training with labels also proto_sim (B, C*K, h, w), proto_target
        (B, h, w) = c_i*K + k_i of Eq. 8-10, and for Eq. 14 embed (B, D, h, w, detached) and update_target
        (proto_target where the pixel moves its prototype, IGNORE_INDEX elsewhere)."""
        embed = self.embed_map(feats)                                          # (B, D, h, w)
        scores, sim = self.classify(embed)
        if not (self.training and labels is not None):
            return {"scores": scores}
        labels = labels_to(labels, embed.shape[2:])                            # (B, h, w), nearest
        target = sinkhorn_targets(sim.detach(), labels, self.num_classes, self.kappa, self.sinkhorn_iters,
                                  self.local_stats, self.ignore_index)
        movers = target
        if self.update_correct_only:                                           # official item 4
            movers = target.where(scores.detach().argmax(1) == labels, IGNORE_INDEX)
        return {"scores": scores, "proto_sim": sim, "proto_target": target, "embed": embed.detach(),
                "update_target": movers}


HEADS = {"protoseg": ProtoSegHead, "softmax": SoftmaxHead, "query": QueryHead}


# ----------------------------------------------------------------------------- data-driven start (a switch)

@torch.no_grad()
def cluster_prototypes(prototypes, embed, labels, kappa=0.05, sinkhorn_iters=3, rounds=10, distributed=True):
    """K prototypes per class from one batch: balanced spherical k-means built from the paper's own steps.

    Each round: assign every pixel to one of its class's K prototypes by Sinkhorn (Eq. 8-10, equipartition),
    then set each prototype to the normalised mean of its pixels (Eq. 14 with mu = 0). Starts from `prototypes`;
    a class without pixels (or a prototype that gets none) keeps its start. Not in the paper, which starts random.
    prototypes: (C, K, D) unit vectors; embed: (N, D) unit vectors; labels: (N,). Returns new (C, K, D).
    """
    num_classes = prototypes.shape[0]
    for _ in range(rounds):
        protos = F.normalize(prototypes.float(), dim=-1)
        own = torch.einsum("nd,nkd->nk", embed.float(), protos[labels])               # (N, K) own class
        assign = sinkhorn_batched(own, labels, num_classes, kappa, sinkhorn_iters, distributed).argmax(1)
        prototypes = momentum_update(prototypes, embed, labels, assign, 0.0, distributed)
    return prototypes


@torch.no_grad()
def data_prototypes(model, images, labels, kappa=0.05, sinkhorn_iters=3, distributed=True):
    """--proto-init data: the prototypes from cluster_prototypes on one batch's embeddings (model: a SegModel
    with a ProtoSeg head, in training mode: BatchNorm uses batch statistics; dropout is off for this pass)."""
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in drops:
        m.eval()
    embed = model.embed(images)                                                # (B, h, w, D)
    for m in drops:
        m.train()
    lab = labels_to(labels, embed.shape[1:3]).flatten()
    keep = lab != model.head.ignore_index
    return cluster_prototypes(model.head.prototypes, embed.flatten(0, 2)[keep], lab[keep], kappa, sinkhorn_iters,
                              distributed)


# ----------------------------------------------------------------------------- slow transcriptions (for the tests)
# Each equation written as directly as the paper states it. Training never calls these: the tests compare the
# fast code above against them (ProtoSegHead.classify against class_distance / nearest_prototype,
# prototype_losses against ppc_loss / ppd_loss, in value and gradient).

def pixel_prototype_similarity(embed, prototypes):
    """i^T p for every pixel and prototype. embed: (..., D), prototypes: (C, K, D) -> (..., C, K)."""
    return torch.einsum("...d,ckd->...ck", embed, prototypes)


def class_distance(embed, prototypes):
    """Eq. 6: s[n, c] = min_k <i_n, p_ck> = -max_k i_n^T p_ck, in [-1, 1], with <i, p> = -i^T p.
    embed: (..., D) unit vectors, prototypes: (C, K, D) unit vectors -> s: (..., C)."""
    return -pixel_prototype_similarity(embed, prototypes).amax(-1)


def nearest_prototype(embed, prototypes):
    """Eq. 3/5: (c*, k*) = argmin_(c,k) <i, p_ck> = argmax_(c,k) i^T p_ck over all C*K prototypes; the pixel's
    class is c* (winner takes all). embed: (..., D), prototypes: (C, K, D) -> (c*, k*), two (...) int64 tensors."""
    sim = pixel_prototype_similarity(embed, prototypes)
    best = sim.flatten(-2).argmax(-1)
    num_prototypes = prototypes.shape[1]
    return best // num_prototypes, best % num_prototypes


def ppc_loss(proto_sim, target, tau=0.1, ignore_index=IGNORE_INDEX):
    """Eq. 11: L_PPC = -log [exp(i^T p_{c_i,k_i} / tau) / sum over all C*K prototypes p of exp(i^T p / tau)], i.e.
    cross-entropy over the C*K cosine similarities / tau with target index c_i*K + k_i, averaged over the labelled
    pixels (0 when there is none). proto_sim: (N, C*K) or (B, C*K, h, w); target: (N,) or (B, h, w), ignore_index
    where unlabelled. Returns a float32 scalar. The transcription; seg_loss uses prototype_losses, equal in value
    and gradient (tested)."""
    loss = F.cross_entropy(proto_sim.float() / tau, target, ignore_index=ignore_index, reduction="sum")
    return loss / (target != ignore_index).sum().clamp(min=1)


def ppd_loss(proto_sim, target, ignore_index=IGNORE_INDEX):
    """Eq. 12: L_PPD = (1 - i^T p_{c_i, k_i})^2, averaged over the labelled pixels (0 when there is none).
    proto_sim, target: shapes as ppc_loss, the target's similarity read at index c_i*K + k_i. Returns a float32
    scalar."""
    valid = target != ignore_index
    s = proto_sim.float().gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)    # i^T p_{c_i, k_i}
    return ((1 - s).pow(2) * valid).sum() / valid.sum().clamp(min=1)
