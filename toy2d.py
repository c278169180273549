"""ProtoSeg on points: the method's steps, with this project's own functions, where every pixel can be seen.

    python toy2d.py                               # unit circle (D = 2), seconds on a CPU, into runs/toy2d
    python toy2d.py --out runs/toy3d --dim 3      # unit sphere (D = 3), drawn in projection (back half paler)

3 classes, each a mixture of 3 sub-clusters of unequal size in the plane; a tiny MLP embeds a point into a unit
vector (the "pixel embedding"); K = 3 prototypes per class; class scores = LayerNorm of max_k cosine (train.py's
default); the loss is protoseg.seg_loss (Eq. 13), the clustering sinkhorn.sinkhorn (Eq. 8-10), the update
protoseg.momentum_update (Eq. 14). Pictures:
  a_assign.png    one unbalanced class (sub-clusters of 140 / 40 / 20 points), 3 prototypes: nearest prototype
                  (argmax) vs Sinkhorn's equipartition (Eq. 8-10), with the count per prototype
  b_kappa.png     Sinkhorn's soft assignment for four kappa (colour = the mix of prototype hues)
  c_momentum.png  the prototypes' paths under Eq. 14 during training, mu = 0.999 (the paper) and mu = 0.9;
                  on the circle, radius = time (start inside, end on the circle)
  d_losses.png    the learned embedding with CE only vs CE + PPC + PPD, with the mean 1 - cosine to the
                  assigned prototype (what PPD minimises)
  train.gif       the embedding and prototypes during CE + PPC + PPD training
  toy2d.json      the numbers in the pictures
Every file is written whole or not at all; Ctrl-C / SIGTERM end in one line saying what was written (exit 130 / 143).
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import draw
from commands import Outputs, Parser, ranged, run_command
from protoseg import momentum_update, seg_loss
from sinkhorn import sinkhorn

C, K = 3, 3
SIZES = (140, 40, 20)                     # sub-cluster sizes of every class: unequal on purpose
CLASS_COLOURS = np.array([[220, 60, 60], [40, 150, 60], [50, 90, 220]], np.uint8)
KAPPA, ITERS = 0.05, 3                    # the paper's / official Sinkhorn settings
SOLVED = 100                              # Sinkhorn iterations that solve Eq. 9 here (column sums N/K to 0.01)
TOLERANCE = 0.1                           # ... and then every prototype's hard count lies within 10 % of N/K


def points(seed=0):
    """Inputs (N, 2), class (N,), sub-cluster (N,): class c's sub-cluster j is a blob at angle (3j + c) 2 pi / 9,
    so the classes interleave and the network has to bend the plane to separate them."""
    rng = np.random.default_rng(seed)
    x, y, s = [], [], []
    for c in range(C):
        for j, n in enumerate(SIZES):
            a = (3 * j + c) * 2 * math.pi / 9
            x.append(rng.normal(0, 0.12, (n, 2)) + [math.cos(a), math.sin(a)])
            y += [c] * n
            s += [j] * n
    return torch.tensor(np.concatenate(x), dtype=torch.float32), torch.tensor(y), torch.tensor(s)


def class_on_sphere(dim, seed=0):
    """One class's embeddings (N, dim) on the unit circle / sphere: 3 sub-clusters of SIZES, and K prototypes
    (K, dim), one on each sub-cluster's centre but the middle one, which sits between the large and middle ones."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.cat([a + 0.15 * torch.randn(n, generator=g) for a, n in zip((0.0, 0.8, 1.6), SIZES)])
    pts = torch.stack([angles.cos(), angles.sin()], 1)
    protos = torch.tensor([[math.cos(a), math.sin(a)] for a in (0.0, 0.6, 1.6)])
    if dim == 3:
        pts = torch.cat([pts, 0.3 * torch.randn(len(pts), 1, generator=g)], 1)
        protos = torch.cat([protos, torch.tensor([[0.2], [-0.2], [0.4]])], 1)
    return F.normalize(pts, dim=1), F.normalize(protos, dim=1)


