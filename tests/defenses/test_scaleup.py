"""SCALE-UP (scaled prediction consistency), a run-time input detector, on a tiny Blended model."""

from defense_fixtures import poisoned_digits


def test_scaleup_catches_blended_inputs_that_survive_amplification(digits, effect):
    blended = poisoned_digits(digits, "blended", {}, 0.1)
    _, fpr, tpr, auroc = blended.screen_inputs("scaleup")
    effect.check("AUROC", auroc, ">=", 0.8)
    effect.check("TPR", tpr, ">=", 0.6)
    effect.check("FPR", fpr, "<=", 0.15)
