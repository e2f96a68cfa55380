"""Fine-Pruning, Neural Cleanse and MM-BD on tiny poisoned digits models (target class 0), and end to end."""

import copy

import numpy as np
import pytest
import torch

from bdbench import run_grid
from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.fp import prune_dormant_channels
from bdbench.defenses.layers import capture, feature_map_layer, read_activations
from bdbench.defenses.mmbd import max_margins, max_statistic_p_value
from bdbench.defenses.nc import reverse_engineer_triggers
from bdbench.training import predict

from defense_fixtures import poisoned_digits


@pytest.fixture(scope="module")
def benign(digits):
    return poisoned_digits(digits, "none", {}, 0.1)


@pytest.fixture(scope="module")
def wide_badnets(digits):
    # 64 channels in the last convolution: enough for some to be dormant on clean digits.
    return poisoned_digits(digits, "badnets", {"patch_size": 2}, 0.1, model_params={"width": 32})


def _ca_asr(model, poisoned) -> tuple[float, float]:
    clean = float((predict(model, poisoned.dataset.x_test) == poisoned.dataset.y_test).double().mean())
    asr = float((predict(model, poisoned.triggered.x) == poisoned.triggered.y_target).double().mean())
    return clean, asr


def _run(name, poisoned, **params):
    defense = DEFENSES.build(name, params)
    return defense, defense.run(poisoned.context(sees_training_set=False))


def test_fp_prunes_dormant_channels_first_and_that_removes_the_backdoor(wide_badnets, effect):
    context = wide_badnets.context(sees_training_set=False)
    model = copy.deepcopy(wide_badnets.model)
    activation = read_activations(model, context.clean_x, "feature_map").clamp_min(0).mean(dim=(0, 2, 3))
    keep = prune_dormant_channels(model, context.clean_x, context.clean_y, max_accuracy_drop=0.1, max_pruned_ratio=0.8)
    assert 0 < int((~keep).sum()) <= 0.8 * len(keep)
    assert activation[~keep].max() <= activation[keep].min()  # dormant first
    with torch.no_grad(), capture(feature_map_layer(model, context.clean_x[:1].float() / 255)) as seen:
        model(context.clean_x[:8].float() / 255)
    assert seen[0][:, ~keep].abs().max() == 0 and seen[0][:, keep].abs().max() > 0

    clean_before, asr_before = _ca_asr(wide_badnets.model, wide_badnets)
    clean_pruned, asr_pruned = _ca_asr(model, wide_badnets)
    effect.check("ASR before", asr_before, ">", 0.95)
    effect.check("ASR after pruning", asr_pruned, "<", 0.5)  # measured 0.11 (AVX-512) to 0.37 (AVX2 kernels)
    effect.check("clean accuracy drop", clean_before - clean_pruned, "<", 0.15)  # the budget allowed a 10-point drop


def test_fp_then_fine_tuning_keeps_accuracy_and_lowers_asr_more_than_fine_tuning_alone(wide_badnets, effect):
    defense, outcome = _run("fp", wide_badnets)
    assert defense.kind is DefenseKind.MODEL_REPAIR and outcome.model is not wide_badnets.model
    clean_before, asr_before = _ca_asr(wide_badnets.model, wide_badnets)
    clean_after, asr_after = _ca_asr(outcome.model, wide_badnets)
    _, asr_fine_tuned = _ca_asr(_run("ft", wide_badnets)[1].model, wide_badnets)
    effect.check("clean accuracy drop", clean_before - clean_after, "<", 0.03)
    effect.check("ASR after", asr_after, "<", 0.9)
    # Measured 0.09 (AVX2 kernels) to 0.16 (AVX-512).
    effect.check("ASR after fine-tuning alone less after fine-pruning", asr_fine_tuned - asr_after, ">", 0.05)
    assert _ca_asr(wide_badnets.model, wide_badnets) == (clean_before, asr_before)  # the input model is untouched


def test_fp_prunes_a_preact_resnet(digits, effect):
    preact = poisoned_digits(digits, "badnets", {"patch_size": 2}, 0.1, "preact-resnet18", {"width": 0.125})
    clean_before, asr_before = _ca_asr(preact.model, preact)
    _, pruned = _run("fp", preact, epochs=0)
    masks = [m.channel_mask for m in pruned.model.modules() if hasattr(m, "channel_mask")]
    assert len(masks) == 1 and 0 < int((masks[0] == 0).sum()) <= 0.8 * masks[0].numel()
    clean_pruned, asr_pruned = _ca_asr(pruned.model, preact)
    effect.check("ASR before", asr_before, ">", 0.95)
    effect.check("ASR drop from pruning", asr_before - asr_pruned, ">", 0.1)
    effect.check("clean accuracy drop from pruning", clean_before - clean_pruned, "<", 0.15)
    clean_after, _ = _ca_asr(_run("fp", preact)[1].model, preact)
    effect.check("clean accuracy drop after fine-tuning", clean_before - clean_after, "<", 0.03)


