"""Spectral Signatures (SS) on a tiny poisoned digits set and a clean one."""



def test_ss_removes_one_and_a_half_eps_of_each_class_of_a_clean_set(benign):
    benign.check_spectral_removal("ss")


# The 57 poisons are 29% of the target class (199 samples), so the defender's bound eps is 0.3.
def test_spectral_signatures_flag_poisons_above_chance(sparse_badnets, effect):
    # Each class loses 1.5 x eps of its samples, 90 of the target class's 199: chance would catch 45%
    # of the poisons. On this tiny model SS caught 74-89% (seeds 0-5, one or two threads, AVX2).
    _, tpr, _, _ = sparse_badnets.detect_poisons("ss", poison_fraction=0.3)
    effect.check("TPR", tpr, ">=", 0.65)
