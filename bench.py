"""Benchmarks behind the paper's cost claims. Prints one table; medians of repeated runs after warm-up.

    python bench.py            # full sizes (a GPU is best; on a 2-core CPU it takes a while)
    python bench.py --quick    # smaller inputs, CPU-friendly (~2-3 minutes)
    python bench.py sinkhorn   # only rows (a) and (b)
    python bench.py vocab      # only row (f); --quick: hrnet18_small_v2 on the CPU in a few minutes

It writes no file. Ctrl-C / SIGTERM end in one line naming the row it stopped in (the rows above are complete),
exit 130 / 143.

(a) Sinkhorn clustering of 10K pixels into 10 prototypes, D = 720, similarities included (paper: 2.5 ms, GPU); and
    of 65,536 pixels of 150 classes, every class in one call (sinkhorn.py) vs a Python loop over the classes
(b) one prototype step (clustering + PPC/PPD losses with backward + Eq. 14 update), 2 x 128 x 256 pixels,
    19 classes, K = 10, D = 720: this implementation vs a per-class Python loop (the official code's structure)
(c) inference, ProtoSeg head vs softmax head on the same backbone (the paper: no extra test-time cost)
(d) one training step, ProtoSeg vs softmax, interleaved in one process, and the peak memory of each (fresh processes)
(e) learnable parameters of the head (ProtoSeg with Eq. 6 scores) for 19, 150 and 847 classes
(f) `vocab` only: head parameters, train step time and step memory (peak above the weights and inputs),
    ProtoSeg (K = 10) / softmax for C = 19, 150, 847; each configuration in fresh processes, interleaved; the
    two steps' FLOP ratio beside the time ratio
"""
import argparse
import multiprocessing
import os
import re
import signal
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from collectives import default_device
from commands import Parser, device_flag, ranged, run_command
from models import build_model
from protoseg import HEADS, ppc_loss, ppd_loss, seg_loss, similarities, sinkhorn_targets, update_prototypes
from sinkhorn import sinkhorn


def timeit(fn, device, warmup=3, repeats=10):
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def proto_step(embed, labels, protos, kappa=0.05, iters=3, mu=0.999):
    """The prototype part of ProtoSegHead's training step, with its functions (protoseg.py): similarities,
    clustering + Eq. 14 update, PPC/PPD + backward.
    embed: (B, D, h, w) unit, labels: (B, h, w)."""
    sim = similarities(embed, protos)                                          # (B, C, K, h, w)
    target = sinkhorn_targets(sim.detach(), labels, kappa, iters)
    (ppc_loss(sim.flatten(1, 2), target) + ppd_loss(sim.flatten(1, 2), target)).backward()
    return update_prototypes(protos, embed.detach(), target, mu)


def proto_step_loop(embed, labels, protos, kappa=0.05, iters=3, mu=0.999):
    """The same math with a Python loop over classes and prototypes, as the official code does it."""
    C, K, D = protos.shape
    sim = embed @ protos.reshape(C * K, D).T                                   # (N, C*K)
    target = torch.zeros_like(labels)
    new = protos.clone()
    for c in labels.unique().tolist():
        mask = labels == c
        with torch.no_grad():
            own = sim[mask][:, c * K:(c + 1) * K].detach()
            q = sinkhorn(own, torch.zeros(len(own), dtype=torch.long, device=own.device), 1, kappa, iters)
            assign = q.argmax(1)
        target[mask] = c * K + assign
        e = embed.detach()[mask]
        for k in range(K):
            members = e[assign == k]
            if len(members):
                new[c, k] = F.normalize(mu * protos[c, k] + (1 - mu) * F.normalize(members.sum(0), dim=0), dim=0)
    loss = ppc_loss(sim, target) + ppd_loss(sim, target)
    loss.backward()
    return new