@pytest.fixture(scope="module")
def nc_badnets(badnets):
    return _run("nc", badnets)


def test_nc_flags_the_badnets_target(nc_badnets, effect):
    defense, outcome = nc_badnets
    assert defense.kind is DefenseKind.MODEL_DETECTION
    # The target is flagged; with two torch threads a second small-norm label (5) is flagged too.
    assert outcome.detected and 0 in outcome.suspected_targets
    effect.check("anomaly index", outcome.anomaly_index, ">", 2)
    assert len(outcome.suspected_targets) <= 2


def test_nc_unlearning_removes_the_backdoor_and_keeps_accuracy(badnets, nc_badnets, effect):
    clean_before, asr_before = _ca_asr(badnets.model, badnets)
    clean_after, asr_after = _ca_asr(nc_badnets[1].model, badnets)
    effect.check("ASR before", asr_before, ">", 0.95)
    effect.check("ASR after", asr_after, "<", 0.3)
    effect.check("clean accuracy drop", clean_before - clean_after, "<", 0.03)


def test_nc_leaves_a_benign_model_alone(benign, nc_badnets, effect):
    _, outcome = _run("nc", benign)
    assert not outcome.detected and outcome.suspected_targets == () and outcome.model is None
    effect.check("anomaly index, backdoored less benign", nc_badnets[1].anomaly_index - outcome.anomaly_index, ">", 0)


def test_label_groups_give_the_same_optimisation_as_one_batch(badnets):
    # Many labels per pass or a few: the same summed gradient, so the same triggers and margins.
    context = badnets.context(sees_training_set=False)
    norms = [reverse_engineer_triggers(context.model, context.clean_x, 10, torch.Generator().manual_seed(0),
                                       epochs=2, images_per_pass=images).norms for images in (2048, 70)]
    assert torch.allclose(norms[0], norms[1])
    margins = [max_margins(context.model, 10, (1, 8, 8), torch.Generator().manual_seed(0), restarts=4, steps=5,
                           images_per_pass=images) for images in (2048, 9)]
    assert torch.allclose(margins[0], margins[1])


def test_mmbd_finds_the_target_of_a_backdoored_model_and_ranks_a_benign_one_far_below(badnets, benign, effect):
    defense, backdoored = _run("mmbd", badnets)
    _, clean = _run("mmbd", benign)
    assert defense.kind is DefenseKind.MODEL_DETECTION
    assert backdoored.detected and backdoored.suspected_targets == (0,)
    effect.check("-log10 p of the backdoored model", backdoored.anomaly_index, ">", backdoored.threshold)
    # The benign model's p-value is 0.013 on AVX-512 and 0.037 on AVX2 kernels with one thread: below the
    # paper's 0.05, a false positive of MM-BD on this tiny model (the benign rates on model-defenses measure
    # how often). What holds on every kernel set is that the backdoored model is 10 times more significant.
    effect.check("-log10 p, backdoored less benign", backdoored.anomaly_index - clean.anomaly_index, ">", 1)


def test_mmbd_p_value_of_the_largest_statistic():
    rng = np.random.default_rng(0)
    null = rng.gamma(5.0, 4.0, size=9)
    assert max_statistic_p_value(np.append(null, 200.0)) < 1e-6
    assert max_statistic_p_value(np.append(null, null.max() * 0.99)) > 0.05
    assert max_statistic_p_value(np.array([3.0, 3.0, 3.0, 9.0])) == 0.0


def test_model_defenses_run_through_the_runner(tmp_path, tiny_grid):
    tiny_grid["defenses"] = [{"name": "fp", "epochs": 1}, {"name": "nc", "epochs": 4, "unlearning_epochs": 1},
                             {"name": "mmbd", "restarts": 4, "steps": 20}]
    rows = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert len(rows) == 6 and set(rows.status) == {"ok"}, rows[["defense", "error"]]
    assert (rows.defense_s > 0).all() and (rows.peak_rss_mb > 0).all()
    assert rows.clean_acc.notna().all()
    fp = rows[(rows.defense == "fp") & (rows.attack == "badnets")].iloc[0]
    assert fp.defense_kind == "model_repair" and 0 <= fp.der <= 1 and fp.detected is None
    for name in ("nc", "mmbd"):
        verdicts = rows[rows.defense == name]
        assert (verdicts.defense_kind == "model_detection").all()
        assert verdicts.detected.notna().all() and verdicts.anomaly_index.notna().all()
        assert verdicts.det_threshold.notna().all() and verdicts.suspected_targets.map(type).eq(list).all()
