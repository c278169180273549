"""ProtoSeg (Zhou et al., "Rethinking Semantic Segmentation: A Prototype View", CVPR 2022), Sec. 3 in its order:
the parametric baselines (Eq. 1-2), the nonparametric head and its scores (Eq. 3-6), the losses (Eq. 7, 11-13) with
the within-class clustering that gives their targets (Eq. 8-10, sinkhorn.py), and the prototype update (Eq. 14).

One training iteration (train.py):
    out = model(images, labels)             # Eq. 6 scores; Eq. 8-10 each labelled pixel's prototype
    loss, terms = seg_loss(out, labels)     # Eq. 7, 11-13
    loss.backward(); opt.step()
    prototypes <- update_prototypes(prototypes, out["embed"], out["update_target"], mu)   # Eq. 14

Shapes: B batch, C classes, K prototypes per class, D embedding size, h x w feature map, N pixels.
Embeddings i and prototypes p are l2-normalised; the paper's distance is <i, p> = -i^T p (negative cosine).

Where the official code departs from the paper, a switch says so (README, "paper vs official code"); all are off by
default but class_layernorm, on because it gave the higher val mIoU on the default run (RESULTS.md):
  class_layernorm      a learnable LayerNorm over the C class scores of a pixel, used as the logits
  embed_layernorm      a learnable LayerNorm on the embedding before its l2 normalisation
  update_correct_only  only the correctly predicted pixels move the prototypes
  local_stats          Sinkhorn and Eq. 14 on each rank's own pixels, then the prototypes averaged over ranks
  normalize_width      the trunk's output l2-normalised over the width axis, not D (the released checkpoint)
  tau = 1              PPC without temperature (an argument of seg_loss)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from collectives import all_reduce, is_distributed
from labels import IGNORE_INDEX
from layers import labels_to
from sinkhorn import sinkhorn


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


# ----------------------------------------------------------------------------- Eq. 1-2: the parametric baselines

class SoftmaxHead(nn.Module):
    """Eq. 1: p(c|i) = softmax_c(w_c^T i), learnable W: (C, D); Eq. 4 with g_c = w_c and <i, g> = -g^T i."""

    def __init__(self, in_channels, num_classes, embed_dim=None, dropout=0.1):
        super().__init__()
        embed_dim = embed_dim or in_channels
        self.trunk = Trunk(in_channels, embed_dim, dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1, bias=False)       # the C learned w_c

    def forward(self, feats, labels=None):
        """Eq. 1: the logits w_c^T i of p(c|i), i = self.trunk(feats), w_c = row c of self.classifier (a 1x1
        convolution). feats: (B, Din, h, w) -> {"scores": (B, C, h, w)}."""
        return {"scores": self.classifier(self.trunk(feats))}


class QueryHead(nn.Module):
    """Eq. 2: p(c|i) = softmax_c(e_c * i), '*' = cosine, learnable queries E: (C, D); Eq. 4 with g_c = e_c and
    <i, g> = the negative cosine."""

    def __init__(self, in_channels, num_classes, embed_dim=None, dropout=0.1):
        super().__init__()
        embed_dim = embed_dim or in_channels
        self.trunk = Trunk(in_channels, embed_dim, dropout)
        self.queries = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.02)

    def forward(self, feats, labels=None):
        """Eq. 2: the logits e_c * i of p(c|i), the cosine of i = self.trunk(feats) and e_c = self.queries[c].
        feats: (B, Din, h, w) -> {"scores": (B, C, h, w)}, each in [-1, 1]."""
        embed = F.normalize(self.trunk(feats), dim=1)
        return {"scores": torch.einsum("bdhw,cd->bchw", embed, F.normalize(self.queries, dim=1))}


# ----------------------------------------------------------------------------- Eq. 3-6: the nonparametric head

def similarities(embed, prototypes):
    """Eq. 3's distance as a similarity, i^T p_ck = -<i, p_ck>, for every pixel and prototype: embed (B, D, h, w),
    prototypes (C, K, D) unit vectors -> (B, C, K, h, w)."""
    (b, d, h, w), (c, k, _) = embed.shape, prototypes.shape
    sim = prototypes.reshape(c * k, d) @ embed.reshape(b, d, h * w)           # (C*K, D) @ (B, D, h*w)
    return sim.view(b, c, k, h, w)


class ProtoSegHead(nn.Module):
    """C x K prototypes p_ck, a buffer: no gradient reaches them, only Eq. 14 (update_prototypes) moves them.

    forward(feats) -> {"scores": the logits of Eq. 6, "embed": the unit embeddings}. In training with labels it also
    clusters each class's pixels (Eq. 8-10) and returns what the losses (Eq. 11-12) and Eq. 14 need.
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
        # the official start: truncated normal (std 0.02), l2-normalised
        protos = nn.init.trunc_normal_(torch.empty(num_classes, num_prototypes, embed_dim), std=0.02)
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))

    def embed_map(self, feats):
        """The pixel embeddings i, l2-normalised over D: (B, Din, h, w) -> (B, D, h, w)."""
        x = self.trunk(feats)
        if self.normalize_width:                                               # the released checkpoint's axis
            x = F.normalize(x, dim=3)
        if self.feat_norm is not None:                                         # LayerNorm over D of unit vectors
            x = x if self.normalize_width else F.normalize(x, dim=1)
            x = self.feat_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.normalize(x, dim=1)

    def embed(self, feats):
        """The pixel embeddings i, channels last: (B, Din, h, w) -> (B, h, w, D)."""
        return self.embed_map(feats).permute(0, 2, 3, 1)

    def unit_prototypes(self):
        """The prototypes as unit vectors (C, K, D); a buffer loaded from the official release need not be unit."""
        return F.normalize(self.prototypes, dim=-1)

    def class_scores(self, sim):
        """Eq. 6: -s_ic = -min_k <i, p_ck> = max_k i^T p_ck, the logits of p(c|i) = softmax_c(-s_ic); with
        class_layernorm, the LayerNorm of a pixel's C scores. sim: (B, C, K, h, w) -> (B, C, h, w)."""
        scores = sim.amax(2)                           # max(2) keeps int64 indices: +0.03 GB at C = 847
        if self.mask_norm is not None:
            # contiguous: scores upsampled in the permuted layout made the step 0.13 s (7 %) slower at C = 847
            scores = self.mask_norm(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        return scores

    def forward(self, feats, labels=None):
        """-> {"scores" (B, C, h, w), "embed" (B, D, h, w) detached}; in training with labels (B, H, W) also
        "proto_sim" (B, C*K, h, w) i^T p_ck at channel c*K + k, "proto_target" (B, h, w) c_i*K + k_i of Eq. 8-10
        and "update_target": proto_target at the pixels that move their prototype (Eq. 14), IGNORE_INDEX elsewhere."""
        embed = self.embed_map(feats)                                          # i  (B, D, h, w)
        sim = similarities(embed, self.unit_prototypes())                      # i^T p_ck  (B, C, K, h, w)
        scores = self.class_scores(sim)                                        # Eq. 6  (B, C, h, w)
        out = {"scores": scores, "embed": embed.detach()}
        if not (self.training and labels is not None):
            return out
        labels = labels_to(labels, embed.shape[2:])                            # (B, h, w), nearest
        target = sinkhorn_targets(sim.detach(), labels, self.kappa, self.sinkhorn_iters, self.local_stats,
                                  self.ignore_index)                           # Eq. 8-10
        movers = target
        if self.update_correct_only:
            movers = target.where(scores.detach().argmax(1) == labels, IGNORE_INDEX)
        return {**out, "proto_sim": sim.flatten(1, 2), "proto_target": target, "update_target": movers}


HEADS = {"protoseg": ProtoSegHead, "softmax": SoftmaxHead, "query": QueryHead}


# ----------------------------------------------------------------------------- Eq. 7: cross-entropy

def cross_entropy(scores, labels, class_weight=None, ignore_index=IGNORE_INDEX):
    """Eq. 7: L_CE = -log p(c_i|i), p(c|i) = softmax_c(scores), averaged over the labelled pixels; with class
    weights w: sum_i w_ci L_i / sum_i w_ci (as F.cross_entropy). scores (B, C, H, W), labels (B, H, W) -> a float32
    scalar, 0 when no pixel is labelled (F.cross_entropy's own mean is then 0 / 0)."""
    loss = F.cross_entropy(scores.float(), labels, weight=class_weight, ignore_index=ignore_index, reduction="sum")
    labelled = labels != ignore_index
    weights = labelled.float() if class_weight is None else class_weight[labels.clamp(min=0)] * labelled
    return loss / weights.sum().clamp(min=1e-12)


# ----------------------------------------------------------------------------- Eq. 8-10: each pixel's prototype

@torch.no_grad()
def sinkhorn_targets(sim, labels, kappa=0.05, iters=3, local_stats=False, ignore_index=IGNORE_INDEX):
    """Eq. 8-10: k_i = argmax_k L^c[i, k], L^c the Sinkhorn assignment of class c's pixels to its K prototypes;
    returns the PPC / PPD target c_i*K + k_i (B, h, w), IGNORE_INDEX where unlabelled. sim: (B, C, K, h, w);
    labels: (B, h, w). local_stats: each rank clusters its own pixels, else the batch of all ranks."""
    num_classes, num_prototypes = sim.shape[1:3]
    b, y, x = (labels != ignore_index).nonzero(as_tuple=True)                  # the N labelled pixels
    c = labels[b, y, x]                                                        # c_i  (N,)
    own = sim[b, c, :, y, x]                                                   # p_{c_i k}^T i  (N, K)
    assign = sinkhorn(own, c, num_classes, kappa, iters, distributed=not local_stats).argmax(1)   # k_i
    target = torch.full_like(labels, IGNORE_INDEX)
    target[b, y, x] = c * num_prototypes + assign
    return target


# ----------------------------------------------------------------------------- Eq. 11-13: the losses

def ppc_loss(proto_sim, target, tau=0.1, ignore_index=IGNORE_INDEX):
    """Eq. 11: L_PPC = -log [exp(i^T p_{c_i k_i} / tau) / sum_{c,k} exp(i^T p_ck / tau)], the cross-entropy over the
    C*K similarities / tau with target c_i*K + k_i, averaged over the labelled pixels.
    proto_sim: (B, C*K, h, w) or (N, C*K); target: (B, h, w) or (N,) -> a float32 scalar, 0 when none is labelled."""
    loss = F.cross_entropy(proto_sim.float() / tau, target, ignore_index=ignore_index, reduction="sum")
    return loss / (target != ignore_index).sum().clamp(min=1)


def ppd_loss(proto_sim, target, ignore_index=IGNORE_INDEX):
    """Eq. 12: L_PPD = (1 - i^T p_{c_i k_i})^2, averaged over the labelled pixels. proto_sim, target: as ppc_loss
    -> a float32 scalar, 0 when none is labelled."""
    labelled = target != ignore_index
    s = proto_sim.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1).float()    # i^T p_{c_i k_i}
    return ((1 - s) ** 2 * labelled).sum() / labelled.sum().clamp(min=1)


