"""The evaluation's test options, each against a transcription: multi-scale (the family's align_corners), the
horizontal flip (the mirrored image's scores flipped back, added; without --eval-flip the image's scores alone),
sliding windows (mmseg's slide_inference), the scores resized back to the label, and the single pass of
evaluate.scores_and_embed against predict_scores. The window grid itself: test_recipes.py."""
import pytest
import torch
import torch.nn.functional as F

import evaluate
import settings
from models import model_from_config


class StridedConv(torch.nn.Module):
    """A 3x3 stride-2 conv (not pointwise: its output depends on the scale), with a family's align_corners."""

    def __init__(self, align_corners):
        super().__init__()
        self.conv, self.align_corners = torch.nn.Conv2d(3, 4, 3, 2, 1), align_corners

    def forward(self, x):
        return {"scores": self.conv(x)}


def scales_transcribed(model, image, scales):
    """sum_s resize(model(resize(image, s)), H x W), every resize with the model's align_corners."""
    H, W = image.shape[-2:]
    ac, total = model.align_corners, 0
    for s in scales:
        x = F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=ac)
        total = total + F.interpolate(model(x)["scores"], (H, W), mode="bilinear", align_corners=ac)
    return total


@pytest.mark.parametrize("align_corners", [True, False])
def test_predict_scores_over_scales_equals_a_transcription(align_corners):
    torch.manual_seed(0)
    model, image = StridedConv(align_corners).eval(), torch.randn(1, 3, 37, 53)
    scales = (0.5, 0.75, 1.0, 1.25)
    with torch.no_grad():
        expected = scales_transcribed(model, image, scales)
        torch.testing.assert_close(evaluate.predict_scores(model, image, 4, scales=scales), expected)
        model.align_corners = not align_corners                # the model's convention is the one used
        assert (evaluate.predict_scores(model, image, 4, scales=scales) - expected).abs().max() > 1e-2


class Pointwise(torch.nn.Module):
    """A 1x1 conv: its scores at a pixel depend on that pixel only."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"scores": self.conv(x)}


def test_sliding_window_and_flip_equal_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    model = Pointwise().eval()
    image = torch.randn(1, 3, 37, 53)
    whole = evaluate.predict_scores(model, image, 4, align_corners=False)
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4, crop=(16, 24), align_corners=False), whole)
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4, flip=True, align_corners=False), 2 * whole)


class Conv3x3(torch.nn.Module):
    """A 3x3 conv, zero-padded, scores at the input's size: each window's scores near its border differ from the
    whole image's, and its kernel has no mirror symmetry (a flipped image's scores, flipped back, differ)."""

    def __init__(self, align_corners=False):
        super().__init__()
        self.conv, self.align_corners = torch.nn.Conv2d(3, 4, 3, padding=1), align_corners

    def forward(self, x):
        return {"scores": self.conv(x)}


def resized(x, size, ac):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=ac)


@pytest.mark.parametrize("ac", [True, False])
@torch.no_grad()
def test_eval_flip_adds_the_mirrored_images_scores_flipped_back_and_without_it_scores_the_image_alone(ac):
    """flip=False: the model's scores of the image, resized to it; flip=True: those plus the scores of the mirrored
    image, mirrored back; with scales, both summed over the scales."""
    torch.manual_seed(0)
    model, image = StridedConv(ac).eval(), torch.randn(1, 3, 37, 53)
    size = image.shape[-2:]
    plain = resized(model(image)["scores"], size, ac)
    mirrored = resized(model(image.flip(-1))["scores"], size, ac).flip(-1)
    assert (plain - mirrored).abs().max() > 1e-2                      # the flip is visible in the scores
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4), plain)
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4, flip=True), plain + mirrored)
    expected = 0
    for s in (0.75, 1.25):
        x = F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=ac)
        expected = expected + resized(model(x)["scores"], size, ac) + resized(model(x.flip(-1))["scores"], size,
                                                                            ac).flip(-1)
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4, scales=(0.75, 1.25), flip=True), expected)


def slide_inference(model, image, crop, stride):
    """mmseg EncoderDecoder.slide_inference, transcribed: every window's scores padded into place, summed, divided
    by how many windows cover each pixel (an image at least as large as the crop)."""
    (H, W), (ch, cw), (sh, sw) = image.shape[-2:], crop, stride
    preds, count = torch.zeros(1, 4, H, W), torch.zeros(1, 1, H, W)
    for i in range(max(H - ch + sh - 1, 0) // sh + 1):
        for j in range(max(W - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            preds += F.pad(model(image[..., y1:y2, x1:x2])["scores"], (x1, W - x2, y1, H - y2))
            count[..., y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def test_sliding_window_scores_are_mmseg_slide_inference_and_flip_adds_the_mirrored_windows():
    torch.manual_seed(0)
    model, image, crop, stride = Conv3x3().eval(), torch.randn(1, 3, 29, 47), (12, 16), (6, 9)
    slid = slide_inference(model, image, crop, stride)
    assert (slid - model(image)["scores"]).abs().max() > 1e-2        # the windows' borders are visible
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4, crop=crop, stride=stride), slid)
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4, crop=crop, stride=stride, flip=True),
                               slid + slide_inference(model, image.flip(-1), crop, stride).flip(-1))


@pytest.mark.parametrize("ac", [True, False])
@torch.no_grad()
def test_eval_scores_are_resized_to_the_label_once_summed(ac):
    """size: the label of an image the test rescaled; the summed scores resized to it with the family's
    align_corners; at the image's own size, nothing resized."""
    torch.manual_seed(0)
    model, image = StridedConv(ac).eval(), torch.randn(1, 3, 37, 53)
    total = evaluate.predict_scores(model, image, 4, flip=True)
    torch.testing.assert_close(evaluate.predict_scores(model, image, 4, flip=True, size=(50, 70)),
                               resized(total, (50, 70), ac))
    assert torch.equal(evaluate.predict_scores(model, image, 4, flip=True, size=(37, 53)), total)


@pytest.mark.parametrize("protocol", [{}, {"eval_flip": True}, {"eval_scales": (0.5, 1.0)},
                                      {"eval_crop": (32, 32), "eval_stride": (16, 16)}])
@torch.no_grad()
def test_evaluation_scores_follow_the_test_protocol_and_embeddings_are_the_images_at_scale_1(protocol):
    """scores_and_embed: the single-pass scores (one forward for scores and embeddings) equal predict_scores at
    the label's size; with flip, scales or a window, predict_scores itself; the embeddings are model.embed."""
    torch.manual_seed(0)
    cfg = settings.Config(backbone="hrnet_tiny", num_classes=5, num_prototypes=3, **protocol)
    model, image, label_size = model_from_config(cfg).eval(), torch.randn(1, 3, 40, 48), (50, 60)
    scores, embed = evaluate.scores_and_embed(model, image, 5, label_size, cfg, True)
    expected = evaluate.predict_scores(model, image, 5, cfg.eval_crop, cfg.eval_scales, cfg.eval_flip,
                                       stride=cfg.eval_stride, size=label_size)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(embed, model.embed(image))
    assert scores.dtype == torch.float32 and scores.shape == (1, 5, *label_size)
