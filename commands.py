"""What every script here (train.py, predict.py, atlas.py, toy2d.py, bench.py, coursework.py) does the same way as a
command: a user error is one `error:` line (exit 1); flags are range-checked where parsed; files are written whole
or not at all (Outputs: a full disk or a read-only folder is one line); Ctrl-C, SIGTERM, an allocation failure and a
lost torchrun peer end in one line each (run_command: exit 130 / 143 / 1), with the DataLoader workers stopped, also
when the stop was sent to the whole process group (`timeout`, scancel) and reached the workers first.
"""
import argparse
import contextlib
import errno
import gc
import math
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

import torch

from collectives import is_master


def error_message(error, limit=300):
    """An exception's message as one line of at most `limit` characters: whitespace collapsed; a DatasetError that a
    DataLoader worker wrapped in its traceback unwrapped; the exception's type when it says nothing."""
    lines = [l for l in str(error).splitlines() if l.strip()]
    wrapped = [l.split("DatasetError: ", 1)[1] for l in lines if re.match(r"(\w+\.)?DatasetError: ", l)]
    text = wrapped[-1] if wrapped else " ".join(str(error).split())
    return (text or type(error).__name__)[:limit]


def exit_with_error(message):
    """A user error: one line on stderr (printed by rank 0 only), exit code 1."""
    if is_master():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


class Parser(argparse.ArgumentParser):
    def error(self, message):                                   # a flag error is a user error like any other
        exit_with_error(f"{message} (python {self.prog} --help lists every setting)")


RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1,
          "in [0, 1)": lambda v: 0 <= v < 1}


def ranged(kind, rule):
    """argparse type of a number flag: int or float, finite, in the range `rule` (a key of RANGES); the error
    names the value and the range."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") \
                from None
        if not math.isfinite(v) or not RANGES[rule](v):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {rule}")
        return v
    return parse


def device_flag(text):
    """argparse type of --device: a device this machine has (cpu, cuda, cuda:N, mps), as a torch.device."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device, expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here, expected cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"expected cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no MPS device here, expected cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: expected cpu, cuda, cuda:N or mps")
    return device


# ----------------------------------------------------------------------------- writing files

@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done (then arrive as usual): a checkpoint and the iteration the
    stop message names are never half-updated. Blocked in this thread, and recorded by the Python handlers when the
    kernel hands them to another thread (torch's threads), whose C handler would still wake this one."""
    stops, got = {signal.SIGINT, signal.SIGTERM}, []

    def record(signum, frame):
        got.append(signum)
        signal.signal(signal.SIGCHLD, _ignored)          # see _stopping
    main = threading.current_thread() is threading.main_thread()
    kept = {s: signal.signal(s, record) for s in stops if main and callable(signal.getsignal(s))}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        if got:
            signal.raise_signal(got[0])


def within(path, folder):
    """Is path the folder itself or inside it (links and '..' resolved; neither needs to exist)?"""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Outputs:
    """The files a picture script writes into one folder, each whole or not at all (a temporary file beside it,
    renamed when complete), and what the script is doing, for the one line it ends with when stopped: a full disk
    or a read-only folder (exit 1), Ctrl-C or SIGTERM (run_command)."""

    def __init__(self, folder=None, flag="--out"):
        self.folder, self.flag, self.files, self.doing = folder and Path(folder), flag, [], "while starting"

    def write(self, name, write):
        """write(tmp path) makes the file `name` (relative to the folder); returns its path."""
        path = self.folder / name
        tmp = path.with_name(f".{path.stem}.part{path.suffix}")   # same suffix: PIL picks the format by it
        try:
            with signals_deferred():                            # the file and the record of it, whole
                path.parent.mkdir(parents=True, exist_ok=True)
                write(tmp)
                os.replace(tmp, path)
                self.files.append(name)
        except OSError as e:
            exit_with_error(f"cannot write to {self.folder} ({name}): {e.strerror or e} "
                            f"({errno.errorcode.get(e.errno, e.errno)}) {self.doing}; {self.written()}; expected a "
                            f"writable {self.flag} folder with free space")
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def save(self, img, name, **kw):
        """A PIL image (PNG, GIF with save_all=True, ...) by the suffix of name."""
        return self.write(name, lambda tmp: img.save(tmp, **kw))

    def text(self, name, text):
        return self.write(name, lambda tmp: tmp.write_text(text))

    def written(self):
        if not self.files:
            return f"nothing written to {self.folder}" if self.folder else "nothing written"
        return (f"{len(self.files)} file(s) written to {self.folder}, each complete (the last: "
                f"{self.files[-1]})")

    def stopped(self):
        return f"interrupted {self.doing}; {self.written()}"

    def out_of_memory(self, text, fix):
        asked = asked_for(text)
        return (f"out of memory {self.doing}{' (tried to allocate ' + asked + ')' if asked else ''}; {self.written()}; "
                f"expected sizes that fit this device: {fix}")


# ----------------------------------------------------------------------------- how a command stops: one line

PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|remote process exited|NCCL communicator "
                       r"was aborted|Socket Timeout|connection refused", re.I)
