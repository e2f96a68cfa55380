"""The detection defenses' shared statistics, checked against numpy and scipy."""

import numpy as np
import pytest
import torch
from scipy.stats import median_abs_deviation

from bdbench.defenses.beatrix import GramBounds, typical_size
from bdbench.defenses.nc import anomaly_indices
from bdbench.defenses.scoring import anomaly_index, mad, median, scaled_mad

# Ten mask norms, one small outlier: the median of an even count is the mean of the two middle values.
NORMS = [1.0, 10, 11, 12, 13, 14, 15, 16, 17, 18]


@pytest.mark.parametrize("count", [9, 10])
def test_median_and_scaled_mad_match_numpy_and_scipy_on_odd_and_even_counts(count):
    values = torch.randn(count, 3, generator=torch.Generator().manual_seed(count)).double()
    for dim in (0, 1):
        assert torch.allclose(median(values, dim), torch.from_numpy(np.median(values.numpy(), axis=dim)))
        expected = median_abs_deviation(values.numpy(), axis=dim, scale="normal")
        assert torch.allclose(scaled_mad(values, dim), torch.from_numpy(expected))
        raw = median_abs_deviation(values.numpy(), axis=dim)  # scale 1.0: the unscaled MAD Beatrix's bounds use
        assert torch.allclose(mad(values, dim), torch.from_numpy(raw))


def test_anomaly_index_of_the_small_outlier_uses_the_mean_of_the_two_middle_norms():
    norms = torch.tensor(NORMS, dtype=torch.float64)
    expected = (np.median(NORMS) - 1.0) / median_abs_deviation(NORMS, scale="normal")
    assert float(anomaly_index(norms)[0]) == pytest.approx(-expected)
    assert float(anomaly_indices(norms)[0]) == pytest.approx(3.372, abs=1e-3)  # the lower median gives 4.05


def test_beatrix_bounds_are_the_median_plus_minus_raw_mads_of_an_even_count():
    features = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).double()
    bounds = GramBounds(features, torch.zeros(10, dtype=torch.long), 1, 2.0, typical_size(features))
    centre = np.median(features.numpy(), axis=0)
    spread = 2.0 * median_abs_deviation(features.numpy(), axis=0)
    assert torch.allclose(bounds.low[0], torch.from_numpy(centre - spread))
    assert torch.allclose(bounds.high[0], torch.from_numpy(centre + spread))
    typical = np.median(np.abs(features.numpy()), axis=0)
    assert torch.allclose(bounds.scale, torch.from_numpy(typical + 0.01 * typical.mean()))