def seg_loss(out, labels, lambda_ppc=0.01, lambda_ppd=0.001, tau=0.1, class_weight=None,
             ignore_index=IGNORE_INDEX, aux_weight=0.4):
    """Eq. 13: L_SEG = L_CE + lambda_1 L_PPC + lambda_2 L_PPD, plus aux_weight times the CE of UperNet's auxiliary
    head (unweighted by class, as mmseg's) when out has "aux_scores". out: the model's output dict (B, C, H, W
    "scores"; for ProtoSeg "proto_sim" and "proto_target"). Returns (L, {term: its detached unweighted value})."""
    terms = {"ce": cross_entropy(out["scores"], labels, class_weight, ignore_index)}
    total = terms["ce"]
    if "proto_target" in out:
        terms["ppc"] = ppc_loss(out["proto_sim"], out["proto_target"], tau)
        terms["ppd"] = ppd_loss(out["proto_sim"], out["proto_target"])
        total = total + lambda_ppc * terms["ppc"] + lambda_ppd * terms["ppd"]
    if "aux_scores" in out:
        terms["aux"] = cross_entropy(out["aux_scores"], labels, None, ignore_index)
        total = total + aux_weight * terms["aux"]
    return total, {name: term.detach() for name, term in terms.items()}


# ----------------------------------------------------------------------------- Eq. 14: the prototype update

