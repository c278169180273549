"""predict.py on a tiny checkpoint: the files it writes, their sizes, the predicted classes' colours; broken images
skipped; one output name per input."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
import datafiles
import draw
import evaluate
import labels
import predict
from checkpoints import load_model
from conftest import save_image, tiny_checkpoint, user_error


def test_predict_writes_pictures_and_skips_broken_images(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", num_prototypes=3, num_classes=5, backbone="hrnet_tiny")
    rng = np.random.default_rng(0)
    good = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(good[0])
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(good[1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:                              # exit 1: one input failed
        predict.main(["--checkpoint", str(ckpt), str(good[0]), str(broken), str(good[1]), "--out", str(out),
                      "--class", "alpha"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"skipping {broken}" in err
    model, _ = load_model(ckpt)
    for path, (h, w) in zip(good, [(45, 61), (32, 40)]):
        for kind in ("pred", "overlay", "protos"):
            img = Image.open(out / f"{path.stem}_{kind}.png")
            assert img.size == (w, h) and img.mode == "RGB"
        with torch.no_grad():                                      # the synthetic preset's test: whole image, RGB
            pred = evaluate.predict_scores(model, data.normalize(datafiles.read_image(path))[None], 5).argmax(1)[0]
        assert len(pred.unique()) > 1                              # a picture of one colour would prove little
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{path.stem}_pred.png")),
                                      labels.SYNTHETIC_PALETTE[pred.numpy()])
    assert not (out / "broken_pred.png").exists()


def test_prototype_colours_are_distinct():
    colours = draw.prototype_colours(10)
    assert len({tuple(c) for c in colours.round(3)}) == 10


def test_val_index_puts_the_synthetic_scene_on_disk_and_a_strip_with_its_legend(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", num_prototypes=3, backbone="hrnet_tiny", num_classes=5)
    cfg = torch.load(ckpt, weights_only=True)["config"]
    predict.main(["--checkpoint", str(ckpt), "--val-index", "3", "--out", str(tmp_path / "out")])
    scene = data.SyntheticDataset("val", seed=cfg["seed"]).load(3)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out/val_000003_image.png")), scene)
    strip = Image.open(tmp_path / "out/val_000003_strip.png")
    assert strip.width >= 3 * scene.shape[1] and strip.height > 2 * scene.shape[0]      # three panels + legend
    assert "note: the map of" in capsys.readouterr().err                               # random prototypes: dark
    assert "outside the synthetic val set" in user_error(
        capsys, predict.main, ["--checkpoint", str(ckpt), "--val-index", "100", "--out", str(tmp_path / "out")])


def test_dark_note_when_the_class_barely_resembles_its_prototypes_or_is_not_predicted():
    mask = torch.tensor([True, True, False])
    assert predict.dark_note(torch.tensor([0.05, 0.1, 0.9]), mask, "alpha").startswith("note: the map of alpha")
    assert predict.dark_note(torch.tensor([0.8, 0.7, 0.0]), mask, "alpha") is None
    absent = predict.dark_note(torch.tensor([0.9, 0.9, 0.9]), mask & False, "alpha")     # an all-black map
    assert absent.startswith("note: the map of alpha is dark: no pixel of this image is predicted as alpha")


def test_predict_names_every_output_uniquely(tmp_path):
    for name in ("a.jpg", "a.png", "sub/b.png"):
        save_image(tmp_path / "in" / name, np.zeros((4, 4, 3)))
    names = predict.output_names([str(tmp_path / "in")])
    assert sorted(str(s) for _, s in names) == ["a_jpg", "a_png", "sub/b"]


def test_classes_without_a_table_are_named_as_training_names_them(tmp_path):
    """A folder dataset's classes (and an official file's with other than 19 classes): as train.py prints them."""
    save_image(tmp_path / "images/a.png", np.zeros((4, 4, 3)))
    save_image(tmp_path / "masks/a.png", np.zeros((4, 4)))
    trained = data.build_dataset("folder", tmp_path, num_classes=3)
    names, palette = predict.class_table({"dataset": "folder", "num_classes": 3})
    assert names == trained.class_names == ["class0", "class1", "class2"]
    np.testing.assert_array_equal(palette, trained.palette)
