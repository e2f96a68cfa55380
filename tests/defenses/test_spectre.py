"""SPECTRE (robust covariance estimation and QUE scores) on a tiny poisoned digits set and a clean one."""



def test_spectre_flags_the_poisons_after_robust_whitening(sparse_badnets, effect):
    _, tpr, _, auroc = sparse_badnets.detect_poisons("spectre", poison_fraction=0.3)
    effect.check("TPR", tpr, ">=", 0.8)
    effect.check("AUROC", auroc, ">=", 0.7)  # 0.75-0.93 over seeds 0-5 and one or two threads (AVX2)


def test_spectre_removes_one_and_a_half_eps_of_each_class_of_a_clean_set(benign):
    benign.check_spectral_removal("spectre")
