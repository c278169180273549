"""Input that is fine on its own but does not fit the rest of the command: a checkpoint and data of other classes,
flags that exclude each other or do nothing in the chosen mode, outputs that would land on an input or on each
other. Each is one `error:` line naming both things (exit 1), given before any work; nothing is written. Tiny
checkpoints, in-process calls; the few pictures drawn are 24x32."""
import os

import numpy as np

import atlas
import bench
import coursework
import predict
import settings
import train
from conftest import save_image, tiny_checkpoint, user_error


def tiny(path, **config):
    return tiny_checkpoint(path, backbone="hrnet_tiny", num_prototypes=3, **{"num_classes": 5, **config})


def cityscapes_layout(root, label=b""):
    """One val frame in Cityscapes' layout; its label file is empty (damaged) unless given."""
    save_image(root / "leftImg8bit/val/city/city_0_0_leftImg8bit.png", np.zeros((8, 16, 3)))
    (root / "gtFine/val/city").mkdir(parents=True)
    (root / "gtFine/val/city/city_0_0_gtFine_labelIds.png").write_bytes(label)
    return root


def folder_layout(root, n=2):
    for i in range(n):
        save_image(root / f"images/{i}.png", np.zeros((24, 32, 3)))
        save_image(root / f"masks/{i}.png", np.zeros((24, 32)))
    return root


def test_a_checkpoint_meeting_data_of_other_classes_is_refused_before_the_data_is_read(tmp_path, capsys):
    ckpt = tiny(tmp_path / "synthetic.pt", dataset="synthetic")
    data = cityscapes_layout(tmp_path / "city")                     # its label file would fail the file check
    msg = user_error(capsys, train.main, ["--eval-only", "--resume", str(ckpt), "--dataset", "cityscapes",
                                          "--data-root", str(data), "--workers", "0"])
    assert msg.startswith(f"error: checkpoint {ckpt} predicts 5 classes (synthetic); --dataset cityscapes has 19; "
                          "expected data of the checkpoint's classes (--dataset synthetic")
    msg = user_error(capsys, train.main, ["--resume", str(ckpt), "--allow-changes", "--dataset", "synthetic_modes",
                                          "--out-dir", str(tmp_path / "run"), "--workers", "0"])
    assert "predicts 5 classes (synthetic); --dataset synthetic_modes has 15" in msg
    msg = user_error(capsys, atlas.main, ["--checkpoint", str(ckpt), "--dataset", "synthetic_modes",
                                          "--out", str(tmp_path / "a")])
    assert msg == (f"error: --dataset synthetic_modes has 15 classes; {ckpt} has 5 (synthetic); expected the "
                   "checkpoint's data (--dataset synthetic and its --data-root)\n")
    msg = user_error(capsys, predict.main, ["--checkpoint", str(ckpt), str(data), "--labelids", "--out",
                                            str(tmp_path / "p")])
    assert "--labelids needs a Cityscapes checkpoint" in msg
    assert not any((tmp_path / d).exists() for d in ("run", "a", "p"))


def test_flags_that_exclude_each_other_are_refused_naming_both(tmp_path, capsys):
    msg = user_error(capsys, settings.parse_args, ["--resume", "auto", "--overwrite"])
    assert msg.startswith("error: --resume auto and --overwrite exclude each other: --resume continues the run in "
                          "runs/synthetic, --overwrite starts it over; expected one of them")
    msg = user_error(capsys, coursework.main, ["--check", str(tmp_path), "--out", str(tmp_path / "hw")])
    assert msg.startswith(f"error: --out {tmp_path / 'hw'}: goes with --blank, and --check does not use it")


def test_flags_that_do_nothing_in_the_chosen_mode_are_refused_in_every_script(tmp_path, capsys):
    """The one rule: a flag the mode would ignore is refused, naming it, its value and the mode; the same value the
    checkpoint was made with changes nothing (the run's own command line, run again) and passes."""
    ckpt = tiny(tmp_path / "last.pt", dataset="synthetic", iters=7, pretrained=str(tmp_path / "w.pth"))
    evaluate = ["--eval-only", "--resume", str(ckpt)]
    msg = user_error(capsys, settings.resolve, *settings.parse_args(evaluate + ["--lr", "0.5", "--crop", "64"]))
    assert msg.startswith(f"error: --eval-only evaluates {ckpt} and trains nothing, so it would ignore --crop 64 64, "
                          "--lr 0.5; expected none of them with --eval-only")
    cfg, _ = settings.resolve(*settings.parse_args(evaluate + ["--iters", "7", "--val-size", "1"]))
    assert cfg.eval_only and cfg.val_size == 1
    (tmp_path / "w2.pth").write_bytes(b"x")
    msg = user_error(capsys, settings.resolve, *settings.parse_args(["--resume", str(ckpt), "--pretrained",
                                                                     str(tmp_path / "w2.pth")]))
    assert f"--pretrained {tmp_path / 'w2.pth'}: a resumed run takes its weights from --resume {ckpt}" in msg
    assert "--allow-changes lets a resumed run take new settings" in user_error(
        capsys, settings.parse_args, ["--allow-changes"])
    assert user_error(capsys, settings.parse_args, ["--eval-stride", "8"]).startswith(
        "error: --eval-stride 8 8: used with --eval-crop only, which is --eval-crop 0 0 here")
    assert "--eval-divisor 32: used with --eval-resize only" in user_error(
        capsys, settings.parse_args, ["--eval-divisor", "32"])
    softmax = tiny(tmp_path / "softmax.pt", head="softmax")
    msg = user_error(capsys, predict.main, ["--checkpoint", str(softmax), "--val-index", "0", "--class", "1",
                                            "--out", str(tmp_path / "p")])
    assert msg == "error: --class 1 chooses the class of the prototype map, and a 'softmax' head has no " \
                  "prototypes; expected no --class\n"
    msg = user_error(capsys, predict.main, ["--checkpoint", str(softmax), "--val-index", "0", "--eval-stride", "8",
                                            "--out", str(tmp_path / "p")])
    assert msg.startswith("error: --eval-stride 8 8: the stride of a sliding window, and --eval-crop is 0")
    msg = user_error(capsys, atlas.main, ["--checkpoint", str(ckpt), "--data-root", str(tmp_path),
                                          "--out", str(tmp_path / "a")])
    assert msg.startswith(f"error: --data-root {tmp_path}: --dataset synthetic (the checkpoint's unless --dataset "
                          "says otherwise) is generated and reads no files")
    assert "--repeats 3: the timed steps of row (f), which only `bench.py vocab` measures" in user_error(
        capsys, bench.parse_args, ["sinkhorn", "--repeats", "3"])
    assert "--time-limit 5.0: goes with --check, and --blank does not use it" in user_error(
        capsys, coursework.main, ["--blank", "14", "--out", str(tmp_path / "hw"), "--time-limit", "5"])
    assert "--out x: goes with --blank, and --list does not use it" in user_error(
        capsys, coursework.main, ["--list", "--out", "x"])
    assert not any((tmp_path / d).exists() for d in ("p", "a", "hw"))


