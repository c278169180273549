"""Within-class online clustering of ProtoSeg (Eq. 8-10), by Sinkhorn-Knopp in the log domain.

For one class c with N pixels and K prototypes, Eq. 8 asks for the assignment L (here stored N x K, the
transpose of the paper's K x N) maximising sum_{n,k} L[n,k] * p_k^T i_n subject to
    sum_k L[n,k] = 1      (every pixel is assigned once)
    sum_n L[n,k] = N / K  (equipartition: every prototype takes N/K pixels)
Eq. 9 relaxes L to be non-negative and adds kappa * entropy(L); Eq. 10 gives the solution
    L = diag(u) exp(P^T X / kappa) diag(v),
with u, v found by alternately rescaling the prototype marginals to N/K and the pixel marginals to 1.
Each iteration ends with the pixel step, so after the last step every pixel's row sums to 1 EXACTLY and
every prototype's column sums to N/K only APPROXIMATELY (3 iterations by default, as the official code).

Distributed (as SwAV): the prototype marginals and the per-class pixel counts N are sums over the global
batch (all-reduced); the pixel marginals are local. Two ranks holding half the pixels each therefore get
the same assignment as one rank holding all of them. Without a process group the collectives are no-ops.
"""
import math

import torch

from collectives import all_reduce, is_distributed


@torch.no_grad()
def sinkhorn(scores, kappa=0.05, iters=3, distributed=True):
    """Eq. 8-10 for ONE class: L = diag(u) exp(P^T X / kappa) diag(v), stored transposed as (N, K).

    scores: (N, K) similarities p_k^T i_n of the class's N pixels to its K prototypes. Starting from
    exp(scores / kappa), each of `iters` iterations rescales every prototype's column to sum N/K (equipartition;
    N and the column sums over the global batch when distributed and under a process group), then every pixel's row
    to sum 1. Returns L: (N, K) float32 (also under autocast), rows summing to 1 exactly, columns to N/K
    approximately; finite for small kappa and low-precision scores (work in the log domain).
    A direct transcription kept for reading and for testing the batched version against.
    """
    with torch.autocast(scores.device.type, enabled=False):
        log_l = scores.float() / kappa                                          # log exp(P^T X / kappa)
        num_prototypes = log_l.shape[1]
        n = torch.tensor([log_l.shape[0]], dtype=torch.float32, device=log_l.device)
        sync = distributed and is_distributed()
        if sync:
            all_reduce(n)
        log_prototype_target = torch.log(n.clamp(min=1) / num_prototypes)       # log(N / K)
        for _ in range(iters):
            # prototype marginal: sum_n L[n, k] = N/K (over the global batch)
            m = log_l.amax(0) if log_l.shape[0] else log_l.new_full((num_prototypes,), -math.inf)
            if sync:
                all_reduce(m, "max")
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            col = (log_l - m).exp().sum(0)
            if sync:
                all_reduce(col)
            log_l = log_l - (m + col.log()) + log_prototype_target
            # pixel marginal: sum_k L[n, k] = 1 (local)
            log_l = log_l - log_l.logsumexp(1, keepdim=True)
        return log_l.exp()


@torch.no_grad()
def sinkhorn_batched(scores, labels, num_classes, kappa=0.05, iters=3, distributed=True):
    """Eq. 8-10 for every class at once, with segment sums instead of a Python loop over classes.

    scores: (N, K) similarity of pixel n to the K prototypes of ITS OWN class labels[n].
    labels: (N,) class of each pixel in [0, num_classes). Returns L: (N, K) float32, equal to calling
    sinkhorn() on each class's rows separately: per class c, columns rescaled to N_c / K, then rows to 1, `iters`
    times (N_c and the column sums over the global batch when distributed and under a process group). A class's
    stabilising maximum is its own, so a class far below the others stays finite at small kappa.
    """
    with torch.autocast(scores.device.type, enabled=False):
        log_l = scores.float() / kappa                                          # (N, K)
        num_prototypes = log_l.shape[1]
        sync = distributed and is_distributed()
        counts = log_l.new_zeros(num_classes).index_add_(0, labels, log_l.new_ones(len(labels)))  # (C,) N_c, no sync
        if sync:
            all_reduce(counts)
        log_prototype_target = torch.log(counts.clamp(min=1) / num_prototypes)  # (C,) log(N_c / K)
        index = labels[:, None].expand(-1, num_prototypes)                      # (N, K)
        for _ in range(iters):
            # prototype marginals per (class, prototype): sum_{n in c} L[n, k] = N_c / K
            m = log_l.new_full((num_classes, num_prototypes), -math.inf)
            m = m.scatter_reduce(0, index, log_l, "amax")                       # (C, K) segment max
            if sync:
                all_reduce(m, "max")
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))          # absent classes
            col = torch.zeros_like(m).index_add_(0, labels, (log_l - m[labels]).exp())
            if sync:
                all_reduce(col)
            log_col = m + col.clamp(min=1e-30).log() - log_prototype_target[:, None]
            log_l = log_l - log_col[labels]
            # pixel marginals: sum_k L[n, k] = 1
            log_l = log_l - log_l.logsumexp(1, keepdim=True)
        return log_l.exp()
