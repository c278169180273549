"""The run directory (out_dir) of train.py: one run at a time, log.jsonl that a resumed run continues, one-line user
errors and the one-line ends of a stopped run (checkpoints.py writes last.pt); and what every script (train.py,
predict.py, atlas.py, toy2d.py, bench.py) shares as a command: run_command (Ctrl-C, SIGTERM, out of memory, a lost
torchrun peer: one line each, exit 130 / 143 / 1), Outputs (files written whole or not at all, a full disk or a
read-only folder one line) and the argparse types of the scripts' own number and --device flags.

    out_dir/last.pt       the latest checkpoint: {"model", "optimizer", "scaler", "iter", "config"}
    out_dir/log.jsonl     one JSON row per logged iteration, evaluation and the final metrics
    out_dir/metrics.json  the final evaluation (strict JSON, class names beside each number)
    out_dir/config.json   the resolved settings
    out_dir/run.lock      the pid of the run using the folder (removed when it ends)
"""
import argparse
import contextlib
import errno
import gc
import json
import math
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

import torch

import draw
from collectives import all_reduce, is_master, rank_and_world
from datafiles import path_problem


def fail(message):
    """A user error: one line on stderr (printed by rank 0 only), exit code 1."""
    if is_master():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def one_line(error):
    """A DatasetError's message, also when a DataLoader worker wrapped it with its traceback."""
    lines = [l for l in str(error).splitlines() if l.strip()]
    wrapped = [l.split(": ", 1)[1] for l in lines if l.startswith(("DatasetError: ", "data.DatasetError: "))]
    return wrapped[-1] if wrapped else (lines[0] if lines else type(error).__name__)


def claim_out_dir(cfg, resuming):
    """out_dir belongs to one run: a lock file keeps a second one out; an earlier run's last.pt needs
    --resume or --overwrite. Returns the lock path (removed at exit)."""
    lock = os.path.join(cfg.out_dir, "run.lock")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if not os.path.isdir(cfg.out_dir):
            fail(f"--out-dir {cfg.out_dir} is a file, expected a folder (created if missing)")
        pid = open(lock).read().strip()
        if pid.isdigit() and _alive(int(pid)):
            fail(f"out_dir {cfg.out_dir} is in use by another run (pid {pid}, {lock}){_stale_hint(int(pid), lock)}; "
                 "wait for it or choose another --out-dir")
        os.remove(lock)                                         # left by a run that died
        return claim_out_dir(cfg, resuming)
    except OSError as e:
        fail(f"cannot write to out_dir {cfg.out_dir}: {e.strerror}; choose a writable --out-dir")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    last = os.path.join(cfg.out_dir, "last.pt")
    if os.path.exists(last) and not resuming and not cfg.overwrite and not cfg.eval_only:
        os.remove(lock)
        fail(f"{last} holds an earlier run; continue it with --resume auto, or replace it with --overwrite "
             "(or choose another --out-dir)")
    return lock


def _stale_hint(pid, lock):
    """A pid is reused after a restart: say what runs under it now, and how to clear a stale lock."""
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    what = f": it runs `{cmd[:80]}`, not train.py, so the lock is probably stale" if cmd and "train.py" not in cmd \
        else ""
    return f"{what}; if no run uses this folder (e.g. after a restart), delete {lock}"


def checkpoint_path(cfg):
    """The file --resume names: 'auto' = out_dir/last.pt (None if absent, which starts afresh; --eval-only fails);
    a run folder = its last.pt."""
    if cfg.resume == "auto":
        path = os.path.join(cfg.out_dir, "last.pt")
        if os.path.isfile(path):
            return path
        if cfg.eval_only:
            fail(f"--eval-only --resume auto: no last.pt in {cfg.out_dir} ({path_problem(path)}), expected a run's "
                 "checkpoint there; give --out-dir RUN or --resume CHECKPOINT")
        return None
    if os.path.isdir(cfg.resume):
        path = os.path.join(cfg.resume, "last.pt")
        if not os.path.isfile(path):
            fail(f"--resume {cfg.resume}: a folder without last.pt, expected a checkpoint file or a run folder "
                 "holding last.pt")
        return path
    if not os.path.isfile(cfg.resume):
        fail(f"--resume {cfg.resume}: {path_problem(cfg.resume)}, expected a checkpoint file (runs/*/last.pt), "
             "a run folder or 'auto'")
    return cfg.resume


