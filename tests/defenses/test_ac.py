"""Activation Clustering (AC) on a tiny poisoned digits set."""



def test_activation_clustering_flags_the_small_poisoned_cluster(sparse_badnets, effect):
    # On this 64-unit model a part of the poisons shares the clean target images' cluster (19-35% of
    # them across kernel sets, threads and seeds), so the bar is 55% rather than the paper's near-100%.
    outcome, tpr, fpr, _ = sparse_badnets.detect_poisons("ac")
    effect.check("TPR", tpr, ">=", 0.55)
    effect.check("FPR", fpr, "<=", 0.2)
    assert bool((outcome.sample_scores[outcome.flagged] > outcome.threshold).all())
