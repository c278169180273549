"""Tests of the training loop's wiring: every setting train.py reads changes a training step as it should.

The runs are train.main on a tiny HRNet for 1-3 iterations, with spies on what the loop calls (the optimiser's
step, seg_loss, update_prototypes, data_prototypes, the forward, evaluate, save_checkpoint, autocast, the data
loaders) that keep what each call saw. Each test compares that with a direct transcription: the poly / warm-up lr
of each iteration, each parameter's lr and weight decay, the SGD and AdamW updates, Eq. 13's terms with their
weights (in value and gradient), Eq. 14 with the mu of the iteration, the sampler's batches through the transform
the settings name, the dropout mask drawn from (seed, iteration), the train / eval mode of every module in each
pass. The settings take values where a wrong formula, a swap of two settings or the wrong iteration gives another
number. COVERAGE (at the end) names the test of every Config field: a new setting without a test fails there.
"""
import dataclasses
import os
import re

import pytest
import torch

import models
import protoseg
import settings
from conftest import state
from loop_spies import ADAMW, HERE, RUNS, SGD, decays, eq14, is_head, lr_at, mu_at, relative_error

# ----------------------------------------------------------------------------- the optimiser

def test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed(sgd, adamw):
    for (spies, _), s in ((sgd, SGD), (adamw, ADAMW)):
        assert [step.it for step in spies.steps] == list(range(s["iters"]))       # iters steps, resumed included
        for step in spies.steps:
            assert step.groups["backbone.conv1.weight"]["lr"] == pytest.approx(lr_at(step.it, s), rel=1e-12), step.it
    # fixture: these settings tell the formula from its likely slips
    slips = {"it + 1": lambda it: lr_at(it + 1, SGD),
             "power inverted": lambda it: lr_at(it, dict(SGD, lr_power=1 / SGD["lr_power"])),
             "no warm-up": lambda it: lr_at(it, dict(SGD, warmup_iters=0)),
             "warm-up from 0": lambda it: lr_at(it, dict(SGD, warmup_iters=0)) * it / SGD["warmup_iters"]}
    right = [lr_at(it, SGD) for it in range(3)]
    for name, slip in slips.items():
        assert [slip(it) for it in range(3)] != pytest.approx(right, rel=1e-9), name


@pytest.mark.parametrize("run", ["sgd", "adamw"])
def test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay(run, request):
    spies, _ = request.getfixturevalue(run)
    s = RUNS[run]
    params = dict(spies.models[0].named_parameters())
    assert {is_head(n) for n in params} == {True, False}
    assert {decays(n, p, s) for n, p in params.items()} == ({True} if s["norm_decay"] else {True, False})
    for step in spies.steps:
        assert step.groups.keys() == params.keys()                                  # every parameter, once
        for name, g in step.groups.items():
            mult = s["head_lr_mult"] if is_head(name) else 1.0
            assert g["lr"] == pytest.approx(lr_at(step.it, s) * mult, rel=1e-12), (step.it, name)
            assert g["weight_decay"] == (s["weight_decay"] if decays(name, params[name], s) else 0.0), name


def test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume(sgd):
    """p <- p - lr b, b <- momentum b + (g + wd p) (b = g + wd p at the first step); the resumed step continues
    the checkpoint's buffers."""
    spies, _ = sgd
    assert [type(opt) for opt in spies.opts] == [torch.optim.SGD] * 2               # the fresh and the resumed run
    buf = {}
    for prev, step in zip([None] + spies.steps, spies.steps):
        if prev is not None:
            for n in step.before:                                                   # the resumed run starts here
                torch.testing.assert_close(step.before[n], prev.after[n], rtol=0, atol=0)
        for n, p in step.before.items():
            g = step.groups[n]
            assert g["momentum"] == SGD["momentum"] and not g["nesterov"] and g["dampening"] == 0
            d = step.grads[n] + g["weight_decay"] * p
            buf[n] = d if n not in buf else SGD["momentum"] * buf[n] + d
            torch.testing.assert_close(step.after[n], p - g["lr"] * buf[n], rtol=1e-5, atol=1e-7, msg=(step.it, n))


