"""The scripts around train.py (predict.py, atlas.py, toy2d.py, bench.py) and every loader of a model, given what a
new user gives them: weights that are not numbers, empty or odd files where a checkpoint or an image belongs, flags
out of range, an output folder that cannot take the files, Ctrl-C and SIGTERM. Each ends in a clean run or one line
naming the file or flag and what was expected (exit 1, or 130 / 143 when stopped), and no file is left half-written.
Tiny models and images; the stops are sent once the script has reached the state they test."""
import errno
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time
from multiprocessing import resource_sharer

import numpy as np
import pytest
import torch
from PIL import Image

import atlas
import bench
import checkpoints
import commands
import datafiles
import models
import predict
import settings
import toy2d
import train
from conftest import TINY, save_image, start_as_a_terminal_would, tiny_checkpoint, user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
# The most a script may take to reach a state or to end on a busy machine: a ceiling against a hang, never a
# duration a test relies on (each wait goes on as soon as its state is there).
PATIENCE = 300


def tiny(path, **config):
    return tiny_checkpoint(path, backbone="hrnet_tiny", num_classes=5, num_prototypes=3, **config)


def left_behind(folder):
    """Temporary files of an interrupted or failed write (commands.Outputs: .NAME.part.EXT)."""
    return [p.name for p in pathlib.Path(folder).rglob(".*.part*")]


def all_whole(folder):
    """Every picture in folder decodes completely."""
    for p in pathlib.Path(folder).rglob("*.png"):
        with Image.open(p) as im:
            im.load()
    return True


# ----------------------------------------------------------------------------- weights that are not numbers

def poisoned(tmp_path, key="head.prototypes", value=float("nan")):
    path = tiny(tmp_path / "nan.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"][key].view(-1)[1] = value
    torch.save(ckpt, path)
    return path


def test_every_model_loader_refuses_nan_or_inf_weights_naming_file_and_tensor(tmp_path, capsys):
    path = poisoned(tmp_path)
    named = f"checkpoint {path}: head.prototypes holds 1 NaN and 0 Inf of its"
    assert named in user_error(capsys, train.main, ["--eval-only", "--resume", str(path), "--val-size", "1"])
    assert named in user_error(capsys, train.main, TINY + ["--resume", str(path), "--out-dir", str(tmp_path / "r")])
    assert named in user_error(capsys, predict.main, ["--checkpoint", str(path), "--val-index", "0",
                                                      "--out", str(tmp_path / "p")])
    assert named in user_error(capsys, atlas.main, ["--checkpoint", str(path), "--out", str(tmp_path / "a")])
    assert not (tmp_path / "p").exists() and not (tmp_path / "a").exists()           # nothing drawn
    buffer = poisoned(tmp_path, "backbone.bn1.running_var", float("inf"))              # a buffer, not a weight
    with pytest.raises(checkpoints.CheckpointError, match="backbone.bn1.running_var holds 0 NaN and 1 Inf"):
        checkpoints.load_model(buffer)


def test_pretrained_backbone_weights_that_are_not_numbers_are_refused(tmp_path, capsys):
    model = models.model_from_config({**vars(settings.Config()), "backbone": "hrnet_tiny", "num_classes": 5})
    sd = model.backbone.state_dict()
    sd["conv1.weight"].view(-1)[0] = float("inf")
    torch.save(sd, tmp_path / "imagenet.pth")
    msg = user_error(capsys, train.main, TINY + ["--pretrained", str(tmp_path / "imagenet.pth"), "--iters", "1",
                                                 "--out-dir", str(tmp_path / "run")])
    assert f"--pretrained {tmp_path / 'imagenet.pth'}" in msg and "conv1.weight holds 0 NaN and 1 Inf" in msg


def test_official_format_file_with_nan_is_refused_by_its_own_key_names(tmp_path):
    sd = {"prototypes": torch.zeros(2, 1, 4), "cls_head.0.weight": torch.zeros(1),
          "backbone.conv1.weight": torch.zeros(1)}                # the official layout's marks, no more
    sd["prototypes"][0, 0, 0] = float("nan")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "release.pth")
    with pytest.raises(checkpoints.CheckpointError, match=r"release.pth: prototypes holds 1 NaN"):
        checkpoints.load_checkpoint(tmp_path / "release.pth")


# ----------------------------------------------------------------------------- empty and odd files

