"""Helpers several test files share (pytest loads this file first; tests import it as `from conftest import ...`).

TINY: train.py flags for a run that takes seconds on a CPU. unit: seeded random unit vectors. free_port: a TCP port for a 2-rank gloo group.
start_as_a_terminal_would: a script in its own session with Ctrl-C and SIGTERM as a terminal delivers them (the
stop tests). state: a checkpoint's dict. user_error: the one `error:` line of a user error. save_image: a small image or label
file. tiny_checkpoint: a train.py-format file around untrained weights (the keys save_checkpoint writes: model,
config, iter). small_hrnet: a seeded HRNet-W18-small-v2 backbone in eval mode (the strict-loading tests and the neck
test). The fixtures sgd and adamw: the two training runs the loop tests spy on (tests/loop_spies.py).
"""
import dataclasses
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:            # `pytest tests/x.py` finds the scripts at the root, as `python -m pytest` does
    sys.path.insert(0, ROOT)

# small images, few val images, no loader workers, K = 3 (D = 8+16+32+64 = 120 for hrnet_tiny)
TINY = ["--backbone", "hrnet_tiny", "--crop", "64", "64", "--batch-size", "4", "--val-size", "2",
        "--workers", "0", "--log-every", "1", "--num-prototypes", "3"]


def unit(*shape, seed=0):
    """Random vectors of the shape, l2-normalised over the last axis, from a generator seeded with `seed`."""
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signals_at_their_defaults():
    """In the child before exec: SIGINT and SIGTERM delivered, with their default actions, as in a terminal's
    foreground job. A job a script starts in the background (`pytest &`, nohup, some CI runners) inherits SIGINT
    ignored, and Python started so never raises KeyboardInterrupt: a stop test's Ctrl-C would be lost."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def start_as_a_terminal_would(args, cwd=ROOT, **kw):
    """`python *args` in its own session (os.killpg reaches it and its workers, as a terminal's Ctrl-C reaches its
    foreground job), SIGINT and SIGTERM at their defaults; stdout and stderr pipes of text unless kw says."""
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, text=True, start_new_session=True,
                            preexec_fn=_signals_at_their_defaults, **kw)


def state(path):
    return torch.load(path, weights_only=True)


def save_image(path, array, mode=None, **kw):
    """array (H, W) or (H, W, 3) to path; kept as bool, uint16 or float32 (16-bit, float TIFF), else as uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(array)
    Image.fromarray(a if a.dtype in (bool, np.uint16, np.float32) else a.astype(np.uint8), mode).save(path, **kw)
    return path


def tiny_checkpoint(path, it=1, seed=0, **config):
    """A train.py checkpoint of a model with seeded random weights; config overrides settings.Config's defaults."""
    import settings
    from models import model_from_config
    cfg = {**dataclasses.asdict(settings.Config()), **config}
    torch.manual_seed(seed)
    torch.save({"model": model_from_config(cfg).state_dict(), "config": cfg, "iter": it}, path)
    return path


def user_error(capsys, fn, *args):
    """The one stderr line of a user error (exit code 1) that fn raises."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def small_hrnet(seed=0):
    from models import build_backbone
    torch.manual_seed(seed)
    return build_backbone("hrnet18_small_v2").eval()


def recipe_facts_where_used(dataset, backbone, ref):
    """The published recipe's facts that are not settings, checked where the code uses them: the warm-up start
    (train.learning_rate at 0), poly to min_lr, the backbone's largest drop-path rate and torch's AdamW betas.
    ref: the recipe's entry of testdata/transformer_recipes.json. Returns (config, model on the meta device)."""
    import models
    import settings
    import train
    from layers import DropPath
    cfg, _ = settings.parse_args(["--dataset", dataset, "--backbone", backbone])
    sched = ref["lr_schedule"]
    assert train.learning_rate(cfg, 0) == pytest.approx(cfg.lr * sched["warmup_ratio"], rel=1e-6)
    assert train.learning_rate(cfg, cfg.iters) == sched["min_lr"]
    cfg.num_classes = 5
    with torch.device("meta"):
        net = models.model_from_config(cfg)
    assert max(m.p for m in net.backbone.modules() if isinstance(m, DropPath)) == ref["backbone"]["drop_path_rate"]
    assert train.make_optimizer(cfg, net).defaults["betas"] == tuple(ref["optimizer"]["betas"])   # torch's default
    return cfg, net


@pytest.fixture(scope="module")
def sgd(tmp_path_factory):
    """The SGD run of the loop tests (loop_spies.SGD, stopped and resumed): (its Spies, its out_dir)."""
    from loop_spies import run_sgd
    out = tmp_path_factory.mktemp("sgd")
    return run_sgd(out), out


@pytest.fixture(scope="module")
def adamw(tmp_path_factory):
    """The AdamW run of the loop tests (loop_spies.ADAMW): (its Spies, its out_dir)."""
    from loop_spies import run_adamw
    out = tmp_path_factory.mktemp("adamw")
    return run_adamw(out), out
