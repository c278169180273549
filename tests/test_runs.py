"""runs.py: one run per output folder (run.lock, an earlier run kept, a stale lock taken over or named), and a
DataLoader worker's wrapped error reported as its own one line. (The stop lines, Ctrl-C, SIGTERM, a lost peer and
out of memory, are checked from the command line in test_bad_input.py.)"""
import os
import subprocess
import time

import pytest

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
    train.main(args + ["--overwrite"])


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
    assert runs.one_line(ValueError(wrapped)) == "label values [7] in a.png: neither a class nor ignore"
