"""The numbers a user reads, each against a hand-computed value or a direct transcription: the metrics of a
confusion matrix, the Cityscapes categories and iIoU on tables small enough to count by hand (a category with one
pixel included), prototype purity / share / in-use of a known count table, the counts themselves against a loop,
metrics.json and the printed summary, the evaluation's progress line, the atlas's per-class entries and
predict.py's prototype maps."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import atlas
import draw
import evaluate
import predict
import settings
import train
from conftest import TINY
from data import SyntheticDataset
from labels import CITYSCAPES_MEAN_INSTANCE_SIZE, IGNORE_INDEX

nan = float("nan")


# ----------------------------------------------------------------------------- the metrics of small matrices

def test_metrics_of_one_labelled_pixel_and_of_none():
    one = evaluate.metrics_from_confusion(torch.tensor([[1, 0], [0, 0]]))
    assert (one["aacc"], one["miou"], one["macc"]) == (1.0, 1.0, 1.0) and math.isnan(one["iou"][1])
    wrong = evaluate.metrics_from_confusion(torch.tensor([[0, 1], [0, 0]]))
    assert (wrong["aacc"], wrong["iou"], wrong["macc"]) == (0.0, [0.0, 0.0], 0.0)
    none = evaluate.metrics_from_confusion(torch.zeros(2, 2, dtype=torch.long))
    assert math.isnan(none["miou"]) and math.isnan(none["macc"]) and none["aacc"] == 0.0


# ----------------------------------------------------------------------------- Cityscapes, counted by hand

def test_a_category_with_one_pixel_has_its_iou_and_absent_categories_none():
    conf = torch.zeros(19, 19, dtype=torch.long)
    conf[10, 10] = 1                                                 # one sky pixel, called sky
    conf[11, 12] = 1                                                 # one person pixel, called rider
    none = np.zeros((2, 19)), np.zeros((2, 2))
    s = evaluate.cityscapes_scores(conf, *none)
    assert s["category_iou"]["sky"] == 1.0 and s["category_iou"]["human"] == 1.0   # rider is human too
    assert all(math.isnan(v) for k, v in s["category_iou"].items() if k not in ("sky", "human"))
    assert s["mean_category_iou"] == 1.0
    conf[10, 10], conf[10, 0] = 0, 1                                 # the sky pixel called road instead
    s = evaluate.cityscapes_scores(conf, *none)
    assert s["category_iou"]["sky"] == 0.0 and s["category_iou"]["flat"] == 0.0   # FN of sky, FP of flat
    assert s["mean_category_iou"] == pytest.approx(1 / 3)


def test_instance_counts_and_iiou_of_a_hand_counted_frame():
    """Car 26001 (3 px: car, car, truck), person 24001 (1 px, right), car 26002 (2 px: car, building); road and a
    car pixel without an instance id count for no instance. Weight of an instance: mean size of its class / size."""
    instances = np.array([[26001, 26001, 26001, 24001], [7, 26, 26002, 26002]])
    pred = np.array([[13, 13, 14, 11], [0, 13, 13, 2]])
    per_class, per_category = evaluate.instance_counts(pred, instances)
    w1, w2, wp = CITYSCAPES_MEAN_INSTANCE_SIZE[13] / 3, CITYSCAPES_MEAN_INSTANCE_SIZE[13] / 2, \
        CITYSCAPES_MEAN_INSTANCE_SIZE[11]
    expected = np.zeros((2, 19))
    expected[:, 13] = [2 * w1 + w2, w1 + w2]
    expected[:, 11] = [wp, 0]
    np.testing.assert_allclose(per_class, expected, rtol=1e-12)
    np.testing.assert_allclose(per_category, [[wp, 3 * w1 + w2], [0, w2]], rtol=1e-12)   # human, vehicle
    conf = evaluate.confusion_matrix(torch.tensor([13, 13, 14, 11, 13, 2]), torch.tensor([13, 13, 13, 11, 13, 13]), 19)
    s = evaluate.cityscapes_scores(conf, per_class, per_category)
    assert s["iiou"]["car"] == pytest.approx((2 * w1 + w2) / (2 * w1 + w2 + w1 + w2 + 0))    # no FP of car
    assert s["iiou"]["truck"] == 0.0 and s["iiou"]["person"] == 1.0 and math.isnan(s["iiou"]["bus"])
    assert s["category_iiou"]["vehicle"] == pytest.approx((3 * w1 + w2) / (3 * w1 + w2 + w2))
    assert s["mean_iiou"] == pytest.approx(((2 * w1 + w2) / (3 * w1 + 2 * w2) + 0 + 1) / 3)


# ----------------------------------------------------------------------------- prototype use and purity

def test_purity_share_and_in_use_of_a_known_count_table():
    """counts (C=4, K=2, M=2). Class 0: p0 takes modes 3/1, p1 0/4: purity (3 + 4) / 8, shares 1/2, 1/2.
    Class 1: no pixel (None / NaN). Class 2: p1 takes 1 pixel of 20, exactly the 5 % threshold: in use.
    Class 3: p1 takes 1 pixel of 22, 4.5 %: not in use."""
    counts = torch.tensor([[[3, 1], [0, 4]], [[0, 0], [0, 0]], [[19, 0], [0, 1]], [[21, 0], [0, 1]]])
    s = evaluate.prototype_summary(counts)
    assert s["purity"][0] == pytest.approx(7 / 8) and math.isnan(s["purity"][1]) and s["purity"][2:] == [1.0, 1.0]
    assert s["prototype_share"] == [[0.5, 0.5], None, [19 / 20, 1 / 20], [21 / 22, 1 / 22]]
    assert s["prototypes_in_use"] == [2, None, 2, 1]
    assert evaluate.prototype_summary(counts, min_share=0.06)["prototypes_in_use"] == [2, None, 1, 1]
    one_mode = evaluate.prototype_summary(counts.sum(2, keepdim=True))
    assert "purity" not in one_mode and one_mode["prototype_share"] == s["prototype_share"]


def counts_by_loop(embed, label, modes, protos, num_modes):
    """Each labelled pixel of the feature grid (label by nearest neighbour): its class's nearest prototype, its
    mode clamped to 0..M-1."""
    (h, w), (H, W) = embed.shape[:2], label.shape
    C, K, _ = protos.shape
    out = torch.zeros(C, K, num_modes, dtype=torch.long)
    for y in range(h):
        for x in range(w):
            src = (int(y * H / h), int(x * W / w))
            c = int(label[src])
            if c == IGNORE_INDEX:
                continue
            m = min(max(int(modes[src]), 0), num_modes - 1) if modes is not None else 0
            out[c, int(torch.argmax(protos[c] @ embed[y, x])), m] += 1
    return out


@pytest.mark.parametrize("with_modes", [True, False])
def test_prototype_counts_equal_a_loop_over_pixels(with_modes):
    g = torch.Generator().manual_seed(0)
    embed = F.normalize(torch.randn(6, 7, 8, generator=g), dim=-1)
    protos = F.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    label = torch.randint(-1, 3, (12, 21), generator=g)
    modes = torch.randint(-1, 4, (12, 21), generator=g) if with_modes else None
    ours = evaluate.prototype_counts(embed, label, modes, protos, 3 if with_modes else 1)
    assert torch.equal(ours, counts_by_loop(embed, label, modes, protos, 3 if with_modes else 1))


# ----------------------------------------------------------------------------- metrics.json and the printed lines

M = {"miou": 0.5, "macc": 0.625, "aacc": 0.75, "images": 3, "seconds": 1.5, "iou": [0.25, 0.75, nan],
     "acc": [0.5, 0.75, nan], "purity": [0.5, 1.0, nan], "prototypes_in_use": [2, 3, None],
     "prototype_share": [[0.5, 0.5], [0.25, 0.75], None]}


def test_metrics_json_holds_each_class_by_name_and_the_means_of_what_has_a_value():
    report = evaluate.metrics_report(M, ["a", "b", "c"])
    assert report == {"miou": 0.5, "macc": 0.625, "aacc": 0.75, "images": 3, "seconds": 1.5, "mean_purity": 0.75,
                      "mean_prototypes_in_use": 2.5, "classes": {
                          "a": {"iou": 0.25, "acc": 0.5, "purity": 0.5, "prototypes_in_use": 2,
                                "prototype_share": [0.5, 0.5]},
                          "b": {"iou": 0.75, "acc": 0.75, "purity": 1.0, "prototypes_in_use": 3,
                                "prototype_share": [0.25, 0.75]},
                          "c": {"iou": None, "acc": None, "purity": None, "prototypes_in_use": None,
                                "prototype_share": None}}}


def test_printed_summary_is_percent_with_one_decimal_and_n_a():
    m = dict(M, mean_iiou=0.4, mean_category_iou=0.875, mean_category_iiou=nan)
    assert evaluate.format_metrics(m, ["a", "b", "a class with a long name"]).splitlines() == [
        "val mIoU  50.0 | mAcc  62.5 | aAcc  75.0 | 3 images",
        "                     a: IoU  25.0 | Acc  50.0 | prototypes in use 2 | prototype purity  50.0",
        "                     b: IoU  75.0 | Acc  75.0 | prototypes in use 3 | prototype purity 100.0",
        "  a class with a long : IoU   n/a | Acc   n/a | prototypes in use n/a | prototype purity   n/a",
        "mean prototype purity  75.0",
        "Cityscapes: iIoU  40.0 | category IoU  87.5 | category iIoU   n/a"]


@pytest.mark.parametrize("done, world, total, seconds, line", [
    (20, 2, 250, 16.0, "eval 40/250 images | 2.50 img/s | ETA 1.4 min"),      # (250 - 40) / 2.5 / 60
    (3, 2, 5, 4.0, "eval 5/5 images | 1.25 img/s | ETA 0.0 min")])            # the last rank's share ends it
def test_evaluation_progress_line_of_a_known_clock(monkeypatch, done, world, total, seconds, line):
    monkeypatch.setattr(evaluate.time, "time", lambda: 1000.0 + seconds)
    lines = []
    evaluate._progress(lambda text, flush: lines.append(text), done, total, 1000.0, world)
    assert lines == [line]


class Ticking(SyntheticDataset):
    """Val images whose reading moves the evaluation's clock on: image i by STEPS[i] seconds."""
    clock, STEPS = 0.0, [10.0, 10.0, 1.0, 5.0, 2.0]

    def __getitem__(self, i):
        Ticking.clock += self.STEPS[i]
        return super().__getitem__(i)


