"""ProtoSeg: nonparametric prototype head, its losses and its prototype update (Eq. 1-7, 11-14).

Shapes: B batch, C classes, K prototypes per class, D embedding size, h x w feature map, N labelled pixels.
Embeddings i and prototypes p are l2-normalised; the paper's distance is <i, p> = -i^T p (negative cosine).
Sinkhorn clustering (Eq. 8-10) lives in sinkhorn.py.

Switches for the official code's departures from the paper (all off by default; README has the table):
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

from sinkhorn import all_reduce, is_distributed, sinkhorn_batched

IGNORE_INDEX = -1   # the ignore label of every label tensor in this project: no class id can be negative


# ----------------------------------------------------------------------------- the math, as functions

def pixel_prototype_similarity(embed, prototypes):
    """i^T p for every pixel and prototype. embed: (..., D), prototypes: (C, K, D) -> (..., C, K)."""
    return torch.einsum("...d,ckd->...ck", embed, prototypes)


def class_distance(embed, prototypes):
    """Eq. 6: s[n, c] = min_k <i_n, p_ck> = -max_k i_n^T p_ck, in [-1, 1].  (..., D) -> (..., C)"""
    return -pixel_prototype_similarity(embed, prototypes).amax(-1)


def nearest_prototype(embed, prototypes):
    """Eq. 3/5: (c*, k*) = argmin_(c,k) <i, p_ck>; the pixel's class is c*.  (..., D) -> two (...)"""
    sim = pixel_prototype_similarity(embed, prototypes)
    best = sim.flatten(-2).argmax(-1)
    num_prototypes = prototypes.shape[1]
    return best // num_prototypes, best % num_prototypes


def ppc_loss(proto_sim, target, tau=0.1):
    """Eq. 11: cross-entropy over the C*K cosine similarities / tau, target index c_i*K + k_i.
    proto_sim: (N, C*K), target: (N,)."""
    if proto_sim.shape[0] == 0:
        return proto_sim.sum() * 0.0
    return F.cross_entropy(proto_sim.float() / tau, target)


def ppd_loss(proto_sim, target):
    """Eq. 12: mean over pixels of (1 - i^T p_{c_i, k_i})^2."""
    if proto_sim.shape[0] == 0:
        return proto_sim.sum() * 0.0
    return (1 - proto_sim.float().gather(1, target[:, None])).pow(2).mean()


def seg_loss(out, labels, lambda_ppc=0.01, lambda_ppd=0.001, tau=0.1, class_weight=None,
             ignore_index=IGNORE_INDEX):
    """Eq. 13: L = L_CE + lambda1 L_PPC + lambda2 L_PPD. Returns (total, {name: detached term}).

    out: class scores (B, C, H, W) used as logits (for ProtoSeg: -s of Eq. 6), or the training dict of
    ProtoSegHead with 'scores', 'proto_sim', 'proto_target'. Eq. 7: L_CE = -log p(c_i | i).
    """
    scores = out["scores"] if isinstance(out, dict) else out
    ce = F.cross_entropy(scores.float(), labels, weight=class_weight, ignore_index=ignore_index)
    if not (labels != ignore_index).any():                     # nothing labelled: CE is nan, use 0
        ce = scores.sum() * 0.0
    terms = {"ce": ce}
    total = ce
    if isinstance(out, dict) and "proto_sim" in out:
        terms["ppc"] = ppc_loss(out["proto_sim"], out["proto_target"], tau)
        terms["ppd"] = ppd_loss(out["proto_sim"], out["proto_target"])
        total = ce + lambda_ppc * terms["ppc"] + lambda_ppd * terms["ppd"]
    return total, {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def momentum_update(prototypes, embed, labels, assign, momentum=0.999, distributed=True):
    """Eq. 14: p_ck <- normalise(mu p_ck + (1 - mu) normalise(mean of the pixels assigned to p_ck)).

    prototypes: (C, K, D) unit vectors; embed: (N, D); labels, assign: (N,) class and prototype of each
    pixel. A prototype with no pixel in the (global) batch is left unchanged. Returns new (C, K, D).
    Under a process group the sums and counts are all-reduced, so every rank gets the same prototypes.
    """
    num_classes, num_prototypes, dim = prototypes.shape
    index = labels * num_prototypes + assign                                   # (N,) flat (c, k)
    stats = embed.new_zeros(num_classes * num_prototypes, dim + 1, dtype=torch.float32)
    stats[:, :dim].index_add_(0, index, embed.float())                         # sum of pixels
    stats[:, dim].index_add_(0, index, torch.ones_like(index, dtype=torch.float32))  # count
    if distributed:
        all_reduce(stats)
    mean = F.normalize(stats[:, :dim], dim=1)                                  # i-bar_ck
    old = prototypes.float().reshape(-1, dim)
    new = F.normalize(momentum * old + (1 - momentum) * mean, dim=1)
    new = torch.where(stats[:, dim:] > 0, new, old)                            # empty: unchanged
    return new.reshape(num_classes, num_prototypes, dim).to(prototypes.dtype)


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
        return self.classifier(self.trunk(feats))                              # (B, C, h, w)


class QueryHead(nn.Module):
    """Eq. 2: p(c|i) = softmax_c(e_c * i), '*' = cosine, learnable queries E: (C, D).
    Eq. 4 with g_c = e_c and <i, g> = negative cosine."""

    def __init__(self, in_channels, num_classes, embed_dim=None, dropout=0.1):
        super().__init__()
        embed_dim = embed_dim or in_channels
        self.trunk = Trunk(in_channels, embed_dim, dropout)
        self.queries = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.02)

    def forward(self, feats, labels=None):
        embed = F.normalize(self.trunk(feats), dim=1)
        return torch.einsum("bdhw,cd->bchw", embed, F.normalize(self.queries, dim=1))


