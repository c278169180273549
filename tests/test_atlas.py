"""atlas.py: the collapse score, and the atlas of a tiny train.py checkpoint and of a release-format file: the files
it writes, and prototype shares equal to a direct count of nearest prototypes."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import atlas
import data
import labels
import settings
from checkpoints import load_model
from models import model_from_config


def test_collapse_score_is_one_for_identical_and_zero_for_orthogonal_prototypes():
    same = torch.randn(1, 16).expand(5, 16)
    assert atlas.collapse_score(same) == pytest.approx(1.0, abs=1e-6)
    assert atlas.collapse_score(torch.eye(5, 16) * 3) == pytest.approx(0.0, abs=1e-6)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert atlas.collapse_score(opposite) == pytest.approx(-1.0)
    assert atlas.collapse_score(torch.randn(1, 8)) is None                  # K = 1: no pair


def direct_shares(path, n_images):
    """Brute force: for each labelled pixel (feature grid, nearest label), its nearest prototype OF ITS CLASS."""
    model, cfg = load_model(path)
    val = data.SyntheticDataset("val", seed=cfg.get("seed", 0))
    protos = F.normalize(model.head.prototypes, dim=-1).numpy()
    C, K, _ = protos.shape
    counts = np.zeros((C, K))
    with torch.no_grad():
        for i in range(n_images):
            item = val[i]
            emb = model.embed(item["image"][None])[0].numpy()              # (h, w, D)
            h, w = emb.shape[:2]
            lab = item["label"].numpy()
            H, W = lab.shape
            for y in range(h):
                for x in range(w):
                    c = lab[int(y * H / h), int(x * W / w)]                 # nearest-neighbour downsampling
                    if c >= 0:
                        counts[c, int(np.argmax(protos[c] @ emb[y, x]))] += 1
    return counts / counts.sum(1, keepdims=True).clip(min=1), counts.sum(1)


def check_atlas(path, out, extra=()):
    report = atlas.main(["--checkpoint", str(path), "--out", str(out), "--val-images", "2", "--images", "1",
                         "--gallery", "2", "--device", "cpu", *extra])
    assert json.loads((out / "atlas.json").read_text()) == report
    html = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "maps_0.png" in pngs and all(f"class_{c}_{n}.png" in pngs for c, n in enumerate(labels.SYNTHETIC_CLASSES))
    assert all(f'src="{p}"' in html for p in pngs)
    shares, pixels = direct_shares(path, 2)
    assert (pixels > 0).sum() >= 3                                        # classes seen in the 2 images
    for c, name in enumerate(labels.SYNTHETIC_CLASSES):
        entry = report["classes"][name]
        assert entry["pixels"] == pixels[c] and (f"gallery_{c}_{name}.png" in pngs) == (pixels[c] > 0)
        if not pixels[c]:
            assert entry["prototype_share"] is None and entry["prototypes_in_use"] is None
            continue
        assert sum(entry["prototype_share"]) == pytest.approx(1.0)
        np.testing.assert_allclose(entry["prototype_share"], shares[c], atol=1e-9)
        assert entry["prototypes_in_use"] == int((shares[c] >= 0.05).sum())
    return report


def test_atlas_of_a_train_py_checkpoint_writes_its_files_and_shares_equal_a_direct_count(tmp_path):
    cfg = {**vars(settings.Config()), "dataset": "synthetic", "backbone": "hrnet_tiny", "num_classes": 5,
           "num_prototypes": 3}
    torch.manual_seed(0)
    path = tmp_path / "last.pt"
    torch.save({"model": model_from_config(cfg).state_dict(), "config": cfg, "iter": 2}, path)   # checkpoints.save_checkpoint's keys
    other = tmp_path / "other" / "metrics.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"classes": {n: {"iou": 0.5} for n in labels.SYNTHETIC_CLASSES}}))
    report = check_atlas(path, tmp_path / "atlas", ["--compare", str(other)])
    assert report["classes"]["background"]["purity"] is not None           # the synthetic set has modes
    assert report["compare"]["iou"]["beta"]["other"] == 0.5 and (tmp_path / "atlas" / "compare.png").is_file()


def test_atlas_of_a_release_format_file_shows_collapsed_prototypes(tmp_path):
    """An official-format file (openseg keys, `module.` prefixes) whose class 'beta' has K identical prototypes."""
    cfg = {**vars(settings.Config()), "backbone": "hrnet18_small_v2", "num_classes": 5, "num_prototypes": 2,
           "embed_layernorm": True}
    torch.manual_seed(0)
    sd = {k.removeprefix("head.").removeprefix("trunk."): v for k, v in model_from_config(cfg).state_dict().items()}
    p = sd["prototypes"][2, 0]                                             # beta: two prototypes almost the same
    sd["prototypes"][2, 1] = F.normalize(p + 0.02 * p.norm() * F.normalize(torch.randn_like(p), dim=0), dim=0)
    path = tmp_path / "hrnet_w18_small_proto.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    report = check_atlas(path, tmp_path / "atlas", ["--dataset", "synthetic"])
    assert report["classes"]["beta"]["collapse"] > 0.99 > max(report["classes"][n]["collapse"] for n in ("alpha", "delta"))


def test_pca_axes_carry_their_share_of_the_variance():
    x = torch.randn(400, 6) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.5, 0.5])
    xy, extra, shares = atlas.pca_2d(x, x[:3])
    np.testing.assert_allclose(xy[:3], extra, atol=1e-6)                   # the prototypes on the same axes
    variance = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)
    np.testing.assert_allclose(shares, (variance[:2] / variance.sum()).numpy(), rtol=1e-4)


def test_gallery_patches_carry_the_true_mode_of_their_pixel(tmp_path):
    cfg = {**vars(settings.Config()), "backbone": "hrnet_tiny", "num_classes": 5, "num_prototypes": 2}
    torch.manual_seed(0)
    model = model_from_config(cfg).eval()
    val = data.SyntheticDataset("val", data.EvalTransform())
    found = atlas.collect(model, val, torch.device("cpu"), limit=1, gallery=1)
    h, w = found["feature_size"]
    for c, per_class in enumerate(found["best"]):
        for _, i, y, x, mode in (t for b in per_class for t in b):
            item = val[i]
            H, W = item["label"].shape
            pixel = (int(y * H / h), int(x * W / w))                        # nearest-neighbour downsampling
            assert item["label"][pixel] == c and item["modes"][pixel] == mode
