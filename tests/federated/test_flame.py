"""FLAME (Nguyen et al., USENIX Security 2022) against a hand-computed round: the majority cluster is kept,
outliers dropped, admitted updates clipped to the median norm of all updates, noise of std lambda x that median."""

from __future__ import annotations

import math

import pytest
import torch

from bdbench.errors import ConfigError
from bdbench.federated import SERVER_DEFENSES, RoundContext
from bdbench.federated.flame import cosine_distances, majority_cluster

BENIGN_NORMS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
OUTLIER_NORMS = [10.0, 20.0, 30.0]


def _round() -> torch.Tensor:
    """Seven benign updates within 0.06 rad of e1 (norms 1..7) and three outliers near e4 (norms 10, 20, 30)."""
    benign = [a * torch.tensor([math.cos(0.01 * i), math.sin(0.01 * i), 0.0, 0.0], dtype=torch.float64)
              for i, a in enumerate(BENIGN_NORMS)]
    outliers = [b * torch.tensor([0.0, 0.0, math.sin(0.02 * j), math.cos(0.02 * j)], dtype=torch.float64)
                for j, b in enumerate(OUTLIER_NORMS)]
    return torch.stack(benign + outliers)


def _context(seed: int = 0) -> RoundContext:
    return RoundContext(1, 10, 10, torch.Generator().manual_seed(seed))


def test_cosine_distances_are_one_minus_the_cosine():
    d = cosine_distances(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]]))
    assert d[0, 1].item() == pytest.approx(1.0)
    assert d[0, 2].item() == pytest.approx(2.0)
    assert d[0, 3].item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert torch.equal(d, d.T) and d.diagonal().eq(0).all()


def test_hdbscan_keeps_a_majority_of_the_similar_updates_and_drops_the_three_outliers():
    """With one cluster, HDBSCAN labels the points still together at its densest level (at least the minimum
    cluster size, 10 // 2 + 1 = 6); the benign update that joins the blob last may be labelled noise with the
    outliers."""
    admitted = majority_cluster(cosine_distances(_round())).tolist()
    assert set(admitted) <= set(range(7)) and len(admitted) >= 6


def test_flame_averages_the_admitted_updates_clipped_to_the_median_norm():
    updates = _round()
    flame = SERVER_DEFENSES.build("flame", {"noise_lambda": 0.0})
    # the median of the ten norms 1..7, 10, 20, 30 is (5 + 6) / 2
    assert flame.clipping_bound(updates).item() == pytest.approx(5.5)
    scale = [min(1.0, 5.5 / a) for a in BENIGN_NORMS]  # 1, 1, 1, 1, 1, 5.5/6, 5.5/7
    admitted = majority_cluster(cosine_distances(updates)).tolist()
    expected = sum(scale[i] * updates[i] for i in admitted) / len(admitted)
    assert torch.allclose(flame.aggregate(updates, torch.ones(10), _context()), expected)
    # the outliers' direction (the third and fourth coordinates) gets nothing
    assert flame.aggregate(updates, torch.ones(10), _context())[2:].abs().max().item() == 0.0


def test_flame_noise_has_std_lambda_times_the_median_norm():
    updates = _round()
    quiet = SERVER_DEFENSES.build("flame", {"noise_lambda": 0.0}).aggregate(updates, torch.ones(10), _context(3))
    noisy = SERVER_DEFENSES.build("flame", {"noise_lambda": 0.1}).aggregate(updates, torch.ones(10), _context(3))
    draw = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(noisy - quiet, 0.1 * 5.5 * draw)
    assert SERVER_DEFENSES.build("flame", {}).noise_lambda == 0.001  # the paper's lambda for image classification


def test_flame_refuses_a_round_of_one_client_and_a_negative_lambda():
    with pytest.raises(ConfigError, match="flame clusters the round's updates and needs at least 2 clients"):
        SERVER_DEFENSES.build("flame", {}).check(10, 1)
    with pytest.raises(ConfigError, match="noise_lambda"):
        SERVER_DEFENSES.build("flame", {"noise_lambda": -1.0})
