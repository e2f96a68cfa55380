"""TeCo (test-time corruption consistency), a run-time input detector, on a tiny BadNets model."""



def test_teco_ranks_triggered_inputs_as_less_consistent_under_corruption(badnets, effect):
    # TeCo is threshold-free in its paper; here its ranking separates (AUROC) while the 5% clean
    # threshold catches few triggered inputs, which the grid reports as measured.
    _, fpr, _, auroc = badnets.screen_inputs("teco")
    effect.check("AUROC", auroc, ">=", 0.75)
    effect.check("FPR", fpr, "<=", 0.15)