def run_complete(cfg, ckpt):
    """A resumed run whose checkpoint is at --iters and whose log.jsonl holds the final metrics: nothing to do
    (a message, or None when there is work left)."""
    if ckpt is None or cfg.eval_only or ckpt.get("official") or ckpt.get("iter", 0) < cfg.iters:
        return None
    path = os.path.join(cfg.out_dir, "log.jsonl")
    rows = [json.loads(r) for r in open(path).read().splitlines() if r.strip()] if os.path.isfile(path) else []
    if not any("final" in r and r.get("iter") == ckpt["iter"] for r in rows):
        return None                                             # stopped in its final evaluation: do that now
    return (f"the run in {cfg.out_dir} is complete ({ckpt['iter']} of {cfg.iters} iterations, final metrics in "
            f"{os.path.join(cfg.out_dir, 'metrics.json')}); nothing changed. To train longer: --iters N "
            f"--allow-changes; to evaluate again: --eval-only --resume {os.path.join(cfg.out_dir, 'last.pt')}")


def _alive(pid):
    try:
        os.kill(pid, 0)
        return pid != os.getpid()
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def last_good(cfg, saved_it):
    path = os.path.join(cfg.out_dir, "last.pt")
    if saved_it:
        return f"The last good checkpoint, after iteration {saved_it}, is {path}."
    return "No checkpoint of this run was written."


def open_log(cfg, start):
    """log.jsonl, keeping only the rows up to the resumed iteration (a replayed stretch is logged again)."""
    path = os.path.join(cfg.out_dir, "log.jsonl")
    rows = []
    if start and os.path.exists(path):
        rows = [r for r in open(path).read().splitlines() if r.strip() and json.loads(r).get("iter", 0) <= start]
    f = open(path, "w")
    f.write("".join(r + "\n" for r in rows))
    f.flush()
    return f


def log_row(f, row):
    if f is not None:
        f.write(json.dumps(row) + "\n")
        f.flush()


class RunLog:
    """What rank 0 says: log(text) prints it, log.row(dict) appends a row to out_dir/log.jsonl once open() has
    been called. Other ranks say and write nothing."""

    def __init__(self, rank=0):
        self.rank, self.file = rank, None

    def __call__(self, *args, **kw):
        if self.rank == 0:
            print(*args, **kw)

    def open(self, cfg, start):
        if self.rank == 0:
            self.file = open_log(cfg, start)

    def row(self, row):
        log_row(self.file, row)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


CURVES = (("loss", "loss (Eq. 13)"), ("ce", "ce (Eq. 7)"), ("ppc", "ppc (Eq. 11)"), ("ppd", "ppd (Eq. 12)"),
          ("aux", "aux head ce"), ("lr", "learning rate"))


def write_curves(out_dir):
    """out_dir/curves.png from log.jsonl: each logged term and the lr per iteration, and the val mIoU of every
    evaluation. Returns its path."""
    rows = [json.loads(r) for r in open(os.path.join(out_dir, "log.jsonl")).read().splitlines() if r.strip()]
    panels = [draw.titled(draw.line_chart([(r["iter"], r[key]) for r in rows if key in r]), title)
              for key, title in CURVES if any(key in r for r in rows)]
    miou = [(r["iter"], 100 * (r.get("val") or r.get("final"))["miou"]) for r in rows
            if (r.get("val") or r.get("final") or {}).get("miou") is not None]
    if miou:
        panels.append(draw.titled(draw.line_chart(miou, colour=(200, 60, 30)), "val mIoU (%)"))
    path = os.path.join(out_dir, "curves.png")
    if panels:
        atomic_image(draw.grid(panels, 3, gap=10), path)
    return path


def atomic_image(img, path):
    """Write a picture whole or not at all: to a temporary file beside it, then renamed over it."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        img.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def stop_if_any_rank_failed(error, device):
    """error: this rank's one-line data error, or None. If any rank has one, every rank stops (exit 1) and the
    first failing rank prints its line, so a bad file on one rank never leaves the others waiting."""
    rank, world = rank_and_world()
    if world == 1:
        return fail(error) if error is not None else None
    flags = torch.zeros(world)
    flags[rank] = error is not None
    flags = all_reduce(flags.to(device)).cpu()
    if flags.any():
        if error is not None and rank == int(flags.nonzero()[0]):
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1)


# ----------------------------------------------------------------------------- how a run stops: one line each

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


def _iterations(progress):
    cfg = progress.get("cfg")
    done, saved = progress.get("done"), progress.get("saved", 0)
    where = (f"after iteration {done}" if done and (cfg is None or done < cfg.iters)
             else f"in the final evaluation (iteration {done})" if done else "before the first iteration ended")
    kept = f"last.pt holds iteration {saved}" if saved else "no checkpoint of this run was written"
    return where, kept


def interrupted_line(progress):
    cfg = progress.get("cfg")
    if cfg is not None and cfg.eval_only:
        return f"interrupted during the evaluation of {cfg.resume}; nothing written"
    where, kept = _iterations(progress)
    return f"interrupted {where}; {kept}; --resume auto continues" if progress.get("saved") else \
        f"interrupted {where}; {kept}; run the same command to start it"


def out_of_memory_line(progress, text):
    cfg = progress.get("cfg")
    where, kept = _iterations(progress)
    asked = asked_for(text)
    sizes = (f"--crop {' '.join(map(str, cfg.crop))}, --batch-size {cfg.batch_size}"
             f"{', --eval-crop ' + ' '.join(map(str, cfg.eval_crop)) if cfg.eval_crop[0] else ''}"
             if cfg else "these settings")
    return (f"out of memory {where} with {sizes}{' (tried to allocate ' + asked + ')' if asked else ''}; "
            f"expected sizes that fit this device: lower --crop or --batch-size (--eval-crop for evaluation); {kept}")


def peer_lost_line(progress, text):
    where, kept = _iterations(progress)
    reason = PEER_LOST.search(text)[0]
    return (f"rank {os.environ.get('RANK', '?')}: another rank stopped {where} ({reason}); its own message, if any, "
            f"is above; {kept}; --resume auto continues")


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done (then arrive as usual): a checkpoint and the iteration the
    stop message names are never half-updated."""
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)