NO_MEMORY = re.compile(r"out of memory|can't allocate memory|failed to allocate", re.I)


def first_to_report():
    """Under torchrun every survivor sees the lost peer: the first to reach the rendezvous store reports it; a
    survivor that cannot reach the store (its host died) reports too."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        return store.add("protoseg_peer_lost", 1) == 1
    except Exception:
        return True


def asked_for(text):
    """The allocation an out-of-memory message names ("2.00 GiB", "123 bytes"), or None."""
    found = re.search(r"allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    return found[1] if found else None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, torchrun, docker stop), handled as Ctrl-C is."""


def _ignored(signum, frame):
    """A Python handler doing nothing: unlike SIG_IGN, a signal already received when it is installed is dropped
    silently (Python prints "Signal N ignored due to race condition" for one that finds SIG_IGN)."""


def _stopping():
    """A stop of this command has begun: a second Ctrl-C or SIGTERM (or torchrun stopping the survivors of a lost
    rank) must not break the clean-up, and torch's SIGCHLD check of the DataLoader workers must not report those
    ended by the same signal (sent to the process group: `timeout`, scancel, Ctrl-C) as failures."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(s, _ignored)


def _on_stop(signum, frame, owner=os.getpid()):
    """Ctrl-C and SIGTERM of a command: KeyboardInterrupt / Terminated, with SIGCHLD's check switched off first
    (Python runs the handlers of the signals received in number order: SIGINT 2, SIGTERM 15, then SIGCHLD 17)."""
    if os.getpid() != owner:               # a forked DataLoader worker not yet in torch's loop: leave quietly
        if signum == signal.SIGINT:
            raise KeyboardInterrupt        # torch's worker loop ends on it without a message
        os._exit(0)                        # exit 0: torch's SIGCHLD check does not report it as a failure
    _stopping()
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


WORKER_STOPPED = re.compile(r"DataLoader worker \(pid \d+\) is killed by signal: (Terminated|Interrupt)")


def _stop_of_workers(e):
    """143 / 130 when e (or the error it was raised from) says a DataLoader worker was ended by SIGTERM / Ctrl-C: a
    stop sent to the process group that torch's check of the workers saw before this process saw its own."""
    for error in (e, e.__cause__, e.__context__):
        found = error is not None and WORKER_STOPPED.search(str(error))
        if found:
            return 143 if found[1] == "Terminated" else 130
    return None


def run_command(main, stopped, out_of_memory=None, peer_lost=None):
    """main() as a command: Ctrl-C / SIGTERM end in the line stopped() (exit 130 / 143); an allocation failure in
    "error: " + out_of_memory(text) and, under torchrun, a lost peer in "error: " + peer_lost(text) (exit 1), each
    with the DataLoader workers stopped, never a stack trace. main's own exit (a user error: 1) is kept. A stop sent
    to the whole process group (the workers included) ends as a stop of this process does."""
    signal.signal(signal.SIGTERM, _on_stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # not in a job started with Ctrl-C ignored
        signal.signal(signal.SIGINT, _on_stop)
    sys.excepthook = _quiet_lost_transfer                      # before any worker is forked
    code, line = 0, None
    try:
        main()
    except KeyboardInterrupt as e:
        _stopping()
        code, line = 143 if isinstance(e, Terminated) else 130, stopped
        _release(e)
    except (MemoryError, RuntimeError) as e:
        _stopping()
        text = error_message(e, limit=None)
        if _stop_of_workers(e):
            code, line = _stop_of_workers(e), stopped
        elif out_of_memory and (isinstance(e, MemoryError) or NO_MEMORY.search(text)):
            code, line = 1, lambda: "error: " + out_of_memory(text)
        elif peer_lost and PEER_LOST.search(text) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            code, line = 1, lambda: "error: " + peer_lost(text) if first_to_report() else None
        else:
            raise
        _release(e)
    text = line and line()
    if text:
        _say(text)
    sys.exit(code)


def _quiet_lost_transfer(kind, value, tb, owner=os.getpid(), default=sys.excepthook):
    """sys.excepthook, inherited by the forked DataLoader workers: a worker's fd-sharing thread (multiprocessing's
    resource_sharer, which reports through sys.excepthook) fails with a closed connection when the main process
    drops a tensor transfer as it stops (on a busy machine, or a lost torchrun peer); not an error of the run, so
    not printed. Anything else is."""
    files = [f.filename for f in traceback.extract_tb(tb)]
    if os.getpid() != owner and issubclass(kind, (OSError, EOFError)) and any("resource_sharer" in f for f in files):
        return
    default(kind, value, tb)


def _release(e):
    """Drop the frames the exception holds (the data stream and its DataLoader workers), so they shut down now,
    quietly (after _stopping): a worker's socket closing under multiprocessing's fd-sharing thread is no
    failure."""
    threading.excepthook = lambda args: None
    traceback.clear_frames(e.__traceback__)
    gc.collect()


def _say(line):
    if int(os.environ.get("RANK", "0")) == 0 or line.startswith("error: rank"):
        print(line, file=sys.stderr, flush=True)
