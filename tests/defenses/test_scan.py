"""SCAn (statistical contamination analysis) on a tiny poisoned digits set."""

import math

import pytest
import torch

from bdbench.defenses import DEFENSES


def test_scan_flags_the_poisons_of_the_target_class_only(sparse_badnets, effect):
    outcome, tpr, fpr, _ = sparse_badnets.detect_poisons("scan")
    effect.check("TPR", tpr, ">=", 0.8)
    # At the threshold e that this test used before (Qi et al.'s), another class's subgroup (about 70 clean
    # samples, FPR 0.05, J* 4.1) was flagged in one of 12 runs (seeds 0-5, one or two threads, AVX2).
    effect.check("FPR", fpr, "<=", 0.1)
    assert outcome.threshold == pytest.approx(7.389, abs=1e-3)
    # Every class's J* is reported by label: the target's is the largest and over the threshold, and each flagged
    # sample scores its own class's J*.
    statistics = outcome.class_statistics
    assert statistics is not None and len(statistics) == int(sparse_badnets.poisoned.y.max()) + 1
    assert int(statistics.argmax()) == 0 and statistics[0] > outcome.threshold
    flagged_labels = sparse_badnets.poisoned.y[outcome.flagged]
    assert torch.equal(outcome.sample_scores[outcome.flagged], statistics[flagged_labels])


def test_scan_flags_at_the_papers_threshold_e_squared_by_default():
    """Tang et al. call a class contaminated when J* > e^2; e (Qi et al.'s reimplementation) stays available."""
    assert DEFENSES.build("scan", {}).threshold == pytest.approx(math.exp(2))
    assert DEFENSES.build("scan", {"threshold": math.e}).threshold == pytest.approx(math.e)
