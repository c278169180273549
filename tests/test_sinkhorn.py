"""sinkhorn.py, Eq. 8-10: the within-class clustering against a brute-force balanced optimum and a float64
transcription of Eq. 10 run class by class, its marginals, low precision and small kappa (the per-class stabiliser).
Under 2 ranks: test_protoseg.py::test_ddp_sinkhorn_and_update_match_single_process."""
import itertools
import math

import pytest
import torch

from sinkhorn import sinkhorn
from conftest import unit


def one_class(scores, kappa=0.05, iters=3):
    """sinkhorn() on the pixels of a single class."""
    return sinkhorn(scores, torch.zeros(len(scores), dtype=torch.long), 1, kappa, iters)


def sinkhorn_float64(scores, kappa, iters):
    """Eq. 10 for one class as the paper states it, in float64 without a stabiliser: L = exp(P^T X / kappa), then
    `iters` times the columns rescaled to N / K and the rows to 1.  scores (N, K) -> L (N, K)."""
    L = (scores.double() / kappa).exp()
    N, K = L.shape
    for _ in range(iters):
        L = L / L.sum(0, keepdim=True) * (N / K)
        L = L / L.sum(1, keepdim=True)
    return L


# ----------------------------------------------------------------------------- Eq. 8-10: Sinkhorn

def test_eq8_sinkhorn_argmax_equals_brute_force_balanced_optimum():
    for seed in range(5):
        scores = torch.rand(6, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        best, best_value = None, -math.inf
        for perm in set(itertools.permutations([0, 0, 1, 1, 2, 2])):     # all balanced hard L
            value = sum(scores[n, k].item() for n, k in enumerate(perm))  # Tr(L^T P^T X)
            if value > best_value:
                best, best_value = perm, value
        assign = one_class(scores, kappa=0.01, iters=500).argmax(1)
        assert tuple(assign.tolist()) == best


def test_eq9_eq10_sinkhorn_marginals():
    scores = unit(50, 8, seed=5) @ unit(4, 8, seed=6).T             # (N, K) cosines
    L = one_class(scores, kappa=0.05, iters=3)
    torch.testing.assert_close(L.double(), sinkhorn_float64(scores, 0.05, 3), rtol=1e-5, atol=1e-6)
    assert (L >= 0).all()
    torch.testing.assert_close(L.sum(1), torch.ones(50))               # pixel marginal: exact
    assert (L.sum(0) - 50 / 4).abs().max() < 50 / 4                    # prototype marginal: approx
    L = one_class(scores, kappa=0.05, iters=200)
    torch.testing.assert_close(L.sum(0), torch.full((4,), 50 / 4), rtol=1e-3, atol=1e-3)


def test_eq10_equipartition_spreads_pixels_that_all_prefer_one_prototype():
    scores = torch.full((40, 4), -0.5)
    scores[:, 0] = 0.9                                                 # every pixel prefers prototype 0
    scores += 0.01 * torch.rand(40, 4, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(one_class(scores, kappa=0.05, iters=3).argmax(1), minlength=4)
    assert (counts > 0).all(), counts
    assert scores.argmax(1).eq(0).all()                               # greedy argmax: total collapse
    L = one_class(scores, kappa=0.05, iters=100)
    torch.testing.assert_close(L.sum(0), torch.full((4,), 10.0), rtol=1e-3, atol=1e-3)


def test_eq10_every_class_at_once_equals_the_transcription_class_by_class():
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([0] * 13 + [2] * 1 + [3] * 30 + [0] * 4)[torch.randperm(48, generator=g)]
    scores = torch.rand(48, 5, generator=g) * 2 - 1
    for iters in (1, 3):
        L = sinkhorn(scores, labels, num_classes=5, kappa=0.05, iters=iters)
        for c in labels.unique():
            m = labels == c
            torch.testing.assert_close(L[m].double(), sinkhorn_float64(scores[m], 0.05, iters), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_eq10_sinkhorn_is_finite_for_small_kappa_low_precision_and_single_pixel(dtype):
    scores = (unit(30, 8, seed=8) @ unit(10, 8, seed=9).T).to(dtype)
    labels = torch.tensor([0] * 29 + [1])                              # class 1 has a single pixel
    for kappa in (0.05, 0.01):
        L = sinkhorn(scores, labels, 3, kappa=kappa, iters=3)
        assert L.dtype == torch.float32 and torch.isfinite(L).all()
        torch.testing.assert_close(L.sum(1), torch.ones(30))
        assert torch.isfinite(one_class(scores[:1], kappa=kappa)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sinkhorn(scores, labels, 3).dtype == torch.float32


@pytest.mark.parametrize("kappa", [0.01, 0.02])
def test_eq10_one_iteration_at_small_kappa_needs_a_stabiliser_per_class(kappa):
    """Class 0's similarities lie near +0.9, class 1's near -0.9: at kappa 0.01 exp((S - max) / kappa) with one max
    over all pixels would be exp(-180), zero in float32, for every pixel of class 1; the max per class keeps it."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 20 + [1] * 12 + [2] * 7)[torch.randperm(39, generator=g)]
    centre = torch.tensor([0.9, -0.9, 0.0])[labels][:, None]
    scores = centre + 0.1 * (torch.rand(39, 4, generator=g) - 0.5)
    L = sinkhorn(scores, labels, num_classes=3, kappa=kappa, iters=1)
    for c in range(3):
        m = labels == c
        torch.testing.assert_close(L[m].double(), sinkhorn_float64(scores[m], kappa, 1), rtol=1e-5, atol=1e-6)


def test_sinkhorn_defaults_are_the_papers_kappa_0p05_and_3_iterations():
    scores, labels = unit(40, 8, seed=5) @ unit(4, 8, seed=6).T, torch.arange(40) % 3
    assert torch.equal(sinkhorn(scores, labels, 3), sinkhorn(scores, labels, 3, kappa=0.05, iters=3))
    assert not torch.equal(sinkhorn(scores, labels, 3), sinkhorn(scores, labels, 3, kappa=0.04, iters=3))
    assert not torch.equal(sinkhorn(scores, labels, 3), sinkhorn(scores, labels, 3, kappa=0.05, iters=4))