class Conv1x1(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head, self.align_corners = torch.nn.Conv2d(3, 5, 1), torch.nn.Identity(), False

    def forward(self, x):
        return {"scores": self.conv(x)}


@pytest.mark.parametrize("n, lines", [
    (5, ["eval 3/5 images | 0.14 img/s | ETA 0.2 min", "eval 5/5 images | 0.18 img/s | ETA 0.0 min"]),
    (2, ["eval 2/2 images | 0.10 img/s | ETA 0.0 min"]), (1, [])])
def test_evaluation_logs_progress_when_more_than_20_s_passed_and_at_the_end(monkeypatch, n, lines):
    """Images read at 10, 20, 21, 26 and 28 s: 20 s is not more than 20, 21 s is (image 3: 3 images in 21 s, 2 left);
    5 s later the end (image 5: 5 in 28 s); of 2 images, the end only; one image: no progress line. The metrics
    report the seconds the evaluation took."""
    Ticking.clock = 0.0
    monkeypatch.setattr(evaluate.time, "time", lambda: Ticking.clock)
    logged = []
    m = evaluate.evaluate(Conv1x1(), Ticking("val", length=n, size=16), settings.Config(workers=0),
                          log=lambda text, flush=False: logged.append(text))
    assert logged == lines and m["seconds"] == sum(Ticking.STEPS[:n]) and m["images"] == n


class Log(list):
    """train.py's RunLog as the loop uses it: lines, and log.jsonl rows in .rows."""
    rows = None

    def __call__(self, text, flush=False):
        self.append(text)

    def row(self, r):
        self.rows = (self.rows or []) + [r]


@pytest.mark.parametrize("device, mem", [("cuda", "3.00"), ("cpu", "1.50")])
def test_training_progress_line_of_known_values_and_peak_memory_in_gib(monkeypatch, device, mem):
    """Iteration 4 of 10, 2 iterations in 4 s: 0.50 it/s, 6 left: 12 s; memory: the GPU's peak allocation (3 GiB
    here), on a CPU the process's peak RSS (ru_maxrss in KiB: 1.5 GiB)."""
    monkeypatch.setattr(train.torch.cuda, "max_memory_allocated", lambda: 3 * 2 ** 30)
    monkeypatch.setattr(train.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=1.5 * 2 ** 20))
    log = Log()
    terms = {"ce": torch.tensor(1.25), "ppc": torch.tensor(2.5), "ppd": torch.tensor(0.125)}
    train.log_progress(settings.Config(iters=10), 4, torch.tensor(1.5), terms, 0.003, 2, 4.0, torch.device(device), log)
    assert log == [f"it 4/10 | loss 1.5000 (ce 1.2500 ppc 2.5000 ppd 0.1250) | lr 3.00e-03 | 0.50 it/s | ETA 0.2 min "
                   f"| mem {mem} GB"]
    assert log.rows == [{"iter": 4, "loss": 1.5, "ce": 1.25, "ppc": 2.5, "ppd": 0.125, "lr": 0.003, "it_per_s": 0.5,
                         "eta_s": 12.0, "mem_gb": float(mem)}]


