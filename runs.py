"""The run directory (out_dir) of train.py: the kinds of the paths a run is given, one run at a time, log.jsonl that a
resumed run continues, the training curves, and the one-line ends of a stopped run (checkpoints.py writes last.pt;
commands.py runs the script).

    out_dir/last.pt       the latest checkpoint: {"model", "optimizer", "scaler", "iter", "config"}
    out_dir/log.jsonl     one JSON row per logged iteration, evaluation and the final metrics
    out_dir/metrics.json  the final evaluation (strict JSON, class names beside each number)
    out_dir/config.json   the resolved settings
    out_dir/curves.png    the training curves, drawn from log.jsonl
    out_dir/run.lock      the pid of the run using the folder (removed when it ends)
"""
import errno
import json
import os
import sys

import torch

import draw
from collectives import all_reduce, rank_and_world
from commands import PEER_LOST, Outputs, asked_for, exit_with_error, within
from datafiles import unreadable_reason


def check_paths(cfg):
    """The kind of each path flag before anything runs: a folder where a folder is meant, a file where a file is."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        exit_with_error(f"--out-dir {cfg.out_dir} is a file, expected a folder (created if missing)")
    if cfg.data_root and not os.path.isdir(cfg.data_root):
        found = "a file" if os.path.exists(cfg.data_root) else unreadable_reason(cfg.data_root)
        exit_with_error(f"--data-root {cfg.data_root}: {found}, expected the dataset's folder")
    if cfg.pretrained and not os.path.isfile(cfg.pretrained):
        found = "a folder" if os.path.isdir(cfg.pretrained) else unreadable_reason(cfg.pretrained)
        exit_with_error(f"--pretrained {cfg.pretrained}: {found}, expected a weights file (.pth, or a run's last.pt)")


def check_outputs(cfg, resumed=None):
    """The run's files land on none of its inputs nor on another run's: --overwrite does not replace the
    --pretrained file, and a resumed checkpoint (the file `resumed`) does not continue over another last.pt."""
    last = os.path.join(cfg.out_dir, "last.pt")
    if cfg.pretrained and cfg.overwrite and os.path.realpath(cfg.pretrained) == os.path.realpath(last):
        exit_with_error(f"--pretrained {cfg.pretrained} is the last.pt that --overwrite replaces in --out-dir "
                        f"{cfg.out_dir}; expected weights outside the run folder: copy them first, or choose another "
                        "--out-dir")
    if resumed and not cfg.eval_only and os.path.isfile(last) and not os.path.samefile(last, resumed):
        exit_with_error(f"--resume {resumed} would continue in --out-dir {cfg.out_dir} over its last.pt, another "
                        f"checkpoint; expected the checkpoint's own folder (--out-dir {os.path.dirname(resumed) or '.'})"
                        f" or a new --out-dir (to continue that run from this checkpoint: copy it over {last}, then "
                        "--resume auto)")


def check_out_dir(out, flag, data_root, *datasets):
    """An output folder is none of the folders the data's files are read from, nor inside one: the outputs would
    sit among the data's, and a folder dataset would read the pictures back as images."""
    folders = {p.parent for d in datasets for _, *files in getattr(d, "pairs", ()) for p in files}
    inside = sorted(str(f) for f in folders if within(out, f))
    if inside:
        exit_with_error(f"{flag} {out} is inside {inside[0]}, a folder of --data-root {data_root} that the data is "
                        f"read from; expected an {flag} outside the data's folders")


