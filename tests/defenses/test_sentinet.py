"""SentiNet, a run-time input detector, on a small BadNets model of 28x28 digits."""



def test_sentinet_finds_the_patch_that_hijacks_clean_images(mnist_badnets, effect):
    effect.check("ASR of the model", mnist_badnets.scores(mnist_badnets.model)[1], ">", 0.9)
    _, fpr, tpr, auroc = mnist_badnets.screen_inputs("sentinet", images=500, carriers=30)
    # Seeds 0-3, one and two threads (AVX2): AUROC 0.999-1.000, TPR 0.998-1.000, FPR 0.006-0.104 (the threshold
    # is set at a 5% false rejection on the 150-image clean budget, so the test set's FPR scatters around it).
    effect.check("AUROC", auroc, ">=", 0.95)
    effect.check("TPR", tpr, ">=", 0.9)
    effect.check("FPR", fpr, "<=", 0.15)
