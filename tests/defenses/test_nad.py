"""Neural Attention Distillation (NAD): its effect on a tiny BadNets model and its clean-budget back-off.

The effect tests use a cnn-small of width 16 on 8x8 digits and a clean budget of 150 images, far from the paper's
ResNets on CIFAR with thousands of clean images; where a paper default does nothing or too much at this scale, the
test says which setting it uses and why.
"""

from bdbench.defenses import DEFENSES, DefenseKind


def test_nad_is_a_model_repair():
    assert DEFENSES.get("nad").kind is DefenseKind.MODEL_REPAIR


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    # The paper's beta (5000 per layer) also erases clean accuracy on 8x8 maps of a 16-channel net.
    repaired = badnets.repair("nad", {"beta": 500})
    # Measured drops across kernel sets and threads: 0.27-0.49. The clean-accuracy cost moves with float reduction
    # order (NAD loses 0.15-0.18 with two threads, less with one): a 150-image budget on a 16-channel net.
    badnets.check_repair(repaired, effect, 0.2, 0.2)


def test_a_setting_that_wrecks_clean_budget_accuracy_is_halved(badnets, effect):
    badnets.check_backoff("nad", {"beta": 1e7, "teacher_epochs": 2, "epochs": 3}, 20, effect)  # halves every beta