def test_an_empty_or_non_regular_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "zero.pt").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.pt")
    out = ["--val-index", "0", "--out", str(tmp_path / "p")]
    assert f"checkpoint {tmp_path / 'zero.pt'} is empty (0 bytes)" in user_error(
        capsys, predict.main, ["--checkpoint", str(tmp_path / "zero.pt"), *out])
    assert "a named pipe (FIFO), not a regular file" in user_error(
        capsys, predict.main, ["--checkpoint", str(tmp_path / "pipe.pt"), *out])
    assert "is empty (0 bytes)" in user_error(capsys, atlas.main, ["--checkpoint", str(tmp_path / "zero.pt")])
    msg = user_error(capsys, train.main, ["--eval-only", "--resume", str(tmp_path / "pipe.pt")])
    assert f"--resume {tmp_path / 'pipe.pt'}: a named pipe (FIFO)" in msg
    msg = user_error(capsys, settings.parse_args, ["--pretrained", str(tmp_path / "pipe.pt")])
    assert "a named pipe (FIFO), not a regular file, expected a weights file" in msg


def test_non_regular_inputs_named_like_images_are_skipped_by_name_never_waited_for(tmp_path):
    """A named pipe would block the read forever: given directly or met in a folder, it is skipped with its name,
    as is a broken link; the real image is drawn (exit 1: something was skipped)."""
    ckpt = tiny(tmp_path / "tiny.pt", head="softmax")
    folder = tmp_path / "in"
    save_image(folder / "good.png", np.random.default_rng(0).integers(0, 255, (24, 32, 3)))
    os.mkfifo(folder / "pipe.png")
    os.symlink(tmp_path / "missing.png", folder / "link.png")
    os.mkfifo(tmp_path / "given.jpg")
    out = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(ckpt), str(folder),
                          str(tmp_path / "given.jpg"), "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    for name in (folder / "pipe.png", tmp_path / "given.jpg"):
        assert f"skipping {name}: cannot read it as an image (unreadable image in {name}: a named pipe" in out.stderr
    assert f"skipping {folder / 'link.png'}" in out.stderr and "wrote 1 image(s)" in out.stdout
    assert (tmp_path / "out/good_strip.png").is_file() and all_whole(tmp_path / "out")
    with pytest.raises(datafiles.DatasetError, match="a named pipe"):              # training data: the same check
        datafiles.read_label(folder / "pipe.png")


def test_cmyk_jpeg_is_read_as_rgb_close_to_what_it_shows(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (16, 24, 3)).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    read = datafiles.read_image(tmp_path / "cmyk.jpg")
    assert read.shape == (16, 24, 3) and np.abs(read.astype(int) - rgb).mean() < 12


# ----------------------------------------------------------------------------- flags: one line, named, exit 1