def test_adamw_update_is_decoupled_decay_then_adam_with_torchs_betas(adamw):
    """p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + 1e-8), m, v: running means of g and g^2 (betas 0.9, 0.999),
    bias-corrected."""
    spies, _ = adamw
    m, v = {}, {}
    for t, step in enumerate(spies.steps, 1):
        for n, p in step.before.items():
            g, grad = step.groups[n], step.grads[n]
            assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and not g["amsgrad"]
            m[n] = 0.9 * m.get(n, 0) + 0.1 * grad
            v[n] = 0.999 * v.get(n, 0) + 0.001 * grad * grad
            update = (m[n] / (1 - 0.9 ** t)) / ((v[n] / (1 - 0.999 ** t)).sqrt() + 1e-8)
            expected = p * (1 - g["lr"] * g["weight_decay"]) - g["lr"] * update
            torch.testing.assert_close(step.after[n], expected, rtol=1e-5, atol=1e-4 * g["lr"], msg=(t, n))


# ----------------------------------------------------------------------------- the loss

def test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau(sgd, adamw):
    """Eq. 13 in value (each term with this tau, the total with these lambdas) and in gradient: the head's
    gradient at the optimiser step is that of ce + lambda_ppc ppc + lambda_ppd ppd."""
    for (spies, _), s in ((sgd, SGD), (adamw, ADAMW)):
        weights = {"ce": 1.0, "ppc": s["lambda_ppc"], "ppd": s["lambda_ppd"]}
        assert [loss["it"] for loss in spies.losses] == list(range(s["iters"]))
        for loss in spies.losses:
            args = loss["args"]
            assert (args["lambda_ppc"], args["lambda_ppd"], args["tau"]) == (s["lambda_ppc"], s["lambda_ppd"], s["tau"])
            assert args["class_weight"] is None and args["aux_weight"] == 0.0
            assert loss["terms"].keys() == weights.keys()
            for k in weights:
                assert loss["terms"][k] == pytest.approx(loss["expected"][k], rel=1e-5), k
            assert loss["total"] == pytest.approx(sum(w * loss["expected"][k] for k, w in weights.items()), rel=1e-5)
            step = spies.at(spies.steps, loss["it"])
            got = [step.grads[n] for n in spies.watched]
            combine = lambda w: [sum(w[k] * loss["grads"][k][i] for k in w) for i in range(len(spies.watched))]
            assert relative_error(got, combine(weights)) < 1e-4, loss["it"]
            if s is SGD:                                                # fixture: a swap of the lambdas shows
                swapped = dict(weights, ppc=weights["ppd"], ppd=weights["ppc"])
                assert relative_error(combine(swapped), combine(weights)) > 1e-2
    loss = sgd[0].losses[0]                                                            # fixture: tau matters
    out = sgd[0].forwards[0]["out"]
    assert abs(protoseg.ppc_loss(out["proto_sim"], out["proto_target"], 0.1).item() - loss["terms"]["ppc"]) > 0.1


# ----------------------------------------------------------------------------- the prototypes

@pytest.mark.parametrize("run", ["sgd", "adamw"])
def test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration(run, request):
    """Also after the first step of the resumed run (iteration 2 of the SGD run): mu of iteration 2 applied to the
    checkpoint's prototypes. The Eq. 14 targets are the head's update_target (only correctly classified pixels
    with update_correct_only, the AdamW run)."""
    spies, out = request.getfixturevalue(run)
    s = RUNS[run]
    final = state(out / "last.pt")["model"]["head.prototypes"]
    assert [f["it"] for f in spies.forwards] == [u["it"] for u in spies.updates] == list(range(s["iters"]))
    for f, update in zip(spies.forwards, spies.updates):
        it, mu = f["it"], mu_at(f["it"], s)
        assert update["args"]["momentum"] == pytest.approx(mu, rel=1e-12), it
        assert update["args"]["local_stats"] == s["local_stats"]
        after = spies.at(spies.forwards, it + 1)["protos"] if it + 1 < s["iters"] else final
        expected = eq14(f["protos"], f["out"]["embed"], f["out"]["update_target"], mu)
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6, msg=it)
        if mu != mu_at(0, s):                                        # fixture: the mu of iteration 0 would show
            assert (eq14(f["protos"], f["out"]["embed"], f["out"]["update_target"], mu_at(0, s)) - after).abs().max() > 1e-4
    if run == "sgd":
        assert mu_at(2, s) != mu_at(0, s) and spies.starts[1]["head.prototypes"].ne(final).any()
    else:                                                            # fixture: some labelled pixels are wrong
        f = spies.forwards[0]["out"]
        assert (f["update_target"] != f["proto_target"]).any()