def assignments(pts, protos, kappa=KAPPA, iters=ITERS):
    """(argmax assignment, Sinkhorn soft assignment L (N, K)) of one class's points to its prototypes."""
    sim = pts @ protos.T                                                       # (N, K) i^T p_k
    labels = torch.zeros(len(pts), dtype=torch.long)
    return sim.argmax(1), sinkhorn(sim, labels, 1, kappa, iters)                 # Eq. 10


def project(p, dim):
    """Unit vectors -> 2-D drawing coordinates and a depth in [0, 1] (1 = front); the sphere is turned to show it."""
    p = torch.as_tensor(p, dtype=torch.float32)
    if dim == 2:
        return p.numpy(), np.ones(len(p))
    a, b = math.radians(35), math.radians(25)
    rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    q = p @ (rx @ rz).T
    return q[:, [0, 2]].numpy(), ((q[:, 1] < 0).float() * 0.6 + 0.4).numpy()   # front (y < 0) full colour


def paler(colours, depth):
    """Back of the sphere: blended towards white."""
    c = np.asarray(colours, np.float32)
    c = c / 255 if c.max() > 1 else c
    return c * depth[:, None] + (1 - depth[:, None])


def view(pts, colours, dim, marks=(), size=220):
    """Points (and [(unit vector, colour)] marks) on the circle / sphere outline."""
    xy, depth = project(pts, dim)
    mxy = project(torch.stack([m for m, _ in marks]), dim)[0] if marks else []
    return draw.scatter(xy * 0.95, paler(colours, depth), size, marks=[(p * 0.95, c) for p, (_, c) in zip(mxy, marks)],
                        circle=True)


# ----------------------------------------------------------------------------- training