def claim_out_dir(cfg, resuming):
    """out_dir belongs to one run: a lock file keeps a second one out; an earlier run's last.pt needs
    --resume or --overwrite. Returns the lock path (removed at exit)."""
    lock = os.path.join(cfg.out_dir, "run.lock")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if not os.path.isdir(cfg.out_dir):
            exit_with_error(f"--out-dir {cfg.out_dir} is a file, expected a folder (created if missing)")
        pid = open(lock).read().strip()
        if pid.isdigit() and _alive(int(pid)):
            exit_with_error(f"out_dir {cfg.out_dir} is in use by another run (pid {pid}, "
                            f"{lock}){_stale_hint(int(pid), lock)}; wait for it or choose another --out-dir")
        os.remove(lock)                                         # left by a run that died
        return claim_out_dir(cfg, resuming)
    except OSError as e:
        exit_with_error(f"cannot write to out_dir {cfg.out_dir}: {e.strerror}; choose a writable --out-dir")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    last = os.path.join(cfg.out_dir, "last.pt")
    if os.path.exists(last) and not resuming and not cfg.overwrite and not cfg.eval_only:
        os.remove(lock)
        exit_with_error(f"{last} holds an earlier run; continue it with --resume auto, or replace it with --overwrite "
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


def _alive(pid):
    try:
        os.kill(pid, 0)
        return pid != os.getpid()
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def checkpoint_path(cfg):
    """The file --resume names: 'auto' = out_dir/last.pt (None if absent, which starts afresh; --eval-only fails);
    a run folder = its last.pt."""
    if cfg.resume == "auto":
        path = os.path.join(cfg.out_dir, "last.pt")
        if os.path.isfile(path):
            return path
        if cfg.eval_only:
            exit_with_error(f"--eval-only --resume auto: no last.pt in {cfg.out_dir} ({unreadable_reason(path)}), "
                            "expected a run's checkpoint there; give --out-dir RUN or --resume CHECKPOINT")
        return None
    if os.path.isdir(cfg.resume):
        path = os.path.join(cfg.resume, "last.pt")
        if not os.path.isfile(path):
            exit_with_error(f"--resume {cfg.resume}: a folder without last.pt, expected a checkpoint file or a run "
                            "folder holding last.pt")
        return path
    if not os.path.isfile(cfg.resume):
        exit_with_error(f"--resume {cfg.resume}: {unreadable_reason(cfg.resume)}, expected a checkpoint file "
                        "(runs/*/last.pt), a run folder or 'auto'")
    return cfg.resume


def completed_run_message(cfg, ckpt):
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


def last_good(cfg, saved_it):
    path = os.path.join(cfg.out_dir, "last.pt")
    if saved_it:
        return f"The last good checkpoint, after iteration {saved_it}, is {path}."
    return "No checkpoint of this run was written."


def open_log(cfg, start):
    """log.jsonl open for appending, keeping only the rows up to the resumed iteration (a replayed stretch is logged
    again); the kept rows are rewritten whole or not at all."""
    path = os.path.join(cfg.out_dir, "log.jsonl")
    rows = []
    if start and os.path.exists(path):
        rows = [r for r in open(path).read().splitlines() if r.strip() and json.loads(r).get("iter", 0) <= start]
    Outputs(cfg.out_dir, "--out-dir").text("log.jsonl", "".join(r + "\n" for r in rows))
    return open(path, "a")


def log_row(f, row):
    if f is None:
        return
    try:
        f.write(json.dumps(row) + "\n")
        f.flush()
    except OSError as e:                                        # a full disk: the run cannot keep its record
        exit_with_error(f"cannot write to {f.name}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)}) at "
                        f"iteration {row.get('iter')}; expected a writable --out-dir with free space (last.pt holds "
                        "the last checkpoint; --resume auto continues)")


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


def stop_if_any_rank_failed(error, device):
    """error: this rank's one-line data error, or None. If any rank has one, every rank stops (exit 1) and the
    first failing rank prints its line, so a bad file on one rank never leaves the others waiting."""
    rank, world = rank_and_world()
    if world == 1:
        return exit_with_error(error) if error is not None else None
    flags = torch.zeros(world)
    flags[rank] = error is not None
    flags = all_reduce(flags.to(device)).cpu()
    if flags.any():
        if error is not None and rank == int(flags.nonzero()[0]):
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1)


# ----------------------------------------------------------------------------- the training curves

CURVES = (("loss", "loss (Eq. 13)"), ("ce", "ce (Eq. 7)"), ("ppc", "ppc (Eq. 11)"), ("ppd", "ppd (Eq. 12)"),
          ("aux", "aux head ce"), ("lr", "learning rate"))


def write_curves(out_dir):
    """out_dir/curves.png from log.jsonl: each logged term and the lr per iteration, and the val mIoU of every
    evaluation, each titled with its last value; written whole. Returns its path."""
    rows = [json.loads(r) for r in open(os.path.join(out_dir, "log.jsonl")).read().splitlines() if r.strip()]
    curves = [(title, [(r["iter"], r[key]) for r in rows if key in r]) for key, title in CURVES]
    curves.append(("val mIoU (%)", [(r["iter"], 100 * (r.get("val") or r.get("final"))["miou"]) for r in rows
                                    if (r.get("val") or r.get("final") or {}).get("miou") is not None]))
    panels = [draw.titled(draw.line_chart(points, colour=(200, 60, 30) if title.startswith("val") else (30, 90, 200))
                          if len(points) > 1 else draw.text_panel(["one value (--eval-every N draws a curve)"], 250),
                          f"{title}: {points[-1][1]:.4g} at {points[-1][0]}") for title, points in curves if points]
    path = os.path.join(out_dir, "curves.png")
    if panels:
        Outputs(out_dir, "--out-dir").save(draw.grid(panels, 3, gap=10), "curves.png")
    return path


# ----------------------------------------------------------------------------- how a run stops: one line each

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
