"""The head beyond the paper's equations: --proto-init data's clustering (cluster_prototypes) and a dataset whose
ignore value is 255, not the default -1."""
import pytest
import torch
import torch.nn.functional as F

from protoseg import IGNORE_INDEX, ProtoSegHead, cluster_prototypes, momentum_update, seg_loss, update_prototypes
from sinkhorn import sinkhorn
from conftest import unit


# ----------------------------------------------------------------------------- the --proto-init data switch

def test_cluster_prototypes_finds_planted_sub_classes_and_keeps_absent_classes():
    """Known answer: class 0's pixels lie around 3 orthogonal centres (unequal sizes), class 2 around 3 others;
    from a random start, 10 rounds of Sinkhorn + Eq. 14 (mu = 0) put one prototype on each centre. Class 1 has no
    pixel and keeps its start."""
    g = torch.Generator().manual_seed(0)
    dim, centres = 16, torch.eye(16)[:6]
    sizes = [40, 60, 50, 45, 55, 50]
    embed = torch.cat([c + 0.15 * torch.randn(n, dim, generator=g) for c, n in zip(centres, sizes)])
    embed = F.normalize(embed, dim=-1)
    labels = torch.tensor([0] * 150 + [2] * 150)
    start = unit(3, 3, dim, seed=1)
    out = cluster_prototypes(start, embed, labels, kappa=0.05, sinkhorn_iters=3, rounds=10)
    torch.testing.assert_close(out[1], start[1], rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 3))
    for c, cs in ((0, centres[:3]), (2, centres[3:])):
        cos = out[c] @ cs.T                                                    # (K, 3)
        assert sorted(cos.argmax(1).tolist()) == [0, 1, 2]                     # one prototype per centre
        assert cos.amax(1).min() > 0.97
    # one round equals Sinkhorn's argmax, then Eq. 14 with mu = 0, by hand
    protos = F.normalize(start, dim=-1)
    own = torch.einsum("nd,nkd->nk", embed, protos[labels])
    assign = sinkhorn(own, labels, 3, 0.05, 3).argmax(1)
    torch.testing.assert_close(cluster_prototypes(start, embed, labels, rounds=1),
                               momentum_update(start, embed, labels, assign, 0.0))


# ----------------------------------------------------------------------------- ignore value

@pytest.mark.parametrize("update_correct_only", [False, True])
def test_head_with_ignore_index_255_trains_as_the_default_after_mapping_labels(update_correct_only):
    """One training step (forward, Eq. 13 loss, backward, SGD) of a head built with ignore_index=255 on labels
    using 255 equals the step of the default head (-1) on the same labels with 255 -> -1."""
    kw = dict(embed_dim=6, num_prototypes=3, dropout=0.0, update_correct_only=update_correct_only)
    torch.manual_seed(0)
    heads = [ProtoSegHead(8, 4, **kw).train(), ProtoSegHead(8, 4, ignore_index=255, **kw).train()]
    heads[1].load_state_dict(heads[0].state_dict())
    start = heads[0].prototypes.clone()
    feats = torch.randn(2, 8, 5, 6)
    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, :2], labels[1, 3] = IGNORE_INDEX, IGNORE_INDEX
    outs, losses = [], []
    for head, lab, ignore in zip(heads, (labels, labels.where(labels != IGNORE_INDEX, 255)), (IGNORE_INDEX, 255)):
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        out = head(feats, lab)
        loss, _ = seg_loss(out, lab, lambda_ppc=0.1, lambda_ppd=0.05, tau=0.1, ignore_index=ignore)
        loss.backward()
        opt.step()
        head.prototypes.copy_(update_prototypes(head.prototypes, out["embed"], out["update_target"], 0.9))
        outs.append(out), losses.append(loss.detach())
    assert not torch.equal(heads[0].prototypes, start)                         # Eq. 14 moved them
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert torch.equal(outs[0]["proto_target"], outs[1]["proto_target"])
    for (name, a), b in zip(heads[0].state_dict().items(), heads[1].state_dict().values()):
        assert torch.equal(a, b), name                                          # weights and prototypes
