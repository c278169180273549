"""toy2d.py: panel (a) shows the equipartition it claims (Eq. 8-9) and argmax does not; the script writes its files."""
import json

import torch

import toy2d


def test_eq9_sinkhorn_panel_equipartitions_the_unbalanced_class_and_argmax_does_not():
    for dim in (2, 3):
        pts, protos = toy2d.class_on_sphere(dim)
        n, k = len(pts), len(protos)
        hard, _ = toy2d.assignments(pts, protos)
        solved = toy2d.assignments(pts, protos, iters=toy2d.SOLVED)[1]
        torch.testing.assert_close(solved.sum(1), torch.ones(n))                       # each point assigned once
        torch.testing.assert_close(solved.sum(0), torch.full((k,), n / k), rtol=0.01, atol=0)   # Eq. 9: N/K each
        counts = torch.bincount(solved.argmax(1), minlength=k)
        assert ((counts - n / k).abs() <= toy2d.TOLERANCE * n / k).all(), counts
        argmax = torch.bincount(hard, minlength=k)
        assert ((argmax - n / k).abs() > toy2d.TOLERANCE * n / k).any(), argmax
        assert sorted(toy2d.SIZES) != [n // k] * k                                     # the class is unbalanced


def test_toy2d_writes_its_pictures_and_numbers(tmp_path):
    report = toy2d.main(["--out", str(tmp_path), "--steps", "12"])
    for name in ("a_assign.png", "b_kappa.png", "c_momentum.png", "d_losses.png", "train.gif", "toy2d.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "toy2d.json").read_text()) == json.loads(json.dumps(report))
    assert sum(report["a_counts"]["sinkhorn_solved"]) == sum(toy2d.SIZES)
    # kappa: a larger entropy weight gives a softer assignment (Eq. 9)
    confidence = [report["b_mean_max_L"][k] for k in ("0.01", "0.05", "0.2", "1.0")]
    assert confidence == sorted(confidence, reverse=True)