def test_two_inputs_of_one_name_are_refused_naming_both_and_sub_folders_are_kept(tmp_path, capsys):
    ckpt = tiny(tmp_path / "tiny.pt", head="softmax")
    image = np.random.default_rng(0).integers(0, 255, (24, 32, 3))
    a, b = save_image(tmp_path / "in/a/x.png", image), save_image(tmp_path / "in/b/x.png", image)
    out = tmp_path / "out"
    for given in ([a, b], [a.parent, b.parent]):
        msg = user_error(capsys, predict.main, ["--checkpoint", str(ckpt), *map(str, given), "--out", str(out)])
        assert msg.startswith(f"error: inputs {a} and {b} would both write {out / 'x_png'}_*.png; expected inputs of "
                              "distinct names: give their common folder (its sub-folders are kept)")
    assert not out.exists()
    written, _ = predict.main(["--checkpoint", str(ckpt), str(tmp_path / "in"), str(a), "--out", str(out)])
    assert written == 2                                             # a/x.png met twice, read once
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_pred.png")) == ["a/x_pred.png", "b/x_pred.png"]


def test_an_output_folder_never_holds_or_sits_inside_the_inputs(tmp_path, capsys):
    softmax = tiny(tmp_path / "tiny.pt", head="softmax")
    inputs = folder_layout(tmp_path / "data")
    for out in (inputs, inputs / "images" / "pred"):
        msg = user_error(capsys, predict.main, ["--checkpoint", str(softmax), str(inputs), "--out", str(out)])
        assert msg.startswith(f"error: --out {out} is inside the input folder {inputs}: a later run on {inputs} "
                              "would read these pictures back as inputs")
    city = tiny(tmp_path / "city.pt", dataset="cityscapes", num_classes=19)
    frame = cityscapes_layout(tmp_path / "cs") / "leftImg8bit/val/city/city_0_0_leftImg8bit.png"
    frame = frame.rename(frame.with_name("city_0_0.png"))           # --labelids writes NAME.png beside it
    msg = user_error(capsys, predict.main, ["--checkpoint", str(city), str(frame), "--labelids",
                                            "--out", str(frame.parent)])
    assert msg.startswith(f"error: {frame} is an input and would be overwritten by an output of this command")
    folder = ["--dataset", "folder", "--num-classes", "2", "--data-root", str(inputs), "--workers", "0"]
    msg = user_error(capsys, train.main, folder + ["--out-dir", str(inputs / "images")])
    assert msg.startswith(f"error: --out-dir {inputs / 'images'} is inside {inputs / 'images'}, a folder of "
                          f"--data-root {inputs} that the data is read from")
    folder_ckpt = tiny(tmp_path / "folder.pt", dataset="folder", num_classes=2)
    msg = user_error(capsys, atlas.main, ["--checkpoint", str(folder_ckpt), "--dataset", "folder", "--data-root",
                                          str(inputs), "--out", str(inputs / "masks" / "atlas")])
    assert f"--out {inputs / 'masks' / 'atlas'} is inside {inputs / 'masks'}, a folder of --data-root" in msg
    assert sorted(os.listdir(inputs / "images")) == ["0.png", "1.png"]      # nothing written among the data


def test_a_run_never_writes_its_checkpoint_over_its_weights_or_another_runs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    weights = tiny(run / "last.pt", out_dir=str(run), iters=1)
    msg = user_error(capsys, settings.resolve, *settings.parse_args(["--out-dir", str(run), "--overwrite",
                                                                     "--pretrained", str(weights)]))
    assert msg.startswith(f"error: --pretrained {weights} is the last.pt that --overwrite replaces in --out-dir {run}")
    copy = tiny(tmp_path / "backup.pt", out_dir=str(run), iters=1, seed=1)  # made in run/, kept elsewhere
    msg = user_error(capsys, settings.resolve, *settings.parse_args(["--resume", str(copy)]))
    assert msg.startswith(f"error: --resume {copy} would continue in --out-dir {run} over its last.pt, another "
                          f"checkpoint; expected the checkpoint's own folder (--out-dir {tmp_path}) or a new --out-dir")
    cfg, _ = settings.resolve(*settings.parse_args(["--resume", str(copy), "--out-dir", str(tmp_path / "new")]))
    assert cfg.out_dir == str(tmp_path / "new") and cfg.resume == str(copy)
