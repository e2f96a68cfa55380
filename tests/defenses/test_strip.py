"""STRIP, a run-time input detector, on a tiny BadNets model."""



def test_strip_separates_triggered_inputs_at_its_clean_false_rejection_rate(badnets, effect):
    outcome, fpr, tpr, auroc = badnets.screen_inputs("strip", overlays=30)
    effect.check("AUROC", auroc, ">=", 0.95)
    effect.check("TPR", tpr, ">=", 0.9)
    # The 1% quantile of 150 budget entropies is their second-lowest: on the test set it rejects 4.7-6.4% of
    # clean images across kernel sets and threads (tools/effect_spread.py), hence 0.1, not 0.06.
    effect.check("FPR", fpr, "<=", 0.1)
    assert outcome.threshold is not None