@torch.no_grad()
def momentum_update(prototypes, embed, labels, assign, momentum=0.999, distributed=True):
    """Eq. 14: p_ck <- mu p_ck + (1 - mu) i-bar_ck, l2-normalised, i-bar_ck the l2-normalised mean of the pixels
    assigned to p_ck; a prototype without pixels is unchanged. prototypes (C, K, D), embed (N, D) unit, labels and
    assign (N,) -> the new (C, K, D). distributed: the sums and counts over the batch of all ranks."""
    num_classes, num_prototypes, dim = prototypes.shape
    index = labels * num_prototypes + assign                                   # (N,) row c*K + k
    sums = embed.new_zeros(num_classes * num_prototypes, dim, dtype=torch.float32).index_add_(0, index, embed.float())
    counts = sums.new_zeros(len(sums)).index_add_(0, index, sums.new_ones(len(index)))
    if distributed:
        all_reduce(sums)
        all_reduce(counts)
    mean = F.normalize(sums, dim=1)                                            # i-bar_ck  (C*K, D)
    old = prototypes.reshape(-1, dim).float()
    new = F.normalize(momentum * old + (1 - momentum) * mean, dim=1)
    new = torch.where(counts[:, None] > 0, new, old)                           # no pixel: unchanged
    return new.view(num_classes, num_prototypes, dim).to(prototypes.dtype)


