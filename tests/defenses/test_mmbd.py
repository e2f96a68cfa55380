"""MM-BD (maximum-margin backdoor detection) on tiny poisoned and benign digits models."""

import numpy as np

from bdbench.defenses import DefenseKind
from bdbench.defenses.mmbd import max_statistic_p_value


def test_mmbd_finds_the_target_of_a_backdoored_model_and_ranks_a_benign_one_far_below(badnets, benign, effect):
    defense, backdoored = badnets.defend("mmbd")
    _, clean = benign.defend("mmbd")
    assert defense.kind is DefenseKind.MODEL_DETECTION
    assert backdoored.detected and backdoored.suspected_targets == (0,)
    effect.check("-log10 p of the backdoored model", backdoored.anomaly_index, ">", backdoored.threshold)
    # The benign model's p-value is 0.013 on AVX-512 and 0.037 on AVX2 kernels with one thread: below the
    # paper's 0.05, a false positive of MM-BD on this tiny model (the benign rates on model-defenses measure
    # how often). What holds on every kernel set is that the backdoored model is 10 times more significant.
    effect.check("-log10 p, backdoored less benign", backdoored.anomaly_index - clean.anomaly_index, ">", 1)


def test_mmbd_p_value_of_the_largest_statistic():
    rng = np.random.default_rng(0)
    null = rng.gamma(5.0, 4.0, size=9)
    assert max_statistic_p_value(np.append(null, 200.0)) < 1e-6
    assert max_statistic_p_value(np.append(null, null.max() * 0.99)) > 0.05
    assert max_statistic_p_value(np.array([3.0, 3.0, 3.0, 9.0])) == 0.0