def test_training_progress_line_of_a_known_schedule_of_times(monkeypatch, tmp_path, capsys):
    """Iterations 1-5 take 1, 3, 0.5, 1.5 and 4 s on train.py's clock; the evaluation after iteration 3 takes 100 s,
    which it/s leaves out. Logged after 2 (2 iterations in 4 s: 0.50 it/s; 3 left: 6 s), after 4 (2 in 2 s: 1.00;
    1 left: 1 s) and after the last (1 in 4 s: 0.25; none left); the run took 10 + 100 s."""
    now, steps = [0.0], iter([1.0, 3.0, 0.5, 1.5, 4.0])
    real_batch, real_evaluation = train.next_batch, train.run_evaluation

    def batch(*args):
        now[0] += next(steps)
        return real_batch(*args)

    def evaluation(*args):
        now[0] += 100.0
        return real_evaluation(*args)
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(train, "next_batch", batch)
    monkeypatch.setattr(train, "run_evaluation", evaluation)
    m = train.main(TINY + ["--crop", "32", "--batch-size", "2", "--val-size", "1", "--iters", "5", "--log-every", "2",
                          "--eval-every", "3", "--out-dir", str(tmp_path)])
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["it_per_s"], r["eta_s"]) for r in rows if "it_per_s" in r] == \
        [(2, 0.5, 6.0), (4, 1.0, 1.0), (5, 0.25, 0.0)]
    printed = [line for line in capsys.readouterr().out.splitlines() if " it/s | ETA " in line]
    assert [line.split(" | ")[3:5] for line in printed] == [["0.50 it/s", "ETA 0.1 min"], ["1.00 it/s", "ETA 0.0 min"],
                                                           ["0.25 it/s", "ETA 0.0 min"]]
    assert m["train_time_s"] == 110.0


