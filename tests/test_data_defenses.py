"""Training-data cleansers and robust training on a tiny poisoned digits set (seconds each)."""

import pytest
import torch

from bdbench import metrics
from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.training import predict

from defense_fixtures import poisoned_digits


@pytest.fixture(scope="module")
def badnets(digits):
    # 4% of the set: the poisons are about a quarter of the target class, the regime the
    # clustering and spectral papers were designed for.
    return poisoned_digits(digits, "badnets", {"patch_size": 3}, 0.04)


@pytest.fixture(scope="module")
def benign(digits):
    return poisoned_digits(digits, "none", {}, 0.1)


def _detect(name, badnets, **params):
    outcome = DEFENSES.build(name, params).run(badnets.context(sees_training_set=True))
    mask = badnets.poisoned.poison_mask
    assert outcome.flagged.shape == mask.shape and outcome.sample_scores.shape == mask.shape
    tpr, fpr = metrics.detection_rates(outcome.flagged, mask)
    return outcome, tpr, fpr, metrics.auroc(outcome.sample_scores, mask)


def test_data_defenses_declare_the_kind_that_gets_the_training_set():
    for name in ("ac", "ss", "spectre", "scan", "beatrix"):
        assert DEFENSES.get(name).kind is DefenseKind.DATA_DETECTION
    assert DEFENSES.get("abl").kind is DefenseKind.ROBUST_TRAINING


def test_scan_flags_the_poisons_of_the_target_class_only(badnets, effect):
    outcome, tpr, fpr, auroc = _detect("scan", badnets)
    effect.check("TPR", tpr, ">=", 0.8)
    effect.check("FPR", fpr, "<=", 0.05)
    assert outcome.threshold == pytest.approx(2.718, abs=1e-3)


def test_activation_clustering_flags_the_small_poisoned_cluster(badnets, effect):
    # On this 64-unit model a part of the poisons shares the clean target images' cluster (19-35% of
    # them across kernel sets, threads and seeds), so the bar is 55% rather than the paper's near-100%.
    outcome, tpr, fpr, _ = _detect("ac", badnets)
    effect.check("TPR", tpr, ">=", 0.55)
    effect.check("FPR", fpr, "<=", 0.2)
    assert bool((outcome.sample_scores[outcome.flagged] > outcome.threshold).all())


@pytest.mark.parametrize("name", ["ss", "spectre"])
def test_spectral_cleansers_remove_one_and_a_half_eps_of_each_class_of_a_clean_set(name, benign):
    outcome = DEFENSES.build(name, {"poison_fraction": 0.1}).run(benign.context(sees_training_set=True))
    sizes = torch.bincount(benign.poisoned.y)
    removed = torch.bincount(benign.poisoned.y[outcome.flagged], minlength=len(sizes))
    assert ((removed - 0.15 * sizes).abs() <= 0.5).all(), removed  # not half of every class


# The 57 poisons are 29% of the target class (199 samples), so the defender's bound eps is 0.3.
def test_spectral_signatures_flag_poisons_above_chance(badnets, effect):
    # Each class loses 1.5 x eps of its samples, 90 of the target class's 199: chance would catch 45%
    # of the poisons. On this tiny model SS does better than chance, not much more.
    _, tpr, _, _ = _detect("ss", badnets, poison_fraction=0.3)
    effect.check("TPR", tpr, ">=", 0.55)


def test_spectre_flags_the_poisons_after_robust_whitening(badnets, effect):
    _, tpr, _, auroc = _detect("spectre", badnets, poison_fraction=0.3)
    effect.check("TPR", tpr, ">=", 0.8)
    effect.check("AUROC", auroc, ">=", 0.75)


def test_beatrix_scores_poisons_above_clean_samples(badnets, effect):
    _, _, fpr, auroc = _detect("beatrix", badnets)
    effect.check("AUROC", auroc, ">=", 0.75)
    effect.check("FPR", fpr, "<=", 0.1)


def test_abl_isolates_its_share_of_low_loss_samples_and_keeps_clean_accuracy(digits, effect):
    # ABL's premise is that poisons are learned first, so that the 1% of lowest-loss samples after the
    # flooded isolation stage is mostly poison. On this tiny model it does not hold steadily: after 5
    # isolation epochs the 14 isolated samples are 57% poison on AVX-512 kernels and 29% on AVX2 (0% on
    # both after the paper's 20), and the unlearning's ASR drop ranges from 0.05 to 0.63 across kernel
    # sets and threads (0.10 to 0.63 with 40 unlearning epochs). Removal is therefore not asserted here.
    badnets = poisoned_digits(digits, "badnets", {"patch_size": 2}, 0.1)
    defense = DEFENSES.build("abl", {"isolation_epochs": 5, "tuning_epochs": 5, "unlearning_epochs": 20})
    context = badnets.context(sees_training_set=True)
    _, isolated = defense.isolate(context)
    assert int(isolated.sum()) == round(0.01 * len(isolated))
    model = defense.run(context).model
    assert model is not badnets.model
    clean_acc = metrics.accuracy(predict(model, badnets.dataset.x_test), badnets.dataset.y_test)
    effect.check("clean accuracy after", clean_acc, ">", 0.5)  # measured 0.52 (seed 1) to 0.91