class Net(nn.Module):
    """2-D input -> unit vector in D dimensions, and the learnable LayerNorm over the class scores."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, dim))
        self.mask_norm = nn.LayerNorm(C)

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1)


def train(x, labels, dim, lambda_ppc, lambda_ppd, mu, steps=300, seed=0, every=0):
    """Train the embedding; returns (net, prototypes per step (steps + 1, C, K, D), frames of the embedding)."""
    torch.manual_seed(seed)
    net = Net(dim)
    protos = F.normalize(torch.randn(C, K, dim), dim=-1)                       # random start
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    path, frames, n = [protos], [], len(x)
    for t in range(steps):
        emb = net(x)                                                           # (N, D)
        sim = emb @ protos.reshape(C * K, dim).T                               # (N, C*K) i^T p_ck
        scores = net.mask_norm(sim.view(n, C, K).amax(2))                      # Eq. 6 (official LayerNorm)
        own = sim.detach().view(n, C, K)[torch.arange(n), labels]             # (N, K) own class
        assign = sinkhorn(own, labels, C, KAPPA, ITERS).argmax(1)      # Eq. 8-10
        out = {"scores": scores, "proto_sim": sim, "proto_target": labels * K + assign}
        loss, _ = seg_loss(out, labels, lambda_ppc, lambda_ppd, tau=0.1)       # Eq. 13 (Eq. 7, 11, 12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        protos = momentum_update(protos, emb.detach(), labels, assign, mu)     # Eq. 14
        path.append(protos)
        if every and t % every == 0:
            frames.append(frame(net, x, labels, protos, dim, f"step {t}"))
    return net, torch.stack(path), frames


def frame(net, x, labels, protos, dim, title):
    with torch.no_grad():
        emb = net(x)
    marks = [(protos[c, k], CLASS_COLOURS[c]) for c in range(C) for k in range(K)]
    return draw.titled(view(emb, CLASS_COLOURS[labels], dim, marks), title)


def compactness(net, x, labels, protos):
    """PPD's quantity, mean 1 - i^T p over points with p the prototype Sinkhorn assigns (Eq. 12); prototypes in
    use (nearest prototype of >= 5 % of a class's points), mean over classes; accuracy."""
    with torch.no_grad():
        emb = net(x)
        sim = (emb @ protos.reshape(C * K, -1).T).view(len(x), C, K)
        own = sim[torch.arange(len(x)), labels]                                # (N, K)
        assign = sinkhorn(own, labels, C, KAPPA, ITERS).argmax(1)
        spread = float((1 - own.gather(1, assign[:, None])).mean())
        nearest = torch.bincount(labels * K + own.argmax(1), minlength=C * K).view(C, K)
        in_use = float((nearest >= 0.05 * nearest.sum(1, keepdim=True)).sum(1).float().mean())
        acc = float((sim.amax(2).argmax(1) == labels).float().mean())
    return spread, in_use, acc


# ----------------------------------------------------------------------------- the pictures

def panel_a(dim):
    pts, protos = class_on_sphere(dim)
    hard, soft = assignments(pts, protos)
    solved = assignments(pts, protos, iters=SOLVED)[1]
    hues = draw.prototype_colours(K)
    marks = [(p, hues[k]) for k, p in enumerate(protos)]
    out, panels = {"solved_column_sums": solved.sum(0).tolist()}, []
    for key, name, a in (("argmax", "argmax (nearest prototype)", hard),
                         ("sinkhorn_3", f"Sinkhorn, {ITERS} iterations (official)", soft.argmax(1)),
                         ("sinkhorn_solved", f"Sinkhorn, {SOLVED} iterations (Eq. 9)", solved.argmax(1))):
        counts = torch.bincount(a, minlength=K).tolist()
        out[key] = counts
        panels.append(draw.column([draw.titled(view(pts, hues[a.numpy()], dim, marks), name),
                                   draw.legend([(hues[k], f"p{k}: {n}") for k, n in enumerate(counts)], 220)], 2))
    note = (f"one class, sub-clusters of {' / '.join(map(str, SIZES))} points; N/K = {len(pts) / K:.1f}; "
            f"kappa {KAPPA}. Eq. 9 asks every prototype to take N/K; {ITERS} iterations get only part of the "
            f"way when a prototype starts far from most points")
    body = draw.row(panels, 12)
    return draw.column([draw.text_panel([note], body.width), body]), out


def panel_b(dim):
    pts, protos = class_on_sphere(dim)
    hues = draw.prototype_colours(K)
    marks = [(p, hues[k]) for k, p in enumerate(protos)]
    panels, out = [], {}
    for kappa in (0.01, 0.05, 0.2, 1.0):
        soft = assignments(pts, protos, kappa)[1]
        conf = float(soft.max(1).values.mean())
        out[str(kappa)] = conf
        panels.append(draw.titled(view(pts, soft.numpy() @ hues, dim, marks, 180),
                                  f"kappa {kappa}: mean max L {conf:.2f}"))
    body = draw.row(panels, 10)
    note = "Sinkhorn's soft assignment L (colour = mix of prototype hues): small kappa = hard, large = uniform"
    return draw.column([draw.text_panel([note], body.width), body]), out


def path_view(path, emb, labels, dim, size=260):
    """Prototype paths (steps, C, K, D); on the circle the radius grows with time."""
    T = len(path) - 1
    if dim == 2:
        r = torch.linspace(0.3, 1.0, T + 1)[:, None, None, None]
        xy = (path * r).reshape(T + 1, C * K, 2).numpy()
        pts, depth = emb.numpy(), np.ones(len(emb))
    else:
        xy = np.stack([project(p.reshape(-1, 3), 3)[0] for p in path])
        pts, depth = project(emb, 3)
    img = draw.scatter(pts * 0.95, paler(CLASS_COLOURS[labels], depth) * 0.35 + 0.65, size, radius=1, circle=True)
    d = draw.ImageDraw.Draw(img)
    to_px = lambda p: ((p[0] * 0.95 + 1) * (size - 1) / 2, (1 - p[1] * 0.95) * (size - 1) / 2)
    for j in range(C * K):
        line = [to_px(p) for p in xy[:, j]]
        d.line(line, fill=tuple(int(v) for v in CLASS_COLOURS[j // K]), width=2)
        x, y = line[-1]
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=tuple(int(v) for v in CLASS_COLOURS[j // K]), outline=draw.BLACK)
    return img


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy2d", help="output folder (default: runs/toy2d)")
    p.add_argument("--dim", type=int, default=2, choices=(2, 3), help="2: the circle, 3: the sphere")
    p.add_argument("--steps", type=ranged(int, "> 0"), default=300, help="training steps (default 300)")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, expected a folder (created if missing)")
    return args


def main(argv=None, outputs=None):
    """The pictures and toy2d.json; returns the numbers. outputs: the commands.Outputs that records what is written."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                                   # tiny tensors: threads only wait
    try:
        return run(parse_args(argv), outputs or Outputs())
    finally:
        torch.set_num_threads(threads)


def run(args, outputs):
    outputs.folder = Path(args.out)
    report = {}
    outputs.doing = "while drawing panel (a)"
    img, report["a_counts"] = panel_a(args.dim)
    outputs.save(img, "a_assign.png")
    outputs.doing = "while drawing panel (b)"
    img, report["b_mean_max_L"] = panel_b(args.dim)
    outputs.save(img, "b_kappa.png")
    x, labels, _ = points()
    panels = []
    for mu in (0.999, 0.9):
        outputs.doing = f"while training with mu = {mu} for panel (c)"
        net, path, _ = train(x, labels, args.dim, 1.0, 1.0, mu, args.steps)
        with torch.no_grad():
            emb = net(x)
        moved = float((1 - (path[0] * path[-1]).sum(-1)).mean())
        report[f"c_mu_{mu}_mean_1_minus_cos_start_end"] = moved
        panels.append(draw.titled(path_view(path, emb, labels, args.dim),
                                  f"mu = {mu}: prototypes moved 1 - cos = {moved:.2f}"))
    outputs.save(draw.column([draw.row(panels, 12), draw.text_panel(
        ["Eq. 14 paths over training (dots: where each prototype ends; faint: the final embedding)"], 540)]),
        "c_momentum.png")
    frames = panel_d(x, labels, args, report, outputs)
    outputs.doing = "while writing train.gif and toy2d.json"
    outputs.save(frames[0], "train.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    outputs.text("toy2d.json", json.dumps(report, indent=1))
    print(json.dumps(report))
    print(f"wrote a_assign.png b_kappa.png c_momentum.png d_losses.png train.gif toy2d.json to {args.out}")
    return report


def panel_d(x, labels, args, report, outputs):
    """CE only vs CE + PPC + PPD (d_losses.png); returns the frames of the second training (train.gif)."""
    panels = []
    for name, lam in (("CE only", 0.0), ("CE + PPC + PPD", 1.0)):
        outputs.doing = f"while training {name} for panel (d)"
        net, path, frames = train(x, labels, args.dim, lam, lam, 0.99, args.steps, every=10 if lam else 0)
        spread, in_use, acc = compactness(net, x, labels, path[-1])
        report[f"d_{name}"] = {"mean_1_minus_cos_assigned": spread, "prototypes_in_use": in_use, "accuracy": acc}
        panels.append(frame(net, x, labels, path[-1], args.dim, f"{name}: accuracy {100 * acc:.0f} %"))
        panels[-1] = draw.column([panels[-1], draw.text_panel(
            [f"1 - cos to assigned prototype {spread:.3f}", f"prototypes in use per class {in_use:.1f} of {K}"],
            panels[-1].width)], 2)
    note = (f"{args.steps} Adam steps, mu = 0.99, lambda1 = lambda2 = 1 (the paper's 0.01 / 0.001 need longer runs); "
            "crosses: prototypes")
    body = draw.row(panels, 12)
    legend = draw.legend([(CLASS_COLOURS[c], f"class {c}") for c in range(C)], 400, "points coloured by class:")
    outputs.save(draw.column([body, legend, draw.text_panel([note], body.width)]), "d_losses.png")
    return frames


def cli(argv=None):
    """main() as a command: Ctrl-C / SIGTERM end in one line saying what was written (exit 130 / 143)."""
    outputs = Outputs()
    run_command(lambda: main(argv, outputs), outputs.stopped)


if __name__ == "__main__":
    cli()