def test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume(sgd, adamw):
    spies, _ = sgd
    (init,) = spies.inits                                            # one call in the fresh and the resumed run
    first = spies.at(spies.forwards, 0)
    assert init["it"] == 0 and torch.equal(init["args"]["images"], first["images"])
    assert torch.equal(init["args"]["labels"], first["labels"])
    assert (init["args"]["kappa"], init["args"]["sinkhorn_iters"]) == (SGD["kappa"], SGD["sinkhorn_iters"])
    assert init["args"]["distributed"] == (not SGD["local_stats"])
    assert torch.equal(first["protos"], init["new"])                # the first forward sees them
    # the resumed run starts from the prototypes of the last step before the stop, not a new clustering
    assert torch.equal(spies.at(spies.forwards, 2)["protos"], spies.at(spies.updates, 1)["new"])
    spies, _ = adamw                                                 # random: the seeded start
    assert not spies.inits
    assert torch.equal(spies.forwards[0]["protos"], spies.starts[0]["head.prototypes"])


# ----------------------------------------------------------------------------- modes, dropout, seed

def test_every_module_trains_in_the_training_forward_and_evaluates_in_evaluation(sgd):
    spies, _ = sgd
    phases = {phase for phase, _, _ in spies.passes}
    assert phases == {"train", "eval", "init"}
    for phase, it, modes in spies.passes:
        drop = {n for n, m in spies.models[0].named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)}
        if phase == "train":
            assert all(modes.values()), (it, [n for n, t in modes.items() if not t])
        elif phase == "eval":
            assert not any(modes.values()), (it, [n for n, t in modes.items() if t])
        else:                                                        # data init: batch statistics, no dropout
            assert drop and {n for n, t in modes.items() if not t} == drop


def test_freeze_bn_keeps_batchnorm_in_eval_in_every_training_forward_and_its_statistics_unchanged(adamw):
    """Also in the forward after an evaluation (which puts every module in eval mode and back)."""
    spies, out = adamw
    bn = {n for n, m in spies.models[0].named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert bn and spies.evals[0] == 1                                  # fixture: an evaluation between the steps
    train_passes = [(it, modes) for phase, it, modes in spies.passes if phase == "train"]
    assert [it for it, _ in train_passes] == [0, 1]
    for it, modes in train_passes:
        assert {n for n, t in modes.items() if not t} == bn, it
    saved, start = state(out / "last.pt")["model"], spies.starts[0]
    stats = [k for k in saved if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(saved[k], start[k]) for k in stats)


def test_dropout_mask_of_each_iteration_is_drawn_from_seed_and_iteration(sgd):
    """torch.manual_seed(seed * 1_000_003 + rank * 7919 + it) before the forward; the head's Dropout2d (p =
    dropout) is the first draw: Bernoulli(1 - p) per (image, channel). Also in the resumed run."""
    spies, _ = sgd
    assert [it for it, *_ in spies.masks] == [0, 1, 2]
    kept = []
    for it, p, got, live in spies.masks:
        assert p == SGD["dropout"]
        g = torch.Generator().manual_seed(SGD["seed"] * 1_000_003 + it)
        expected = torch.empty(got.shape).bernoulli_(1 - p, generator=g).bool()
        assert live.float().mean() > 0.5 and not (got[live]).all()       # fixture: channels alive and dropped
        assert torch.equal(got[live], expected[live]), it
        kept.append(expected)
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])