# ----------------------------------------------------------------------------- a script as a command

class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, torchrun, docker stop), handled as Ctrl-C is."""


def _on_sigterm(signum, frame, owner=os.getpid()):
    if os.getpid() != owner:                # a forked DataLoader worker (kill -TERM to the group): leave quietly,
        os._exit(0)                         # exit 0 so torch's SIGCHLD check does not report it as a failure
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # once: a second SIGTERM must not interrupt the unwinding
    raise Terminated()


def run_command(main, stopped, out_of_memory=None, peer_lost=None):
    """main() as a command: Ctrl-C / SIGTERM end in the line stopped() (exit 130 / 143); an allocation failure in
    "error: " + out_of_memory(text) and, under torchrun, a lost peer in "error: " + peer_lost(text) (exit 1), each
    with the DataLoader workers stopped, never a stack trace. main's own exit (a user error: 1) is kept."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.excepthook = _quiet_fd_sharing
    code = 0
    try:
        main()
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)            # a second Ctrl-C or SIGTERM must not break the
        signal.signal(signal.SIGTERM, signal.SIG_IGN)           # clean-up
        code = 143 if isinstance(e, Terminated) else 130
        _release(e)
        _say(stopped())
    except (MemoryError, RuntimeError) as e:
        text = " ".join(str(e).split())
        if out_of_memory and (isinstance(e, MemoryError) or NO_MEMORY.search(text)):
            code = 1
            _release(e)
            _say("error: " + out_of_memory(text))
        elif peer_lost and PEER_LOST.search(text) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            code = 1
            _release(e)
            if first_to_report():
                _say("error: " + peer_lost(text))
        else:
            raise
    sys.exit(code)


def _quiet_fd_sharing(args, default=threading.excepthook):
    """multiprocessing's fd-sharing thread (DataLoader workers fetch tensors' file descriptors through it) fails with
    a closed connection when a worker dies mid-handshake, as workers do while a stopped run unwinds, before _release
    (on a busy machine, or a lost torchrun peer): not an error of the run, so not printed. Any other is."""
    files = [f.filename for f in traceback.extract_tb(args.exc_traceback)]
    if issubclass(args.exc_type, (ConnectionError, EOFError)) and any("resource_sharer" in f for f in files):
        return
    default(args)


def _release(e):
    """Drop the frames the exception holds (the data stream and its DataLoader workers), so they shut down now,
    quietly: a worker killed by the same signal is no failure (torch's SIGCHLD check), nor is a worker's socket
    closing under multiprocessing's fd-sharing thread."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    threading.excepthook = lambda args: None
    traceback.clear_frames(e.__traceback__)
    gc.collect()


def _say(line):
    if int(os.environ.get("RANK", "0")) == 0 or line.startswith("error: rank"):
        print(line, file=sys.stderr, flush=True)


def asked_for(text):
    """The allocation an out-of-memory message names ("2.00 GiB", "123 bytes"), or None."""
    found = re.search(r"allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    return found[1] if found else None


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
            fail(f"cannot write to {self.folder} ({name}): {e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}) "
                 f"{self.doing}; {self.written()}; expected a writable {self.flag} folder with free space")
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


# ----------------------------------------------------------------------------- the scripts' own flags

RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0}


def number_flag(kind, rule):
    """argparse type of a script's own number flag (train.py's settings: settings.number): int or float, finite,
    in the range `rule` ("> 0", ">= 0"); the error names the value and the range."""
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


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
