"""SCAn (statistical contamination analysis) on a tiny poisoned digits set."""

import pytest


def test_scan_flags_the_poisons_of_the_target_class_only(sparse_badnets, effect):
    outcome, tpr, fpr, _ = sparse_badnets.detect_poisons("scan")
    effect.check("TPR", tpr, ">=", 0.8)
    effect.check("FPR", fpr, "<=", 0.05)
    assert outcome.threshold == pytest.approx(2.718, abs=1e-3)