@pytest.mark.parametrize("backbone, noted", [("hrnet_tiny", False), ("hrnet18_small_v2", True)])
def test_a_cpu_run_of_a_large_backbone_is_told_the_cpu_sized_settings(monkeypatch, tmp_path, capsys, backbone, noted):
    def stop(*args):
        raise KeyboardInterrupt                                      # the note comes before training; stop there
    monkeypatch.setattr(train, "train", stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--backbone", backbone, "--out-dir", str(tmp_path)])
    note = f"note: --backbone {backbone} trains slowly on a CPU; a CPU-sized run: --backbone hrnet_tiny"
    assert (note in capsys.readouterr().out) is noted


# ----------------------------------------------------------------------------- atlas.json and predict.py's maps

def test_atlas_class_entries_of_known_prototypes_counts_and_confusion():
    protos = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.0, 1.0]]])          # unit vectors
    model = SimpleNamespace(head=SimpleNamespace(unit_prototypes=lambda: protos))
    found = {"counts": torch.tensor([[[3, 1], [0, 4]], [[0, 0], [0, 0]]]), "conf": torch.tensor([[6, 2], [2, 0]])}
    classes = atlas.class_stats(model, found, ["a", "b"])
    np.testing.assert_allclose(classes["a"].pop("cosine"), [[1.0, 0.6], [0.6, 1.0]], rtol=1e-6)
    assert classes["a"] == {"pixels": 8, "prototype_share": [0.5, 0.5], "prototypes_in_use": 2,
                            "collapse": pytest.approx(0.6), "iou": pytest.approx(6 / 10), "purity": 7 / 8}
    b = classes["b"]
    assert (b["pixels"], b["prototype_share"], b["prototypes_in_use"], b["iou"]) == (0, None, None, 0.0)
    assert b["collapse"] == pytest.approx(1.0) and math.isnan(b["purity"])


class Protos(torch.nn.Module):
    """A model whose embeddings (1, h, w, D) and prototypes (C, K, D) are given."""

    def __init__(self, embed, protos):
        super().__init__()
        self.embed_, self.head = embed, SimpleNamespace(unit_prototypes=lambda: protos, prototypes=protos)

    def embed(self, image):
        return self.embed_


def test_prototype_map_is_the_nearest_prototypes_hue_at_its_cosine_on_the_class_pixels():
    g = torch.Generator().manual_seed(0)
    embed = F.normalize(torch.randn(1, 3, 4, 5, generator=g), dim=-1)
    protos = F.normalize(torch.randn(2, 3, 5, generator=g), dim=-1)
    model, pred = Protos(embed, protos), torch.randint(0, 2, (6, 9), generator=g)
    k, best = predict.class_similarity(model, None, pred.shape, 1)
    hues, picture = draw.prototype_colours(3), np.asarray(predict.prototype_map(model, None, pred, 1))
    for y in range(6):
        for x in range(9):
            sim = protos[1] @ embed[0, y * 3 // 6, x * 4 // 9]                     # nearest feature cell
            assert (k[y, x], best[y, x]) == (sim.argmax(), pytest.approx(float(sim.max()), abs=1e-6))
            colour = hues[int(sim.argmax())] * min(max(float(sim.max()), 0), 1) * float(pred[y, x] == 1)
            assert np.abs(picture[y, x].astype(int) - (colour * 255).astype(int)).max() <= 1


def test_dark_note_at_the_threshold_is_no_note():
    mask = torch.tensor([True, True])
    assert predict.dark_note(torch.tensor([predict.DARK, predict.DARK]), mask, "a") is None
    assert "mean cosine 0.19" in predict.dark_note(torch.tensor([0.19, 0.19]), mask, "a")
