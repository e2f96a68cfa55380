"""Beatrix (Gram matrices of activations) on a tiny poisoned digits set."""



def test_beatrix_scores_poisons_above_clean_samples(sparse_badnets, effect):
    _, _, fpr, auroc = sparse_badnets.detect_poisons("beatrix")
    effect.check("AUROC", auroc, ">=", 0.75)
    effect.check("FPR", fpr, "<=", 0.1)
