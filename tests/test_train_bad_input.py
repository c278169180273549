"""train.py under bad input: every flag range-checked where parsed and named, flags that mean nothing here, the kinds
of path flags, an evaluation that never touches the training record, and the stops (Ctrl-C, SIGTERM, a lost
torchrun peer, out of memory), each one `error:` or stop line. The stop tests wait for the state they need, never
a fixed time: CI runs on a busy machine."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import runs
import settings
import train
from conftest import TINY, free_port, start_as_a_terminal_would, state, user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
QUICK = TINY + ["--crop", "32", "--batch-size", "2"]   # for the runs that are stopped midway (later flags win)


@pytest.mark.parametrize("flags, named", [
    (["--lr", "inf"], "--lr: inf must be a finite number > 0"), (["--lr", "nan"], "--lr: nan must be a finite"),
    (["--weight-decay", "-inf"], "--weight-decay"), (["--dropout", "1.5"], "--dropout: 1.5 must be a finite number in [0, 1)"),
    (["--dropout", "1"], "[0, 1)"), (["--proto-momentum", "2"], "--proto-momentum: 2 must be a finite number in [0, 1]"),
    (["--momentum", "-0.1", "--optimizer", "sgd"], "--momentum"), (["--scale", "-1", "-0.5"], "--scale: -1 must be"),
    (["--scale", "2", "1"], "0 < MIN <= MAX"), (["--scale", "1"], "two numbers"), (["--eval-scales", "1", "0"], "--eval-scales: 0"),
    (["--head-lr-mult", "-1"], "--head-lr-mult"), (["--warmup-iters", "-5"], "--warmup-iters"),
    (["--aux-loss-weight", "-1"], "--aux-loss-weight"), (["--ignore-value", "-1"], "--ignore-value"),
    (["--iters", "1.5"], "'1.5' is not an integer"), (["--nonsense"], "unrecognized arguments: --nonsense")])
def test_every_flag_range_is_checked_where_parsed_and_named(flags, named, capsys):
    assert named in user_error(capsys, settings.parse_args, flags)


@pytest.mark.parametrize("flags, named", [
    (["--class-weights", "cityscapes"], "--class-weights cityscapes: the official weights are 19 values"),
    (["--dataset", "ade20k", "--class-weights", "cityscapes"], "--dataset ade20k has other classes"),
    (["--aux-loss-weight", "0.4"], "--aux-loss-weight 0.4: --backbone hrnet_tiny has no auxiliary head"),
    (["--head", "softmax", "--num-prototypes", "3"], "--num-prototypes: only --head protoseg"),
    (["--head", "query", "--lambda-ppc", "1"], "--lambda-ppc"), (["--num-classes", "3"], "--num-classes: a setting of --dataset folder"),
    (["--data-root", "."], "--dataset synthetic is generated"), (["--momentum", "0.5"], "--momentum: an SGD setting")])
def test_flags_that_mean_nothing_for_the_dataset_backbone_or_head_are_refused(flags, named, capsys):
    assert named in user_error(capsys, settings.parse_args, flags)
    settings.parse_args(["--dataset", "ade20k", "--backbone", "swin_tiny", "--aux-loss-weight", "0.2"])  # has the head


def test_flag_error_is_one_line_and_exit_1_from_the_command_line():
    out = subprocess.run([sys.executable, "train.py", "--lr", "inf"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("error: argument --lr: inf") and out.stderr.count("\n") == 1


def test_path_flags_are_checked_for_their_kind(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert "--out-dir" in user_error(capsys, settings.parse_args, ["--out-dir", str(tmp_path / "file")])
    assert "is a file, expected a folder" in user_error(capsys, train.main, TINY + ["--out-dir", str(tmp_path / "file")])
    msg = user_error(capsys, settings.parse_args, ["--dataset", "folder", "--num-classes", "2", "--data-root", str(tmp_path / "file")])
    assert "--data-root" in msg and "a file, expected the dataset's folder" in msg
    assert "a folder, expected a weights file" in user_error(capsys, settings.parse_args, ["--pretrained", str(tmp_path)])
    assert "a symlink loop" in user_error(capsys, settings.parse_args, ["--pretrained", str(tmp_path / "loop")])
    msg = user_error(capsys, train.main, ["--resume", str(tmp_path)])
    assert f"--resume {tmp_path}: a folder without last.pt" in msg
    assert "a symlink loop" in user_error(capsys, train.main, ["--resume", str(tmp_path / "loop")])
    msg = user_error(capsys, train.main, ["--eval-only", "--resume", "auto", "--out-dir", str(tmp_path / "run")])
    assert "--eval-only --resume auto: no last.pt in" in msg and not (tmp_path / "run").exists()  # nothing evaluated


def test_eval_only_never_touches_the_training_record_and_a_finished_run_stays_finished(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(TINY + ["--iters", "1", "--out-dir", str(run)])
    record = {f: (run / f).read_bytes() for f in ("metrics.json", "config.json", "log.jsonl", "last.pt")}
    train.main(["--eval-only", "--resume", str(run), "--workers", "0", "--val-size", "1"])  # a run folder = its last.pt
    assert json.loads((run / "eval/metrics.json").read_text())["images"] == 1
    assert json.loads((run / "eval/config.json").read_text())["eval_only"] is True
    capsys.readouterr()
    assert train.main(TINY + ["--iters", "1", "--out-dir", str(run), "--resume", "auto"]) is None
    assert "is complete (1 of 1 iterations" in capsys.readouterr().out
    assert {f: (run / f).read_bytes() for f in record} == record           # neither command changed the record


# The most a stopped run may take to end on a busy machine. Every wait below polls for the state it needs and goes on
# as soon as it is there: a ceiling against a hang, never a duration a test relies on.
PATIENCE = 300


def _session_gone(pid, wait=PATIENCE):
    """No process of the session is left within `wait` seconds (a worker may take a moment to exit)."""
    end = time.time() + wait
    while time.time() < end:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _run_until(args, line_start, env=None):
    """train.py in its own session, read until a stdout line starts with line_start (the state a test needs,
    however long the machine takes to get there)."""
    p = start_as_a_terminal_would(["train.py", *args], env=env)
    for line in p.stdout:
        if line.startswith(line_start):
            return p
    raise AssertionError(p.communicate()[1])


def _stderr_at_exit(p, after):
    """p's stderr once it has exited; a run still going PATIENCE seconds `after` an event fails the test (and is
    stopped)."""
    try:
        return p.communicate(timeout=PATIENCE)[1]
    except subprocess.TimeoutExpired:
        pytest.fail(f"train.py still running {PATIENCE} s after {after}")


def _stop_session(p):
    """Clean-up, also when a test failed midway: nothing of p's session left running."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


