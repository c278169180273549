"""Mixed precision: training and evaluation on a GPU run under bf16 autocast, and the code keeps some steps in
float32 on purpose. Here under CPU bf16 autocast (torch.autocast("cpu", dtype=torch.bfloat16), the same casting
rules: convolutions and matrix products in bf16), each float32 island keeps float32 and its values stay within
float32 rounding of the same step computed in float32 from the same inputs."""
import pytest
import torch
import torch.nn.functional as F

import evaluate
import settings
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
    image, size = torch.randn(1, 3, 40, 48), (40, 48)
    with bf16():
        plain, mirrored = model(image)["scores"], model(image.flip(-1))["scores"]
        assert plain.dtype == torch.bfloat16                                 # the network runs in bf16
        scores = evaluate.predict_scores(model, image, 5, flip=True)
        fast, embed = evaluate.scores_and_embed(model, image, 5, (50, 60), cfg, True)
        class_scores = model.head.classify(model.head.embed_map(model.features(image)))[0]
    assert scores.dtype == fast.dtype == torch.float32
    torch.testing.assert_close(scores, plain.float() + mirrored.float().flip(-1), rtol=1.3e-6, atol=1e-6)
    at_image = F.interpolate(class_scores, size, mode="bilinear", align_corners=model.align_corners).float()
    torch.testing.assert_close(fast, F.interpolate(at_image, (50, 60), mode="bilinear",
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