def test_initial_weights_are_the_model_seeded_with_seed(sgd):
    spies, _ = sgd
    torch.manual_seed(SGD["seed"])
    expected = models.build_model("hrnet_tiny", "protoseg", 5, num_prototypes=3).state_dict()
    torch.manual_seed(0)
    other = models.build_model("hrnet_tiny", "protoseg", 5, num_prototypes=3).state_dict()
    start = spies.starts[0]
    assert start.keys() == expected.keys()
    assert all(torch.equal(start[k], expected[k]) for k in start)
    assert not torch.equal(start["backbone.conv1.weight"], other["backbone.conv1.weight"])



# ----------------------------------------------------------------------------- every setting has a test

# Config field -> the tests that fail when its effect on training is lost, swapped or mistimed (in this file or
# test_loop_data.py; "file::test" for another file). Settings that training does not read (files, this command)
# name the test that shows their effect.
COVERAGE = {
    "dataset": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on",
                "test_class_weights_cityscapes_weight_the_ce_by_the_official_table"],
    "data_root": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "num_classes": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "ignore_value": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "binary_masks": ["test_folder_dataset_settings_shape_the_labels_the_loop_trains_on"],
    "backbone": ["test_model_settings_reach_the_network", "test_aux_loss_weight_adds_upernets_auxiliary_ce_with_that_weight"],
    "head": ["test_softmax_head_trains_without_prototypes", "test_model_settings_reach_the_network"],
    "pretrained": ["test_pretrained_backbone_is_the_start_of_a_fresh_run"],
    "out_dir": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations",
                "test_train.py::test_command_line_runs_end_to_end"],
    "crop": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
             "test_recipe_pipelines_get_their_settings"],
    "scale": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
              "test_recipe_pipelines_get_their_settings"],
    "flip": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
             "test_recipe_pipelines_get_their_settings"],
    "pipeline": ["test_recipe_pipelines_get_their_settings"],
    "aspect": ["test_recipe_pipelines_get_their_settings"],
    "img_scale": ["test_recipe_pipelines_get_their_settings"],
    "cat_max_ratio": ["test_recipe_pipelines_get_their_settings"],
    "channel_order": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
                      "test_recipe_pipelines_get_their_settings"],
    "batch_size": ["test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
                   "test_batches_restart_each_epoch_in_its_order_and_resume_mid_epoch"],
    "iters": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed",
              "test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations"],
    "optimizer": ["test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume",
                  "test_adamw_update_is_decoupled_decay_then_adam_with_torchs_betas"],
    "lr": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed"],
    "lr_power": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed"],
    "warmup_iters": ["test_lr_of_each_iteration_is_poly_with_warmup_as_transcribed"],
    "head_lr_mult": ["test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay"],
    "aux_loss_weight": ["test_aux_loss_weight_adds_upernets_auxiliary_ce_with_that_weight"],
    "momentum": ["test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume"],
    "weight_decay": ["test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay",
                     "test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume",
                     "test_adamw_update_is_decoupled_decay_then_adam_with_torchs_betas"],
    "norm_decay": ["test_each_parameter_steps_with_its_groups_lr_multiplier_and_weight_decay"],
    "class_weights": ["test_class_weights_cityscapes_weight_the_ce_by_the_official_table"],
    "num_prototypes": ["test_model_settings_reach_the_network"],
    "kappa": ["test_model_settings_reach_the_network",
              "test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume",
              "test_wiring.py::test_head_eq10_targets_from_prototypes_before_update"],
    "sinkhorn_iters": ["test_model_settings_reach_the_network",
                       "test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume",
                       "test_wiring.py::test_head_eq10_targets_from_prototypes_before_update"],
    "proto_momentum": ["test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration"],
    "proto_momentum_warmup": [
        "test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration"],
    "proto_init": ["test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume"],
    "lambda_ppc": ["test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau"],
    "lambda_ppd": ["test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau"],
    "tau": ["test_loss_backpropagated_is_ce_plus_lambda_weighted_ppc_and_ppd_with_tau"],
    "class_layernorm": ["test_model_settings_reach_the_network",
                        "test_protoseg.py::test_official_switches_update_correct_only_and_layernorms"],
    "embed_layernorm": ["test_model_settings_reach_the_network",
                        "test_protoseg.py::test_official_switches_update_correct_only_and_layernorms"],
    "update_correct_only": [
        "test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration",
        "test_model_settings_reach_the_network"],
    "local_stats": ["test_prototypes_after_each_step_are_eq14_of_the_steps_embeddings_with_the_mu_of_its_iteration",
                    "test_proto_init_data_clusters_the_first_batch_at_iteration_0_and_never_on_resume",
                    "test_model_settings_reach_the_network",
                    "test_wiring.py::test_ddp_head_global_sinkhorn_identical_prototypes_and_local_stats_average"],
    "normalize_width": ["test_model_settings_reach_the_network"],
    "dropout": ["test_dropout_mask_of_each_iteration_is_drawn_from_seed_and_iteration",
                "test_model_settings_reach_the_network"],
    "freeze_bn": ["test_freeze_bn_keeps_batchnorm_in_eval_in_every_training_forward_and_its_statistics_unchanged"],
    "amp": ["test_amp_reaches_every_autocast_and_the_cpu_trains_in_fp32"],
    "workers": ["test_workers_reach_every_data_loader"],
    "seed": ["test_initial_weights_are_the_model_seeded_with_seed",
             "test_batches_are_the_seeded_sampler_order_through_the_transform_the_settings_name",
             "test_dropout_mask_of_each_iteration_is_drawn_from_seed_and_iteration"],
    "log_every": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations"],
    "eval_every": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations",
                   "test_evaluation_gets_every_test_setting"],
    "ckpt_every": ["test_checkpoints_log_rows_and_evaluations_happen_at_their_iterations"],
    "eval_crop": ["test_evaluation_gets_every_test_setting"],
    "eval_stride": ["test_evaluation_gets_every_test_setting"],
    "eval_resize": ["test_evaluation_gets_every_test_setting", "test_recipe_pipelines_get_their_settings"],
    "eval_divisor": ["test_evaluation_gets_every_test_setting", "test_recipe_pipelines_get_their_settings"],
    "eval_scales": ["test_evaluation_gets_every_test_setting"],
    "eval_flip": ["test_evaluation_gets_every_test_setting"],
    "val_size": ["test_evaluation_gets_every_test_setting"],
    # this command (not training): resuming, evaluating, the run folder
    "resume": ["test_sgd_update_is_momentum_sgd_with_decay_also_across_the_resume",
               "test_train.py::test_resumed_run_equals_uninterrupted_run"],
    "eval_only": [
        "test_train_bad_input.py::test_eval_only_never_touches_the_training_record_and_a_finished_run_stays_finished"],
    "overwrite": ["test_runs.py::test_out_dir_belongs_to_one_run"],
    "allow_changes": ["test_train.py::test_resume_refuses_settings_that_change_the_trajectory"],
}


def test_every_setting_names_the_tests_of_its_effect():
    fields = {f.name for f in dataclasses.fields(settings.Config)}
    missing, stale = sorted(fields - COVERAGE.keys()), sorted(COVERAGE.keys() - fields)
    assert not missing, f"settings without a test of their effect on training: {missing}; add a test to " \
                        "tests/test_loop.py and name it in COVERAGE"
    assert not stale, f"COVERAGE names settings Config no longer has: {stale}"
    here = open(__file__).read() + open(os.path.join(HERE, "test_loop_data.py")).read()
    for field, tests in COVERAGE.items():
        for name in tests:
            file, _, test = name.rpartition("::")
            path = os.path.join(os.path.dirname(HERE), file) if file == "test_protoseg.py" else os.path.join(HERE, file)
            text = here if not file else open(path).read()
            assert re.search(rf"^def {re.escape(test)}\(", text, re.M), f"{field}: no test {name}"
