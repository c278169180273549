"""Tests of the training loop's wiring, continued (tests/test_loop.py has the method and the coverage table): what
reaches the data, the model and the evaluation, and the runs on a folder dataset, a Cityscapes tree and UperNet."""
import dataclasses
import functools
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import collectives
import data
import models
import protoseg
import settings
import swin
import train
from conftest import TINY, save_image
from labels import IGNORE_INDEX
from loop_spies import ADAMW, HERE, RUNS, SGD, Spies, flags, lr_at, relative_error, sampler_batches

# ----------------------------------------------------------------------------- data

def test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name(sgd):
    """Per-rank batch batch_size, crop H x W, scale range, no flip, BGR input, seed: the synthetic train set through
    TrainTransform in DistributedSampler's order; the resumed run continues at its batch."""
    spies, _ = sgd
    ds = data.SyntheticDataset("train", data.TrainTransform(SGD["crop"], SGD["scale"], SGD["flip"],
                                                            channel_order=SGD["channel_order"]), seed=SGD["seed"])
    expected = sampler_batches(ds, SGD["batch_size"])
    for f, (images, labels) in zip(spies.forwards, expected):
        assert images.shape == (SGD["batch_size"], 3, *SGD["crop"])
        assert torch.equal(f["images"], images) and torch.equal(f["labels"], labels), f["it"]
    assert [f["it"] for f in spies.forwards] == [0, 1, 2]


def test_batches_restart_each_epoch_in_its_order_and_resume_mid_epoch():
    """batches(start): epoch = start // steps per epoch, skipping the batches already done; drop_last."""
    cfg = settings.Config(batch_size=3, seed=5, workers=0)
    ds = data.SyntheticDataset("train", data.TrainTransform((16, 16)), seed=5, length=7, size=32)   # 2 per epoch
    stream = train.batches(cfg, ds, 3, torch.device("cpu"))
    expected = list(sampler_batches(ds, 3, epoch=1))[1:] + list(sampler_batches(ds, 3, epoch=2))
    for images, labels in expected:
        got = next(stream)
        assert torch.equal(got[0], images) and torch.equal(got[1], labels)


@pytest.mark.parametrize("pipeline, recipe", [("openseg", dict(aspect=(0.6, 1.6))),
                                              ("mmseg", dict(img_scale=(300, 100), cat_max_ratio=0.3))])
def test_recipe_pipelines_get_their_settings(pipeline, recipe):
    """make_datasets: the training items are RecipeTransform(pipeline, crop, scale, flip, aspect / img_scale,
    cat_max_ratio, channel_order) of the train set; the val items EvalTransform(channel_order, eval_resize,
    eval_divisor)."""
    s = dict(pipeline=pipeline, crop=(40, 24), scale=(0.6, 1.4), flip=False, channel_order="bgr", seed=2,
             eval_resize=(90, 70), eval_divisor=8, **recipe)
    cfg = settings.parse_args(TINY + flags(**s))[0]
    train_set, val_set = train.make_datasets(cfg, log=None)
    expected = data.RecipeTransform(pipeline, s["crop"], s["scale"], s["flip"], channel_order="bgr", **recipe)
    ref = data.SyntheticDataset("train", expected, seed=2)
    for i in range(4):
        got, want = train_set[i], ref[i]
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"]), i
    for name in recipe:                                              # fixture: each recipe setting changes items
        default = data.RecipeTransform(pipeline, s["crop"], s["scale"], s["flip"], channel_order="bgr",
                                       **{k: v for k, v in recipe.items() if k != name})
        other = data.SyntheticDataset("train", default, seed=2)
        assert any(not torch.equal(other[i]["label"], ref[i]["label"]) for i in range(4)), name
    want = data.SyntheticDataset("val", data.EvalTransform("bgr", (90, 70), 8), seed=2)[0]
    assert val_set[0]["image"].shape == (3, 72, 72) and torch.equal(val_set[0]["image"], want["image"])


