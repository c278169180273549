"""The defaults callers rely on: a head built without settings (bench.py, build_model) is the one settings.Config
describes; the loss functions' defaults are the paper's lambda_1 = 0.01, lambda_2 = 0.001 and tau = 0.1; Eq. 14's
mu is the paper's 0.999; --proto-init data runs 10 rounds of clustering."""
import pytest
import torch

import protoseg
import settings
from conftest import unit


@pytest.mark.parametrize("head", ["protoseg", "softmax", "query"])
def test_a_head_built_without_settings_is_the_configs(head):
    cfg, net = settings.Config(), protoseg.HEADS[head](8, 3)
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout2d)] == [cfg.dropout]
    if head == "protoseg":
        assert (net.num_prototypes, net.kappa, net.sinkhorn_iters, net.update_correct_only, net.local_stats,
                net.normalize_width) == (cfg.num_prototypes, cfg.kappa, cfg.sinkhorn_iters, cfg.update_correct_only,
                                         cfg.local_stats, cfg.normalize_width)
        assert (net.mask_norm is not None, net.feat_norm is not None) == (cfg.class_layernorm, cfg.embed_layernorm)


def test_losses_and_eq14_default_to_the_papers_values():
    g = torch.Generator().manual_seed(0)
    sim, target = torch.rand(12, 6, generator=g) * 2 - 1, torch.randint(-1, 6, (12,), generator=g)
    out = {"scores": torch.randn(12, 3, generator=g), "proto_sim": sim, "proto_target": target}
    labels = torch.randint(0, 3, (12,), generator=g)
    paper = protoseg.seg_loss(out, labels, lambda_ppc=0.01, lambda_ppd=0.001, tau=0.1)[0]
    assert protoseg.seg_loss(out, labels)[0].item() == paper.item()
    assert protoseg.seg_loss(out, labels, tau=0.2)[0].item() != paper.item()            # tau shows in the total
    assert protoseg.ppc_loss(sim, target).item() == protoseg.ppc_loss(sim, target, tau=0.1).item()
    protos, embed, assign = unit(3, 2, 4, seed=1), unit(12, 4, seed=2), torch.randint(0, 2, (12,), generator=g)
    torch.testing.assert_close(protoseg.momentum_update(protos, embed, labels, assign),
                               protoseg.momentum_update(protos, embed, labels, assign, 0.999), rtol=0, atol=0)


def test_data_driven_start_clusters_10_rounds():
    start, embed, labels = unit(3, 4, 8, seed=3), unit(400, 8, seed=4), torch.arange(400) % 3   # still moving at 10
    ten = protoseg.cluster_prototypes(start, embed, labels)
    assert torch.equal(ten, protoseg.cluster_prototypes(start, embed, labels, rounds=10))
    for rounds in (9, 11):
        assert not torch.equal(ten, protoseg.cluster_prototypes(start, embed, labels, rounds=rounds))
