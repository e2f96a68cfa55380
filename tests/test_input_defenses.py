"""Run-time input detectors on tiny poisoned digits models: triggered inputs score above clean ones."""

import torch

from bdbench import metrics
from bdbench.defenses import DEFENSES, DefenseKind

from defense_fixtures import poisoned_digits


def _apply(name, poisoned, **params):
    defense = DEFENSES.build(name, params)
    assert defense.kind is DefenseKind.INPUT_DETECTION
    outcome = defense.run(poisoned.context(sees_training_set=False))
    clean_scores, clean_flags = outcome.input_detector(poisoned.dataset.x_test)
    trig_scores, trig_flags = outcome.input_detector(poisoned.triggered.x)
    truth = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(trig_scores))]).bool()
    auroc = metrics.auroc(torch.cat([clean_scores, trig_scores]), truth)
    return outcome, float(clean_flags.float().mean()), float(trig_flags.float().mean()), auroc


def test_strip_separates_triggered_inputs_at_its_clean_false_rejection_rate(badnets, effect):
    outcome, fpr, tpr, auroc = _apply("strip", badnets, overlays=30)
    effect.check("AUROC", auroc, ">=", 0.95)
    effect.check("TPR", tpr, ">=", 0.9)
    # The 1% quantile of 150 budget entropies is their second-lowest: on the test set it rejects 4.7-6.4% of
    # clean images across kernel sets and threads (tools/effect_spread.py), hence 0.1, not 0.06.
    effect.check("FPR", fpr, "<=", 0.1)
    assert outcome.threshold is not None


def test_sentinet_finds_the_patch_that_hijacks_clean_images(badnets, effect):
    _, fpr, tpr, auroc = _apply("sentinet", badnets, carriers=30)
    effect.check("AUROC", auroc, ">=", 0.8)
    effect.check("TPR", tpr, ">=", 0.6)
    effect.check("FPR", fpr, "<=", 0.15)


def test_teco_ranks_triggered_inputs_as_less_consistent_under_corruption(badnets, effect):
    # TeCo is threshold-free in its paper; here its ranking separates (AUROC) while the 5% clean
    # threshold catches few triggered inputs, which the grid reports as measured.
    _, fpr, _, auroc = _apply("teco", badnets)
    effect.check("AUROC", auroc, ">=", 0.75)
    effect.check("FPR", fpr, "<=", 0.15)


def test_scaleup_catches_blended_inputs_that_survive_amplification(digits, effect):
    blended = poisoned_digits(digits, "blended", {}, 0.1)
    _, fpr, tpr, auroc = _apply("scaleup", blended)
    effect.check("AUROC", auroc, ">=", 0.8)
    effect.check("TPR", tpr, ">=", 0.6)
    effect.check("FPR", fpr, "<=", 0.15)
