"""Mixed precision: training and evaluation on a GPU run under bf16 autocast, and the code keeps some steps in
float32 on purpose. Here under CPU bf16 autocast (torch.autocast("cpu", dtype=torch.bfloat16), the same casting
rules: convolutions and matrix products in bf16), each float32 island keeps float32 and its values stay within
float32 rounding of the same step computed in float32 from the same inputs."""
import pytest
import torch
import torch.nn.functional as F

import evaluate
import protoseg
import settings
import sinkhorn as sinkhorn_module
from data import SyntheticDataset
from models import model_from_config


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_protoseg(seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = settings.Config(backbone="hrnet_tiny", num_classes=5, num_prototypes=3, **cfg)
    return model_from_config(cfg).eval(), cfg


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def test_evaluation_scores_under_bf16_autocast_are_float32_sums_of_the_models_scores():
    """predict_scores sums the model's (bf16) scores of each scale and flip in float32; the single-pass scores
    are float32 too, resized to the label in float32."""
    model, cfg = tiny_protoseg()
    image = torch.randn(1, 3, 40, 48)
    with bf16():
        plain, mirrored = model(image)["scores"], model(image.flip(-1))["scores"]
        assert plain.dtype == torch.bfloat16                                 # the network runs in bf16
        scores = evaluate.predict_scores(model, image, 5, flip=True)
        fast, embed = evaluate.scores_and_embed(model, image, 5, (50, 60), cfg, True)
    assert scores.dtype == fast.dtype == torch.float32
    torch.testing.assert_close(scores, plain.float() + mirrored.float().flip(-1), rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(fast, F.interpolate(plain.float(), (50, 60), mode="bilinear",
                                                   align_corners=model.align_corners), rtol=1.3e-6, atol=1e-6)
    assert embed.dtype == torch.bfloat16


def test_evaluate_under_bf16_autocast_counts_prototypes_of_the_models_embeddings(monkeypatch):
    """evaluate() with the GPU's autocast on the CPU: the confusion matrix of the float32 scores and the
    prototype counts of the (bf16) embeddings, each as computed from the same forward outside evaluate."""
    model, cfg = tiny_protoseg(workers=0, val_size=2)
    val = SyntheticDataset("val", length=2, size=48)
    monkeypatch.setattr(evaluate, "autocast", lambda amp, device: bf16())
    m = evaluate.evaluate(model, val, cfg, log=lambda *a, **k: None)
    conf, counts = torch.zeros(5, 5, dtype=torch.long), 0
    with torch.no_grad():
        for i in range(2):
            item = val[i]
            with bf16():
                scores, embed = evaluate.scores_and_embed(model, item["image"][None], 5, item["label"].shape, cfg,
                                                          True)
            conf += evaluate.confusion_matrix(scores.argmax(1)[0], item["label"], 5)
            counts = counts + evaluate.prototype_counts(embed[0].float(), item["label"], item["modes"],
                                                        model.head.unit_prototypes(), evaluate.NUM_MODES)
    assert m["iou"] == pytest.approx(evaluate.metrics_from_confusion(conf)["iou"], nan_ok=True)
    summary = evaluate.strict_json(evaluate.prototype_summary(counts))                 # NaN -> None, comparable
    assert evaluate.strict_json({k: m[k] for k in summary}) == summary


# ----------------------------------------------------------------------------- training: Sinkhorn, losses, Eq. 14

def test_sinkhorn_under_bf16_autocast_is_the_float32_sinkhorn_of_the_same_scores_with_autocast_off(monkeypatch):
    g = torch.Generator().manual_seed(0)
    scores = (F.normalize(torch.randn(60, 8, generator=g), dim=1) @ F.normalize(torch.randn(4, 8, generator=g),
                                                                                dim=1).T).bfloat16()
    labels = torch.randint(0, 3, (60,), generator=g)
    inside = []
    real = sinkhorn_module.class_logsumexp
    monkeypatch.setattr(sinkhorn_module, "class_logsumexp",
                        lambda *a, **k: inside.append(torch.is_autocast_enabled("cpu")) or real(*a, **k))
    with bf16():
        got = sinkhorn_module.sinkhorn(scores, labels, 3, kappa=0.05)
    assert inside == [False] * 3                                   # every iteration with autocast off
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sinkhorn_module.sinkhorn(scores.float(), labels, 3, kappa=0.05))


def float32_copy(out):
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def test_losses_and_eq14_of_a_bf16_forward_are_float32_as_from_its_outputs_in_float32():
    """train.py: the forward under autocast, then seg_loss and Eq. 14 outside it on the bf16 outputs. Each term
    (CE, PPC with tau 0.1, PPD) and the new prototypes: float32, equal to the float32 computation from the same
    values within float32 rounding."""
    model, _ = tiny_protoseg(seed=1)
    model.train()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(2, 3, 32, 32, generator=g), torch.randint(-1, 5, (2, 32, 32), generator=g)
    with bf16():
        out = model(images, labels)
    assert out["scores"].dtype == out["proto_sim"].dtype == out["embed"].dtype == torch.bfloat16
    loss, terms = protoseg.seg_loss(out, labels, 0.01, 0.001, tau=0.1)
    ref_loss, ref_terms = protoseg.seg_loss(float32_copy(out), labels, 0.01, 0.001, tau=0.1)
    assert set(terms) == {"ce", "ppc", "ppd"} and loss.dtype == torch.float32
    for name, term in terms.items():
        assert term.dtype == torch.float32, name
        torch.testing.assert_close(term, ref_terms[name], rtol=2e-6, atol=0, msg=name)
    protos = model.head.prototypes
    new = protoseg.update_prototypes(protos, out["embed"], out["update_target"], 0.9)
    assert new.dtype == torch.float32 and (new - protos).abs().max() > 1e-3
    torch.testing.assert_close(new, protoseg.update_prototypes(protos, out["embed"].float(), out["update_target"], 0.9))