def test_folder_dataset_settings_shape_the_labels_the_loop_trains_on(tmp_path, monkeypatch, capsys):
    """data_root, num_classes, ignore_value and binary_masks: mask 255 -> class 1, 7 (ignore_value) -> ignored. The
    data check's summary of each split is printed (headers; val: label values too)."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:30], mask[24:, :10] = 255, 7
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            save_image(tmp_path / "data/images" / split / f"{i}.png", rng.integers(0, 255, (32, 32, 3)))
            save_image(tmp_path / "data/masks" / split / f"{i}.png", mask)
    spies = Spies(monkeypatch)
    spies.run(TINY + flags(dataset="folder", data_root=tmp_path / "data", num_classes=2, ignore_value=7,
                           binary_masks=True, crop=32, scale=(1, 1), flip=False, batch_size=2, iters=1, val_size=1,
                           out_dir=tmp_path / "run"))
    expected = torch.from_numpy(np.select([mask == 255, mask == 7], [1, IGNORE_INDEX], 0).astype(np.int64))
    assert torch.equal(spies.forwards[0]["labels"], expected.expand(2, -1, -1))
    assert spies.models[0].head.prototypes.shape[0] == 2
    out = capsys.readouterr().out
    assert "data check train: 2 pairs OK (headers) in " in out
    assert "data check val: 1 pairs OK (headers and label values) in " in out


# ----------------------------------------------------------------------------- the model, evaluation, amp

@pytest.mark.parametrize("run", ["sgd", "adamw"])
def test_model_settings_reach_the_network(run, request):
    spies, _ = request.getfixturevalue(run)
    s = {**dataclasses.asdict(settings.Config()), "num_prototypes": 3, **RUNS[run]}      # TINY: K = 3
    net = spies.models[0]
    head = net.head
    assert isinstance(net.backbone, models.HRNet) and net.backbone.channels == [8, 16, 32, 64]   # hrnet_tiny
    assert isinstance(head, protoseg.ProtoSegHead) and head.prototypes.shape[:2] == (5, s["num_prototypes"])
    assert (head.kappa, head.sinkhorn_iters) == (s["kappa"], s["sinkhorn_iters"])
    assert (head.mask_norm is not None, head.feat_norm is not None, head.normalize_width) == \
        (s["class_layernorm"], s["embed_layernorm"], s["normalize_width"])
    assert (head.update_correct_only, head.local_stats) == (s["update_correct_only"], s["local_stats"])
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout2d)] == [s["dropout"]]


def test_evaluation_gets_every_test_setting(adamw):
    """eval_crop, eval_stride, eval_scales, eval_flip reach predict_scores; eval_resize / eval_divisor the image
    (160 x 160 fits (40, 30) as 30 x 30, then a multiple of 16: 32 x 32), the scores go back to the label's size;
    val_size images per evaluation; eval_every: one between the steps, then the final one."""
    spies, _ = adamw
    assert spies.evals == [1, 2]
    assert len(spies.predicts) == 2 * ADAMW["val_size"]
    for shape, args in spies.predicts:
        assert shape == (1, 3, 32, 32)
        assert (args["crop"], args["stride"], args["scales"], args["flip"]) == \
            (ADAMW["eval_crop"], ADAMW["eval_stride"], ADAMW["eval_scales"], ADAMW["eval_flip"])
        assert tuple(args["size"]) == (160, 160)


def test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations(sgd):
    """done % ckpt_every == 0 or done == iters; done % log_every == 0 or the last; done % eval_every == 0 before
    the last, whose evaluation is the final one."""
    spies, out = sgd
    every = lambda n, done: done % n == 0 or done == SGD["iters"]
    done = range(1, SGD["iters"] + 1)
    assert spies.saves == [d for d in done if every(SGD["ckpt_every"], d)] == [2, 3]
    assert spies.evals == [d for d in done if d % SGD["eval_every"] == 0] == [1, 2, 3]
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in logged] == [d for d in done if every(SGD["log_every"], d)] == [3]
    assert [r["iter"] for r in rows if "val" in r] == [1, 2] and "final" in rows[-1]
    assert logged[0]["lr"] == pytest.approx(lr_at(2, SGD), rel=1e-12)
    assert logged[0]["loss"] == pytest.approx(spies.at(spies.losses, 2)["total"], rel=1e-6)


def test_amp_reaches_every_autocast_and_the_cpu_trains_in_fp32(sgd):
    spies, _ = sgd
    assert {where for where, _ in spies.amp} == {"train", "eval"} and {a for _, a in spies.amp} == {SGD["amp"]}
    assert spies.scalers == [False, False]                           # GradScaler: fp16 on a GPU only
    assert all(f["out"]["scores"].dtype == torch.float32 for f in spies.forwards)
    with warnings.catch_warnings():                                  # a CPU-only torch: "CUDA is not available"
        warnings.simplefilter("ignore")
        cuda = [collectives.autocast(a, torch.device("cuda")).fast_dtype for a in ("fp16", "bf16")]
    assert cuda == [torch.float16, torch.bfloat16] and not collectives.autocast("fp16", torch.device("cpu"))._enabled


# ----------------------------------------------------------------------------- Cityscapes, a softmax head, workers

def cityscapes_tree(root):
    """Two train images and one val image in the Cityscapes layout, labelIds road 7, car 26, vegetation 21,
    unlabelled 0."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            name = f"c_{i:06d}_000019"
            save_image(root / f"leftImg8bit/{split}/c/{name}_leftImg8bit.png", rng.integers(0, 255, (40, 48, 3)))
            ids = np.full((40, 48), 7)
            ids[5:20, 10:40], ids[25:, :20], ids[:3] = 26, 21, 0
            save_image(root / f"gtFine/{split}/c/{name}_gtFine_labelIds.png", ids)
    return root


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """Cityscapes (its preset: class weights, openseg pipeline), softmax head, an ImageNet-style backbone file,
    one DataLoader worker."""
    tmp = tmp_path_factory.mktemp("cityscapes")
    torch.manual_seed(11)
    torch.save(models.build_backbone("hrnet_tiny").state_dict(), tmp / "backbone.pth")
    table = json.loads(open(os.path.join(HERE, "testdata", "cityscapes_class_weights.json")).read())
    weight = torch.tensor(table["class_weights"])
    with pytest.MonkeyPatch.context() as mp:
        spies = Spies(mp, class_weight=weight)
        spies.run(flags(dataset="cityscapes", data_root=cityscapes_tree(tmp / "data"), backbone="hrnet_tiny",
                        head="softmax", crop=32, batch_size=2, iters=1, workers=1, val_size=1,
                        pretrained=tmp / "backbone.pth", out_dir=tmp / "run"))
    return spies, weight, tmp