# runs that a test stops midway: far more iterations than can end before the stop
ENDLESS = ["--ckpt-every", "2", "--iters", "100000"]


@pytest.mark.parametrize("sig, code, group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_ctrl_c_and_sigterm_end_in_one_line_with_lock_and_workers_gone(tmp_path, sig, code, group):
    args = [a if a != "0" else "1" for a in QUICK] + ENDLESS + ["--out-dir", str(tmp_path)]     # 1 worker
    p = _run_until(args, "it 3/")                                  # iteration 2's checkpoint is written
    try:
        (os.killpg if group else os.kill)(p.pid, sig)              # Ctrl-C reaches the whole group, as a terminal's
        err = _stderr_at_exit(p, f"signal {sig}")
        held = state(tmp_path / "last.pt")["iter"]
        assert p.returncode == code and err.count("\n") == 1 and "Traceback" not in err, (p.returncode, err)
        assert err.startswith("interrupted after iteration ") and f"; last.pt holds iteration {held}; --resume auto" in err
        assert not (tmp_path / "run.lock").exists() and _session_gone(p.pid)
    finally:
        _stop_session(p)


def test_a_stop_while_the_run_is_set_up_names_the_checkpoint_it_has(tmp_path, monkeypatch):
    """Ctrl-C before the first iteration (while the model is built): a fresh run has no checkpoint and starts
    again with the same command; a resumed one keeps its last.pt, which --resume auto continues."""
    args = QUICK + ["--val-size", "1", "--iters", "3", "--out-dir", str(tmp_path)]
    train.main(args[:-4] + ["--iters", "2", "--out-dir", str(tmp_path / "old")])

    def stopped(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "build", stopped)
    for argv, line in ((args, "interrupted before the first iteration ended; no checkpoint of this run was written; "
                              "run the same command to start it"),
                       (args[:-2] + ["--out-dir", str(tmp_path / "old"), "--resume", "auto", "--allow-changes"],
                        "interrupted before the first iteration ended; last.pt holds iteration 2; --resume auto "
                        "continues")):
        progress = {}
        with pytest.raises(KeyboardInterrupt):
            train.main(argv, progress)
        assert runs.interrupted_line(progress) == line


def test_a_dead_torchrun_peer_is_reported_once_in_one_line(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = [*QUICK, "--batch-size", "4", *ENDLESS, "--out-dir", str(tmp_path)]
    peer = start_as_a_terminal_would(["train.py", *args], env={**env, "RANK": "1"}, stdout=subprocess.DEVNULL)
    survivor = None
    try:
        survivor = _run_until(args, "it 3/", {**env, "RANK": "0"})
        peer.kill()                                                 # a rank dies (OOM killer, node lost)
        err = _stderr_at_exit(survivor, "its peer was killed")
        assert survivor.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("error: rank 0: another rank stopped after iteration ") and "by peer" in err
        assert not (tmp_path / "run.lock").exists()
    finally:
        for p in (peer, survivor):
            if p is not None:
                _stop_session(p)


def test_an_allocation_failure_is_one_line_naming_crop_and_batch_size(tmp_path):
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # 6 GB of address space
    out = subprocess.run([sys.executable, "train.py", *TINY, "--crop", "30000", "--iters", "2", "--out-dir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: out of memory") and "--crop 30000 30000, --batch-size 4" in out.stderr
