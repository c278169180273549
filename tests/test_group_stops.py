"""A stop that reaches the whole process group, as `timeout -s TERM`, Slurm's scancel and `kill -TERM -PGID` send
it: SIGTERM to the main process and its DataLoader workers (and other children) at once. Every run ends as a stop of
the main process does: one line, exit 143, last.pt whole, no process of the job left. A rank killed under the
torchrun launcher ends the survivor in one line.

The runs start as a terminal starts them (SIGINT and SIGTERM at their defaults, a session of their own) and are
stopped once they have reached the state the test needs (a printed line), never after a fixed time. The group
stops run ten times on a machine loaded with two busy loops; in half of them the main process is held (SIGSTOP)
until the signal has ended its workers, which a busy machine does by not scheduling it: torch's check of the
workers then sees them killed before the main process sees its own SIGTERM."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

import coursework
from conftest import TINY, free_port, start_as_a_terminal_would, state

PATIENCE = 300       # the most a stopped run may take to end on a busy machine: a ceiling, never a wait relied on
RUNS = 10
# tiny runs stopped after their first steps: one per rank-0 progress line, a checkpoint every 2 iterations
ENDLESS = [a if a != "0" else "2" for a in TINY] + ["--crop", "32", "--batch-size", "2", "--ckpt-every", "2",
                                                     "--eval-every", "0", "--iters", "100000"]  # 2 DataLoader workers


def start(args, **kw):
    return start_as_a_terminal_would(args, env={**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}, **kw)


def read_until(stream, line_start):
    for line in stream:
        if line.startswith(line_start):
            return line
    raise AssertionError(f"no line starting with {line_start!r}")


def session_gone(pid):
    end = time.time() + PATIENCE
    while time.time() < end:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def children(pid):
    return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:                          # gone meanwhile
        return None


def ended(pid):
    """Exited (a zombie not yet reaped, or gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def working_in(folder):
    """The processes whose working directory is folder."""
    found = []
    for link in glob.glob("/proc/[0-9]*/cwd"):
        try:
            found += [link] if os.readlink(link) == str(folder) else []
        except OSError:                      # not ours to read, or gone
            pass
    return found


def kill_session(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


@pytest.fixture
def busy_machine():
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for p in loops:
        p.kill()
        p.wait()


def stop_group(p, hold):
    """SIGTERM to p's whole process group, as `timeout` sends it; hold: the main process stopped until the signal
    has ended its DataLoader workers (the forked children running its own command line)."""
    workers = [c for c in children(p.pid) if command_line(c) == command_line(p.pid)] if hold else []
    if hold:
        os.kill(p.pid, signal.SIGSTOP)
    os.killpg(p.pid, signal.SIGTERM)
    end = time.time() + PATIENCE
    while workers and not all(map(ended, workers)) and time.time() < end:
        time.sleep(0.01)
    if hold:
        os.kill(p.pid, signal.SIGCONT)
    return len(workers)


def test_sigterm_to_the_whole_process_group_ends_training_in_one_line_under_load(tmp_path, busy_machine):
    runs = [start(["train.py", *ENDLESS, "--out-dir", str(tmp_path / str(i))]) for i in range(RUNS)]
    try:
        for i, p in enumerate(runs):                     # all train at once: the load, with the busy loops
            read_until(p.stdout, "it 1/")                # training, its 2 workers loading batches
            assert stop_group(p, hold=i % 2) == 2 * (i % 2)
        for i, p in enumerate(runs):
            try:
                err = p.communicate(timeout=PATIENCE)[1]
            except subprocess.TimeoutExpired:
                pytest.fail(f"run {i} still running {PATIENCE} s after the stop")
            last = tmp_path / str(i) / "last.pt"
            kept = f"last.pt holds iteration {state(last)['iter']}" if last.exists() else \
                "no checkpoint of this run was written"                          # torch.load: whole
            assert p.returncode == 143 and err.count("\n") == 1, (i, p.returncode, err)
            assert err.startswith("interrupted after iteration ") and f"; {kept}; " in err, (i, err)
            assert not (tmp_path / str(i) / "run.lock").exists() and session_gone(p.pid), i
    finally:
        for p in runs:
            kill_session(p)


def test_a_rank_killed_under_the_torchrun_launcher_ends_the_survivor_in_one_line(tmp_path):
    """rank 0's stderr is its file under --log-dir (the launcher adds its own report of the failed rank)."""
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}", "--redirects",
            "2", "--log-dir", str(tmp_path / "logs"), "train.py", *ENDLESS, "--batch-size", "4", "--workers", "0",
            "--out-dir", str(tmp_path / "run")]
    launcher = start(args)
    try:
        read_until(launcher.stdout, "it 3/")                       # rank 0 logs; iteration 2's checkpoint written
        rank1 = [c for c in children(launcher.pid) if b"\0RANK=1\0" in b"\0" + open(f"/proc/{c}/environ", "rb").read()]
        os.kill(rank1[0], signal.SIGKILL)                          # a rank dies (OOM killer, node lost)
        launcher.communicate(timeout=PATIENCE)
        (log, ) = glob.glob(str(tmp_path / "logs" / "**" / "0" / "stderr.log"), recursive=True)
        err = open(log).read()
        held = state(tmp_path / "run" / "last.pt")["iter"]
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(("error: rank 0: another rank stopped after iteration ", "interrupted after iteration "))
        assert f"; last.pt holds iteration {held}; --resume auto continues" in err, err
        assert not (tmp_path / "run" / "run.lock").exists() and session_gone(launcher.pid)
    finally:
        kill_session(launcher)


def test_sigterm_to_the_group_of_a_grading_run_ends_it_in_one_line_and_its_tests_with_it(tmp_path):
    copy = tmp_path / "hw"
    coursework.write_copy(str(copy), coursework.entries(["14"]))
    p = start(["coursework.py", "--check", str(copy)])
    try:
        read_until(p.stderr, "running 1 grading tests")
        os.killpg(p.pid, signal.SIGTERM)
        err = p.communicate(timeout=PATIENCE)[1]
        assert p.returncode == 143 and err == f"interrupted while grading {copy}; no equation graded\n", err
        assert session_gone(p.pid) and not working_in(copy)                # pytest's session too
    finally:
        kill_session(p)