def test_class_weights_cityscapes_weight_the_ce_by_the_official_table(cityscapes):
    spies, weight, _ = cityscapes
    (loss,) = spies.losses
    assert torch.equal(loss["args"]["class_weight"], weight)
    assert loss["terms"].keys() == {"ce"} and loss["terms"]["ce"] == pytest.approx(loss["expected"]["ce"], rel=1e-5)
    got = [spies.steps[0].grads[n] for n in spies.watched]
    assert relative_error(got, loss["grads"]["ce"]) < 1e-4
    out, labels = spies.forwards[0]["out"], spies.forwards[0]["labels"]                # fixture: weights matter
    plain = F.cross_entropy(out["scores"], labels, ignore_index=IGNORE_INDEX).item()
    assert abs(plain - loss["expected"]["ce"]) > 1e-4


def test_softmax_head_trains_without_prototypes(cityscapes):
    spies, _, _ = cityscapes
    assert isinstance(spies.models[0].head, protoseg.SoftmaxHead) and spies.models[0].head.classifier.out_channels == 19
    assert not spies.updates and not spies.inits and set(spies.forwards[0]["out"]) == {"scores"}


def test_pretrained_backbone_is_the_start_of_a_fresh_run(cityscapes):
    spies, _, tmp = cityscapes
    file = torch.load(tmp / "backbone.pth", weights_only=True)
    start = spies.starts[0]
    assert all(torch.equal(start["backbone." + k], v) for k, v in file.items())
    torch.manual_seed(0)                                             # fixture: the seeded init differs
    assert not torch.equal(models.build_backbone("hrnet_tiny").conv1.weight, file["conv1.weight"])


def test_workers_reach_every_data_loader(cityscapes):
    spies, _, _ = cityscapes
    assert spies.workers == [1, 1]                                   # training and the final evaluation


# ----------------------------------------------------------------------------- UperNet's auxiliary head

def test_aux_loss_weight_adds_upernets_auxiliary_ce_with_that_weight(tmp_path, monkeypatch):
    """A Swin backbone and UperNet of the smallest widths (the preset swin_tiny and UperNet's 512 channels shrunk
    for this test) with UperNet's auxiliary FCN head: the gradient of the head and of the auxiliary head is that of
    ce + lambda_ppc ppc + lambda_ppd ppd + aux_loss_weight aux."""
    monkeypatch.setitem(swin.SWIN_PRESETS, "swin_tiny", dict(embed_dim=8, depths=(1, 1, 1, 1), heads=(1, 1, 1, 1),
                                                             window=2))
    monkeypatch.setattr(models, "UperNet", functools.partial(swin.UperNet, channels=16))
    spies = Spies(monkeypatch, keep_params=False)
    spies.run(TINY + flags(backbone="swin_tiny", aux_loss_weight=0.3, crop=32, batch_size=2, iters=1, val_size=1,
                           eval_resize=(32, 32), out_dir=tmp_path))
    (loss,) = spies.losses
    weights = {"ce": 1.0, "ppc": 0.01, "ppd": 0.001, "aux": 0.3}
    assert loss["args"]["aux_weight"] == 0.3 and loss["terms"].keys() == weights.keys()
    assert loss["terms"]["aux"] == pytest.approx(loss["expected"]["aux"], rel=1e-5)
    assert any(n.startswith("neck.aux_head.") for n in spies.watched)
    got = [spies.steps[0].grads[n] for n in spies.watched]
    combine = lambda w: [sum(w[k] * loss["grads"][k][i] for k in w) for i in range(len(spies.watched))]
    assert relative_error(got, combine(weights)) < 1e-4
    assert relative_error(combine(dict(weights, aux=0.4)), combine(weights)) > 1e-2   # fixture: the default shows