class ProtoSegHead(nn.Module):
    """Nonparametric head: C x K prototypes as a buffer (never learned by SGD, no gradient reaches them).

    forward(feats) -> class scores (B, C, h, w) = -s of Eq. 6 (or LayerNorm of max cosine, official).
    In training with labels (B, H, W) it also clusters (Eq. 8-10), returns what PPC/PPD need, and moves the
    prototypes (Eq. 14) with the batch's embeddings; the losses use the prototypes from before the move.
    """

    def __init__(self, in_channels, num_classes, embed_dim=None, num_prototypes=10, kappa=0.05,
                 sinkhorn_iters=3, momentum=0.999, class_layernorm=False, embed_layernorm=False,
                 update_correct_only=False, local_stats=False, dropout=0.1, ignore_index=IGNORE_INDEX,
                 normalize_width=False):
        super().__init__()
        embed_dim = embed_dim or in_channels
        self.num_classes, self.num_prototypes = num_classes, num_prototypes
        self.kappa, self.sinkhorn_iters, self.momentum = kappa, sinkhorn_iters, momentum
        self.update_correct_only, self.local_stats = update_correct_only, local_stats
        self.ignore_index, self.normalize_width = ignore_index, normalize_width
        self.trunk = Trunk(in_channels, embed_dim, dropout)
        self.feat_norm = nn.LayerNorm(embed_dim) if embed_layernorm else None
        self.mask_norm = nn.LayerNorm(num_classes) if class_layernorm else None
        # official init: truncated normal (std 0.02), then l2-normalised
        protos = nn.init.trunc_normal_(torch.empty(num_classes, num_prototypes, embed_dim), std=0.02)
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))

    def embed(self, feats):
        """Pixel embeddings, l2-normalised: (B, Din, h, w) -> (B, h, w, D)."""
        x = self.trunk(feats).permute(0, 2, 3, 1)                             # (B, h, w, D)
        x = F.normalize(x, dim=2 if self.normalize_width else -1)              # official item 7: over w
        if self.feat_norm is not None:
            x = self.feat_norm(x)
        return F.normalize(x, dim=-1)

    def forward(self, feats, labels=None):
        embed = self.embed(feats)                                              # (B, h, w, D)
        protos = F.normalize(self.prototypes, dim=-1)                          # (C, K, D) a copy
        sim = pixel_prototype_similarity(embed, protos)                        # (B, h, w, C, K)
        class_sim = sim.amax(-1)                                               # -s of Eq. 6  (B, h, w, C)
        scores = self.mask_norm(class_sim) if self.mask_norm is not None else class_sim
        scores = scores.permute(0, 3, 1, 2)                                    # (B, C, h, w)
        if not (self.training and labels is not None):
            return scores
        # labels at the feature resolution (nearest), then only the labelled pixels
        labels = F.interpolate(labels[:, None].float(), size=embed.shape[1:3], mode="nearest")
        labels = labels.long().flatten()
        keep = labels != self.ignore_index
        labels, embed = labels[keep], embed.flatten(0, 2)[keep]               # (N,), (N, D)
        sim = sim.flatten(0, 2)[keep]                                          # (N, C, K)
        with torch.no_grad():
            # Eq. 8-10: cluster each class's pixels onto that class's K prototypes
            own = sim[torch.arange(len(labels), device=sim.device), labels]   # (N, K)
            assign = sinkhorn_batched(own, labels, self.num_classes, self.kappa, self.sinkhorn_iters,
                                      distributed=not self.local_stats).argmax(1)   # k_i
            target = labels * self.num_prototypes + assign                     # flat (c_i, k_i)
            use = (scores.permute(0, 2, 3, 1).flatten(0, 2)[keep].argmax(1) == labels
                   if self.update_correct_only else slice(None))
            new = momentum_update(self.prototypes, embed[use], labels[use], assign[use],
                                  self.momentum, distributed=not self.local_stats)
            if self.local_stats and is_distributed():                         # official: average ranks
                new = F.normalize(all_reduce(new.clone()), dim=-1)
            self.prototypes.copy_(new)
        return {"scores": scores, "proto_sim": sim.flatten(1), "proto_target": target}


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