@pytest.mark.parametrize("script, flags, named", [
    (predict, ["--val-index", "-1"], "argument --val-index: -1 must be a finite number >= 0"),
    (predict, ["--val-index", "0", "--eval-scales", "0"], "argument --eval-scales: 0 must be"),
    (predict, ["--val-index", "0", "--eval-scales", "nan"], "argument --eval-scales: nan must be a finite"),
    (predict, ["--val-index", "0", "--eval-crop", "-4"], "argument --eval-crop: -4 must be"),
    (predict, ["--val-index", "0", "--eval-crop", "1", "2", "3"], "--eval-crop takes N or H W, got 3 numbers"),
    (predict, ["--val-index", "0", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (predict, ["--val-index", "0", "--device", "cuda:99"], "argument --device: cuda:99"),
    (atlas, ["--images", "-1"], "argument --images: -1 must be a finite number >= 0"),
    (atlas, ["--gallery", "two"], "argument --gallery: 'two' is not an integer"),
    (atlas, ["--val-images", "-2"], "argument --val-images: -2 must be"),
    (atlas, ["--dataset", "voc"], "argument --dataset: invalid choice: 'voc'"),
    (atlas, ["--data-root", "/nowhere/at/all"], "--data-root /nowhere/at/all: not found, expected the dataset's"),
    (toy2d, ["--steps", "-3"], "argument --steps: -3 must be a finite number > 0"),
    (toy2d, ["--steps", "0"], "argument --steps: 0 must be"), (toy2d, ["--dim", "4"], "argument --dim: invalid choice"),
    (bench, ["--repeats", "0"], "argument --repeats: 0 must be a finite number > 0"),
    (bench, ["--device", "tpu"], "argument --device"), (bench, ["all"], "argument only: invalid choice: 'all'")])
def test_every_flag_of_the_picture_scripts_is_range_checked_where_parsed(script, flags, named, tmp_path, capsys):
    ckpt = ["--checkpoint", str(tmp_path / "absent.pt")] if script in (predict, atlas) else []
    assert named in user_error(capsys, script.parse_args, ckpt + flags)


def test_out_that_is_a_file_is_refused_by_every_picture_script(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for script, extra in ((predict, ["--checkpoint", "x.pt", "--val-index", "0"]), (atlas, ["--checkpoint", "x.pt"]),
                          (toy2d, [])):
        msg = user_error(capsys, script.parse_args, extra + ["--out", str(tmp_path / "file")])
        assert f"--out {tmp_path / 'file'} is a file, expected a folder" in msg


def test_flag_error_from_the_command_line_is_one_line_exit_1():
    out = subprocess.run([sys.executable, "toy2d.py", "--steps", "-3"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: argument --steps: -3 must be a finite number > 0")


# ----------------------------------------------------------------------------- the output side

def test_a_full_disk_is_one_line_naming_folder_and_errno_and_leaves_no_half_file(tmp_path):
    """A file size limit makes the kernel refuse the larger pictures (EFBIG), as a full disk does (ENOSPC)."""
    ckpt = tiny(tmp_path / "tiny.pt", head="softmax")
    save_image(tmp_path / "noise.png", np.random.default_rng(0).integers(0, 255, (48, 64, 3)))
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
    out = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(ckpt), str(tmp_path / "noise.png"),
                          "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=limit, timeout=PATIENCE)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    folder = re.escape(str(tmp_path / "out"))
    failed = re.match(rf"error: cannot write to {folder} \((noise_\w+\.png)\): File too large \(EFBIG\) while "
                      r"predicting .*noise.png \(image 1 of 1\); ", out.stderr)
    assert failed and not (tmp_path / "out" / failed[1]).exists(), out.stderr
    kept = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert f"; {len(kept)} file(s) written" in out.stderr or not kept and "; nothing written to" in out.stderr
    assert all_whole(tmp_path / "out") and not left_behind(tmp_path / "out")


def test_no_space_for_atlas_json_leaves_no_half_json_and_says_what_was_written(tmp_path, capsys, monkeypatch):
    ckpt = tiny(tmp_path / "tiny.pt")
    real = pathlib.Path.write_text

    def full_disk(self, text, *a, **kw):                   # half the bytes reach the disk, then it is full
        real(self, text[:len(text) // 2], *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    msg = user_error(capsys, atlas.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), "--val-images",
                                          "1", "--images", "0", "--gallery", "1"])
    assert msg.startswith(f"error: cannot write to {tmp_path / 'a'} (atlas.json): No space left on device (ENOSPC)")
    assert "while writing atlas.json" in msg and "file(s) written to" in msg
    assert not (tmp_path / "a/atlas.json").exists() and not left_behind(tmp_path / "a")
    assert all_whole(tmp_path / "a") and (tmp_path / "a/class_0_background.png").is_file()


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    msg = user_error(capsys, toy2d.main, ["--out", str(tmp_path / "file/sub"), "--steps", "1"])
    assert msg.startswith(f"error: cannot write to {tmp_path / 'file/sub'} (a_assign.png): Not a directory (ENOTDIR)")
    assert "nothing written to" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        msg = user_error(capsys, toy2d.main, ["--out", str(tmp_path / "ro"), "--steps", "1"])
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert msg.startswith(f"error: cannot write to {tmp_path / 'ro'} (a_assign.png): Permission denied (EACCES)")


def test_an_image_too_large_for_memory_is_skipped_naming_it_and_the_flags_that_fit(tmp_path):
    ckpt = tiny(tmp_path / "tiny.pt", head="softmax")
    save_image(tmp_path / "big.png", np.zeros((40, 60, 3)))
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))     # any allocation policy
    out = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(ckpt), str(tmp_path / "big.png"),
                          "--eval-scales", "3000", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                         text=True, preexec_fn=limit, timeout=PATIENCE)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"skipping {tmp_path / 'big.png'}: out of memory at 60x40 (WxH) with --eval-scales "
                                 "3000.0") and "--eval-crop 512" in out.stderr
    assert not left_behind(tmp_path / "out")


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM

def test_a_workers_lost_tensor_transfer_is_not_printed_other_errors_are():
    """A DataLoader worker's resource_sharer thread fails with a closed connection when the main process stops
    mid-transfer: commands' sys.excepthook drops that in a worker (another pid), prints it in the main process, and
    prints every other error."""
    def raised(error, filename):
        def fn():
            raise error
        fn.__code__ = fn.__code__.replace(co_filename=filename)      # a frame of that file, as the thread has
        try:
            fn()
        except Exception as e:
            return type(e), e, e.__traceback__

    printed, worker, main = [], os.getpid() + 1, os.getpid()
    for error, filename, owner in ((ConnectionResetError(104, "reset"), resource_sharer.__file__, worker),
                                   (EOFError(), resource_sharer.__file__, worker),
                                   (ValueError("a bug"), resource_sharer.__file__, worker),
                                   (ConnectionResetError(104, "elsewhere"), __file__, worker),
                                   (BrokenPipeError(32, "in the main process"), resource_sharer.__file__, main)):
        commands._quiet_lost_transfer(*raised(error, filename), owner=owner, default=lambda k, v, tb: printed.append(v))
    assert [str(v) for v in printed] == ["a bug", "[Errno 104] elsewhere", "[Errno 32] in the main process"]


def wait_for_line(p, start_of_line):
    for line in p.stdout:
        if line.startswith(start_of_line):
            return
    raise AssertionError(p.communicate()[1])


def wait_for_file(p, path):
    end = time.time() + PATIENCE
    while not path.exists():
        assert p.poll() is None and time.time() < end, p.communicate()[1]
        time.sleep(0.05)


def stopped(p, sig, group=False):
    """Send sig (to the whole group, as a terminal's Ctrl-C does); -> (exit code, stderr), stderr one line."""
    (os.killpg if group else os.kill)(p.pid, sig)
    _, err = p.communicate(timeout=PATIENCE)
    assert err.count("\n") == 1 and "Traceback" not in err, (p.returncode, err)
    return p.returncode, err


def test_sigterm_during_predict_is_one_line_saying_what_was_written(tmp_path):
    ckpt = tiny(tmp_path / "tiny.pt", head="softmax")
    p = start_as_a_terminal_would(["predict.py", "--checkpoint", str(ckpt), "--val-index", *map(str, range(60)),
                                   "--out", str(tmp_path / "out")])
    wait_for_line(p, "val 0 -> ")                              # then 59 images, minutes of work
    code, err = stopped(p, signal.SIGTERM)
    assert code == 143 and err.startswith("interrupted while predicting val ") and " of 60); " in err
    written = int(re.search(r"; (\d+) file\(s\) written to ", err)[1])
    assert f"file(s) written to {tmp_path / 'out'}, each complete" in err
    assert written == sum(1 for f in (tmp_path / "out").rglob("*") if f.is_file())   # the count it says
    assert not left_behind(tmp_path / "out") and all_whole(tmp_path / "out")


def test_ctrl_c_during_atlas_is_one_line_not_a_traceback(tmp_path):
    ckpt = tiny(tmp_path / "tiny.pt")
    p = start_as_a_terminal_would(["atlas.py", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")])
    wait_for_line(p, "atlas: 1 of 100 val images read")        # past the first image's lazy imports
    code, err = stopped(p, signal.SIGINT, group=True)
    assert code == 130 and err.startswith("interrupted while reading the val images (")
    assert err.endswith(f"; nothing written to {tmp_path / 'a'}\n")


def test_sigterm_during_toy2d_keeps_the_pictures_it_finished(tmp_path):
    p = start_as_a_terminal_would(["toy2d.py", "--out", str(tmp_path), "--steps", "100000000"])
    wait_for_file(p, tmp_path / "b_kappa.png")                 # then panel (c)'s training, which cannot end first
    code, err = stopped(p, signal.SIGTERM)
    # the stop lands as panel (b)'s picture is recorded or in panel (c)'s training: two files, b_kappa.png the last
    assert code == 143 and re.match(r"interrupted while (drawing panel \(b\)|training with mu = 0\.999 for panel "
                                    r"\(c\)); ", err), err
    assert f"; 2 file(s) written to {tmp_path}, each complete (the last: b_kappa.png)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_assign.png", "b_kappa.png"]
    assert all_whole(tmp_path)


def test_ctrl_c_during_bench_names_the_row(tmp_path):
    p = start_as_a_terminal_would(["bench.py", "sinkhorn", "--device", "cpu"])
    wait_for_line(p, "device: ")
    code, err = stopped(p, signal.SIGINT, group=True)
    assert code == 130 and err.startswith("interrupted in row (a, b); the rows printed above are complete")