def memory_now(device):
    """Bytes in use now: GPU allocated, or this process's resident set (Linux /proc)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        open("/proc/self/clear_refs", "w").write("5")                       # Linux: resets VmHWM


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def train_step(backbone, head, size, device, num_classes=19):
    """A model and a closure doing one SGD training step on a fixed random batch (labels uniform over C)."""
    torch.manual_seed(0)
    model = build_model(backbone, head, num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(2, 3, *size, device=device)
    labels = torch.randint(0, num_classes, (2, *size), device=device)

    def step():                                                                # train.py's iteration
        out = model(images, labels)
        loss, _ = seg_loss(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if "update_target" in out:                                             # Eq. 14
            model.head.prototypes.copy_(update_prototypes(model.head.prototypes, out["embed"],
                                                          out["update_target"], 0.999))
    return model, step


def train_step_child(queue, backbone, head, size, device_name, num_classes=19):
    """Training steps measured in a fresh process, so the peak is this configuration's own.
    Puts (median step seconds, peak GB, peak GB above the weights and inputs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to report; it ends this process
    device = torch.device(device_name)
    torch.set_flush_denormal(True)
    model, step = train_step(backbone, head, size, device, num_classes)
    reset_peak(device)
    base = memory_now(device)
    t = timeit(step, device, warmup=2, repeats=3 if device.type == "cpu" else 10)
    peak = peak_memory(device)
    queue.put((t, peak / 2**30, (peak - base) / 2**30))


def run_child(*args, exact_rss=False):
    """train_step_child in a fresh process. exact_rss: glibc returns every block >= 128 KB to the system when
    freed (a fixed mmap threshold), so the resident set follows the live tensors (CPU memory, not timing)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=train_step_child, args=(queue, *args), daemon=True)   # ended with the parent
    env = dict(os.environ)
    if exact_rss:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    p.start()
    os.environ.clear()
    os.environ.update(env)
    result = queue.get()
    p.join()
    return result


def head_pair(backbone, size, device, num_classes, repeats, exact_rss=False):
    """ProtoSeg vs softmax training steps: memory of each head in a fresh process ((peak, peak above weights and
    inputs) GB), then both heads' step times in this process, interleaved P S P S ... after 2 warm-up rounds,
    medians. -> (times, memories, head parameter counts), each a (ProtoSeg, softmax) pair."""
    heads = ("protoseg", "softmax")
    memory = [run_child(backbone, h, size, str(device), num_classes, exact_rss=exact_rss)[1:] for h in heads]
    models, steps = zip(*(train_step(backbone, h, size, device, num_classes) for h in heads))
    params = [sum(p.numel() for p in m.head.parameters()) for m in models]
    times = [[] for _ in heads]
    for i in range(repeats + 2):
        for t, step in zip(times, steps):
            t.append(timeit(step, device, warmup=0, repeats=1) if i >= 2 else step())
    return [statistics.median(t[2:]) for t in times], memory, params


def step_flops(backbone, head, size, device, num_classes):
    """The FLOPs of one training step (matrix products and convolutions, as FlopCounterMode counts them)."""
    step = train_step(backbone, head, size, device, num_classes)[1]
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def vocab(args, row):
    """(f): for C = 19, 150, 847 (K = 10): head_pair at the paper's scale (or --quick)."""
    device = torch.device(args.device)
    backbone = "hrnet18_small_v2" if args.quick else "hrnet48"
    size = (128, 256) if args.quick else (512, 1024)
    for c in (19, 150, 847):
        (tp, ts), ((_, mp_), (_, ms)), params = head_pair(backbone, size, device, c, args.repeats, exact_rss=True)
        fp, fs = (step_flops(backbone, h, size, device, c) for h in ("protoseg", "softmax"))
        row(f"C={c:<4d} {backbone} 2x{size[0]}x{size[1]}: params {params[0] / 1e6:.2f}M / {params[1] / 1e6:.2f}M, "
            f"step {tp * 1e3:.0f} / {ts * 1e3:.0f} ms, memory {mp_:.2f} / {ms:.2f} GB",
            "", f"time ratio {tp / ts:.3f} (FLOPs {fp / fs:.3f}) memory ratio {mp_ / ms:.3f}")


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="?", choices=["sinkhorn", "vocab"], help="only rows (a)-(b), or only (f)")
    p.add_argument("--quick", action="store_true", help="smaller inputs for a CPU")
    p.add_argument("--repeats", type=ranged(int, "> 0"), default=5,
                   help="(f): interleaved timed steps per head and C (default 5)")
    p.add_argument("--device", type=device_flag, default=default_device(), help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.repeats != p.get_default("repeats") and args.only != "vocab":
        p.error(f"--repeats {args.repeats}: the timed steps of row (f), which only `bench.py vocab` measures; "
                "expected it with vocab, or no --repeats")
    return args


def main(argv=None, progress=None):
    """The table, row by row (printed as each is measured); returns its rows (label, value, ratio).
    progress: {"row": the row being measured} for the line of a stopped run (cli)."""
    args = parse_args(argv)
    progress = {} if progress is None else progress
    device = args.device
    torch.set_flush_denormal(True)            # untrained HRNet features are tiny; denormals slow the CPU down
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []

    def row(label, value, ratio=""):
        rows.append((label, value, ratio))
        print(f"{label:<62s} {value:>22s} {ratio}", flush=True)

    steps = [("f", vocab)] if args.only == "vocab" else \
        [("a, b", sinkhorn_rows)] + ([] if args.only else [("c", inference_rows), ("d", train_rows), ("e", param_rows)])
    progress["row"] = steps[0][0]
    print(f"device: {name}; torch {torch.__version__}; {'quick' if args.quick else 'full'} sizes", flush=True)
    for which, rows_of in steps:
        progress["row"] = which
        rows_of(args, row)
    return rows


def sinkhorn_rows(args, row):
    """(a) Sinkhorn alone; (b) one prototype step, ours vs the per-class loop."""
    device = args.device
    g = torch.Generator(device="cpu").manual_seed(0)
    x = F.normalize(torch.randn(10_000, 720, generator=g), dim=1).to(device)
    prototypes = F.normalize(torch.randn(10, 720, generator=g), dim=1).to(device)
    one_class = torch.zeros(len(x), dtype=torch.long, device=device)
    t = timeit(lambda: sinkhorn(x @ prototypes.T, one_class, 1), device, repeats=50)
    row("(a) Sinkhorn, 10K pixels -> 10 prototypes, D=720", f"{t * 1e3:.2f} ms", "(paper, GPU: 2.5 ms)")
    n = 2 * 128 * 256
    own, labels = torch.rand(n, 10, generator=g).to(device), torch.randint(0, 150, (n,), generator=g).to(device)
    t_all = timeit(lambda: sinkhorn(own, labels, 150), device, repeats=10)
    t_loop = timeit(lambda: [sinkhorn(own[labels == c], labels[labels == c] * 0, 1) for c in range(150)], device,
                    warmup=1, repeats=3)
    row("(a) Sinkhorn, 65,536 px of 150 classes, K=10: every class at once", f"{t_all * 1e3:.1f} ms")
    row("    a loop over the classes", f"{t_loop * 1e3:.1f} ms", f"loop/once = {t_loop / t_all:.2f}x")
    embed = F.normalize(torch.randn(2, 720, 128, 256, generator=g), dim=1).to(device).requires_grad_()
    labels = torch.randint(0, 19, (2, 128, 256), generator=g).to(device)
    protos = F.normalize(torch.randn(19, 10, 720, generator=g), dim=-1).to(device)
    flat = embed.detach().permute(0, 2, 3, 1).reshape(n, 720).requires_grad_()   # (N, D) for the loop
    t_ours = timeit(lambda: proto_step(embed, labels, protos), device, warmup=2, repeats=5)
    t_loop = timeit(lambda: proto_step_loop(flat, labels.flatten(), protos), device, warmup=2, repeats=5)
    row("(b) prototype step, 65,536 px, C=19, K=10, D=720: ours", f"{t_ours * 1e3:.1f} ms")
    row("    same math, per-class loop (official structure)", f"{t_loop * 1e3:.1f} ms",
        f"loop/ours = {t_loop / t_ours:.2f}x")


def backbones(args):
    return ["hrnet18_small_v2", "mit_b0", "swin_tiny"] + ([] if args.quick else ["hrnet48"])


def inference_rows(args, row):
    """(c) inference time, ProtoSeg head vs softmax head on the same backbone."""
    device = args.device
    size = (256, 512) if args.quick else (512, 1024)
    for backbone in backbones(args):
        times = {}
        for head in ("protoseg", "softmax"):
            torch.manual_seed(0)
            model = build_model(backbone, head, 19).to(device).eval()
            image = torch.randn(1, 3, *size, device=device)
            with torch.no_grad():
                times[head] = timeit(lambda: model(image), device, warmup=2, repeats=5 if device.type == "cpu" else 20)
            del model
        row(f"(c) inference {backbone} {size[0]}x{size[1]}: ProtoSeg / softmax",
            f"{times['protoseg'] * 1e3:.0f} / {times['softmax'] * 1e3:.0f} ms",
            f"ratio {times['protoseg'] / times['softmax']:.3f}")


def train_rows(args, row):
    """(d) one training step and its peak memory, ProtoSeg vs softmax, interleaved as (f)."""
    device = args.device
    size = (128, 256) if args.quick else (512, 1024)
    for backbone in backbones(args):
        (tp, ts), ((mp_, _), (ms, _)), _ = head_pair(backbone, size, device, 19, 3 if device.type == "cpu" else 10)
        row(f"(d) train step {backbone}, 2x{size[0]}x{size[1]}: ProtoSeg / softmax",
            f"{tp * 1e3:.0f} / {ts * 1e3:.0f} ms", f"ratio {tp / ts:.3f}")
        row(f"    peak memory ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})",
            f"{mp_:.2f} / {ms:.2f} GB", f"ratio {mp_ / ms:.3f}")


def param_rows(args, row):
    """(e) learnable parameters of the head for 19, 150 and 847 classes."""
    for backbone, d in (("hrnet48", 720), ("mit_b0", 256), ("swin_tiny", 512)):  # D: the neck's width
        for c in (19, 150, 847):
            count = {h: sum(q.numel() for q in HEADS[h](d, c, **kw).parameters())
                     for h, kw in (("protoseg", {"class_layernorm": False}), ("softmax", {}))}
            row(f"(e) head learnable parameters, {backbone}, C={c}, D={d}: ProtoSeg (Eq. 6) / softmax",
                f"{count['protoseg']:,} / {count['softmax']:,}", f"diff {count['softmax'] - count['protoseg']:+,}")


def cli(argv=None):
    """main() as a command: Ctrl-C / SIGTERM and out of memory end in one line naming the row (exit 130 / 143 / 1)."""
    progress = {}
    where = lambda: f"in row ({progress['row']})" if progress.get("row") else "before the first row"
    run_command(lambda: main(argv, progress),
                lambda: f"interrupted {where()}; the rows printed above are complete; nothing written",
                out_of_memory=lambda text: f"out of memory {where()}; the rows printed above are complete; expected "
                                           "sizes that fit this device: --quick, or a device with more memory")


if __name__ == "__main__":
    cli()
