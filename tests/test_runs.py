"""runs.py: one run per output folder (run.lock, an earlier run kept, a stale lock taken over or named), the
training curves drawn from log.jsonl, files written whole, and a DataLoader worker's wrapped error reported as its
own one line. (The stop lines, Ctrl-C, SIGTERM, a lost peer and out of memory, are checked from the command line
in test_train_bad_input.py.)"""
import errno
import json
import os
import pathlib
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

import commands
import draw
import runs
import settings
import train
from conftest import TINY, user_error


def test_out_dir_belongs_to_one_run(tmp_path, capsys):
    args = TINY + ["--iters", "1", "--out-dir", str(tmp_path)]
    train.main(args)
    with pytest.raises(SystemExit):
        train.main(args)                                           # would overwrite the first run's last.pt
    assert "holds an earlier run; continue it with --resume auto" in capsys.readouterr().err
    (tmp_path / "run.lock").write_text(str(os.getppid()))         # a live process holds the directory
    with pytest.raises(SystemExit):
        train.main(args + ["--overwrite"])
    assert "is in use by another run" in capsys.readouterr().err
    (tmp_path / "run.lock").write_text("999999999")                # a dead one: the stale lock is taken over
    first = (tmp_path / "log.jsonl").read_text().splitlines()
    train.main(args + ["--overwrite"])
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == len(first) and sum("final" in r for r in rows) == 1   # the new run's record only


def test_stale_lock_of_a_live_unrelated_process_says_it_may_be_stale(tmp_path, capsys):
    other = subprocess.Popen(["sleep", "3600"])                       # alive however slow the machine; killed below
    try:
        while not open(f"/proc/{other.pid}/cmdline", "rb").read().startswith(b"sleep"):
            time.sleep(0.01)                                            # until the fork has become `sleep`
        (tmp_path / "run.lock").write_text(str(other.pid))
        msg = user_error(capsys, runs.claim_out_dir, settings.Config(out_dir=str(tmp_path)), False)
        assert "it runs `sleep 3600`, not train.py, so the lock is probably stale" in msg
        assert f"delete {tmp_path / 'run.lock'}" in msg
    finally:
        other.kill()
        other.wait()


def test_worker_wrapped_data_error_becomes_its_own_line():
    wrapped = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\ndata.DatasetError: label values [7] in a.png: neither a class nor ignore')
    assert commands.error_message(ValueError(wrapped)) == "label values [7] in a.png: neither a class nor ignore"


def test_curves_png_has_a_panel_per_logged_term_and_one_for_val_miou(tmp_path):
    """curves.png: one panel per term log.jsonl holds (loss, ce, ppc, ppd, lr; aux when logged) and, in its own
    colour, one for the val mIoU of the evaluations (a line of text for a lone final value); 3 panels a row; written
    whole (no temporary file left)."""
    w, h = draw.titled(draw.line_chart([(0, 0), (1, 1)]), "t").size
    def drawn(rows):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        img = Image.open(runs.write_curves(str(tmp_path))).convert("RGB")
        assert sorted(os.listdir(tmp_path)) == ["curves.png", "log.jsonl"]
        return img.size, (np.asarray(img) == (200, 60, 30)).all(-1).any()
    terms = [{"iter": i, "loss": 2 / i, "ce": 1 / i, "ppc": 5 / i, "ppd": 0.5 / i, "lr": 0.01 * (1 - i / 10)}
             for i in range(1, 10)]
    final = {"iter": 9, "final": {"miou": 0.5}}
    assert drawn([{"iter": i, "ce": 1 / i, "lr": 0.01} for i in range(1, 4)]) == ((2 * w + 10, h), False)
    assert drawn(terms + [{"iter": 5, "val": {"miou": 0.3}}, final]) == ((3 * w + 20, 2 * h + 10), True)
    one_value = draw.titled(draw.text_panel(["one value (--eval-every N draws a curve)"], 250), "t").height
    assert drawn([dict(r, aux=0.1) for r in terms] + [final]) == ((3 * w + 20, 2 * h + 20 + one_value), False)


def test_a_full_disk_at_the_end_of_a_run_is_one_line_and_leaves_no_half_written_metrics(tmp_path, capsys, monkeypatch):
    """train.py's config.json, metrics.json, log.jsonl and curves.png are written whole or not at all; a full disk is
    one `error:` line naming the file and the errno."""
    real = pathlib.Path.write_text

    def full_for_metrics(self, text, *args, **kw):
        if self.name.startswith(".metrics"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kw)
    monkeypatch.setattr(pathlib.Path, "write_text", full_for_metrics)
    err = user_error(capsys, train.main, TINY + ["--iters", "1", "--out-dir", str(tmp_path)])
    assert "metrics.json" in err and "(ENOSPC)" in err and str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "last.pt", "log.jsonl"]


def test_a_log_row_that_cannot_be_written_is_one_line(tmp_path, capsys):
    class Full:
        name = str(tmp_path / "log.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    err = user_error(capsys, runs.log_row, Full(), {"iter": 7})
    assert "log.jsonl" in err and "(ENOSPC) at iteration 7" in err and "--resume auto" in err
