"""SentiNet, a run-time input detector, on a tiny BadNets model."""



def test_sentinet_finds_the_patch_that_hijacks_clean_images(badnets, effect):
    _, fpr, tpr, auroc = badnets.screen_inputs("sentinet", carriers=30)
    effect.check("AUROC", auroc, ">=", 0.8)
    effect.check("TPR", tpr, ">=", 0.6)
    effect.check("FPR", fpr, "<=", 0.15)
