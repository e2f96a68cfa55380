"""Beatrix (Gram matrices of activations) on a tiny poisoned digits set, and its parts by hand."""

import numpy as np
import torch

from bdbench.defenses import DEFENSES
from bdbench.defenses.beatrix import GramBounds, class_thresholds, gram_features


def test_beatrix_scores_poisons_above_clean_samples(sparse_badnets, effect):
    _, _, fpr, auroc = sparse_badnets.detect_poisons("beatrix")
    # One thread, seeds 0-5 (AVX2): AUROC 0.963-0.999, FPR 0.038-0.067 (per-class thresholds on 15 clean
    # images a class; the former single threshold on the pooled budget flagged under 1%).
    effect.check("AUROC", auroc, ">=", 0.75)
    effect.check("FPR", fpr, "<=", 0.1)


def test_gram_entries_keep_their_sign_under_the_pth_root():
    """Channels (2, -1) at one position: G_1 = [[4, -2], [-2, 1]] and G_3 = [[64, -8], [-8, 1]], whose signed
    cube roots are the same entries (4, -2, 1); a root of the clamped entry would read 0 for -8."""
    feature_map = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    entries = gram_features(feature_map, 3).view(3, 3)
    assert torch.allclose(entries[0], torch.tensor([4.0, -2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(entries[2], torch.tensor([4.0, -2.0, 1.0], dtype=torch.float64))


def test_beatrix_bounds_are_the_median_plus_minus_ten_raw_mads_by_default():
    assert DEFENSES.build("beatrix", {}).mad_scale == 10.0
    features = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).double()
    scale = torch.ones(4, dtype=torch.float64)
    bounds = GramBounds(features, torch.zeros(10, dtype=torch.long), 1, 10.0, scale)
    centre = np.median(features.numpy(), axis=0)
    spread = 10.0 * np.median(np.abs(features.numpy() - centre), axis=0)
    assert torch.allclose(bounds.low[0], torch.from_numpy(centre - spread))
    assert torch.allclose(bounds.high[0], torch.from_numpy(centre + spread))


def test_thresholds_are_per_class_order_statistics_of_five_fold_held_out_deviations():
    """The authors' threshold_determine, written out for one class of 23 samples: five folds of 4 in order
    (the last 3 never held out), bounds from the rest, the held-out deviation at index int(0.95 x 20) of the
    sorted 20. A second class, ten times as spread, gets its own threshold."""
    g = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(23, 6, generator=g), 10 * torch.randn(30, 6, generator=g)]).double()
    labels = torch.cat([torch.zeros(23, dtype=torch.long), torch.ones(30, dtype=torch.long)])
    scale = torch.ones(6, dtype=torch.float64)
    thresholds = class_thresholds(features, labels, 3, 1.0, scale, 0.05)  # narrow bounds: nonzero deviations
    rows, held_out = features[:23].numpy(), []
    for fold in range(5):
        test = np.zeros(23, dtype=bool)
        test[fold * 4:(fold + 1) * 4] = True
        centre = np.median(rows[~test], axis=0)
        spread = np.median(np.abs(rows[~test] - centre), axis=0)
        outside = np.maximum(centre - spread - rows[test], 0) + np.maximum(rows[test] - centre - spread, 0)
        held_out.append(outside.mean(1))
    expected = np.sort(np.concatenate(held_out))[int(20 * 0.95)]
    assert expected > 0 and abs(float(thresholds[0]) - expected) < 1e-12
    assert thresholds[1] > thresholds[0] and torch.isinf(thresholds[2])  # class 2 has no budget samples