@torch.no_grad()
def update_prototypes(prototypes, embed, target, momentum=0.999, local_stats=False):
    """Eq. 14 "after each training iteration", on the model's output: embed (B, D, h, w) unit, target (B, h, w)
    c*K + k of each pixel that moves its prototype, IGNORE_INDEX elsewhere. local_stats: Eq. 14 on this rank's
    pixels, then the prototypes averaged over ranks (the official code). Returns the new (C, K, D)."""
    num_prototypes = prototypes.shape[1]
    moves = target != IGNORE_INDEX
    pixels, target = embed.permute(0, 2, 3, 1)[moves], target[moves]          # (N, D), (N,)
    new = momentum_update(prototypes, pixels, target // num_prototypes, target % num_prototypes, momentum,
                          distributed=not local_stats)
    if local_stats and is_distributed():
        new = F.normalize(all_reduce(new.clone()), dim=-1)
    return new


MU_START = 0.9                        # first mu of the warm-up (--proto-momentum-warmup)


def momentum_at(it, final, warmup=0, start=MU_START):
    """mu of Eq. 14 at iteration it (0-based): linear from `start` to `final` over `warmup` iterations, then final
    (warmup 0: the paper's constant mu)."""
    if it >= warmup or start >= final:
        return final
    return start + (final - start) * it / warmup


# ----------------------------------------------------------------------------- a data-driven start (a switch)

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
        assign = sinkhorn(own, labels, num_classes, kappa, sinkhorn_iters, distributed).argmax(1)
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
