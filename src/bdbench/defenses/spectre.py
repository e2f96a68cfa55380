"""SPECTRE (Hayase, Kong, Somani and Oh, "SPECTRE: Defending Against Backdoor Attacks Using Robust
Statistics", ICML 2021).

For each class (by training label): centre its penultimate representations and project them on
their top k singular directions; estimate the clean mean and covariance robustly; whiten with
them, so that the poisons' direction stands out; score each sample with the QUantum Entropy (QUE)
score at alpha = 4, tau_i = w_i' Q w_i / tr(Q) with Q = expm(alpha (S - I) / (||S||_2 - 1)), S the
covariance of the whitened data; and remove the 1.5 x eps x n highest-scoring samples of a class of
n, eps (`poison_fraction`, default 0.1) the defender's bound on the poisoned share of the class: the
paper's rule, taken from Spectral Signatures (its reference code removes round(1.5 x eps) of the
class's representations, eps there a count of poisons in it). As for Spectral Signatures the
removal is capped at half the class, which binds only for eps > 1/3. k is chosen per class from
{2, 4, 8, 16, 32}, as in the paper, as the one whose whitened data (after the removal) has the
largest mean QUE score.

Deviation: the paper's robust estimator is the filtering algorithm of Diakonikolas et al.; we use
the Minimum Covariance Determinant (scikit-learn's MinCovDet), another robust estimator that
tolerates contamination below one half. Neither can work when poisons are half a class or more.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import read_activations
from bdbench.defenses.scoring import remove_per_class, top_k_flags
from bdbench.params import OpenRate

_DIMENSIONS = (2, 4, 8, 16, 32)


def que_scores(whitened: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """QUE scores of whitened samples (n, k): large where a sample lies along the directions in which
    the whitened covariance most exceeds the identity."""
    n, k = whitened.shape
    covariance = whitened.T @ whitened / n
    spread = torch.linalg.matrix_norm(covariance, ord=2) - 1.0
    q = torch.linalg.matrix_exp(alpha * (covariance - torch.eye(k, dtype=whitened.dtype)) / spread.clamp_min(1e-6))
    return ((whitened @ q) * whitened).sum(1) / torch.trace(q)


def _whitener(points: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust (mean, inverse square root of the covariance) of `points`."""
    from sklearn.covariance import MinCovDet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MCD warns when the covariance is near singular; we regularise
        estimate = MinCovDet(random_state=seed).fit(points)
    values, vectors = torch.linalg.eigh(torch.from_numpy(estimate.covariance_))
    inverse_root = vectors @ torch.diag(1.0 / (values.clamp_min(0).sqrt() + 1e-3)) @ vectors.T
    return torch.from_numpy(estimate.location_), inverse_root


def spectre_class(features: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
    """QUE scores of one class's representations (n, d), at the k the paper's selection rule picks."""
    centred = features.double() - features.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    best_scores, best_tau = None, -float("inf")
    for k in [k for k in _DIMENSIONS if k <= min(vh.shape[0], len(features) // 4)] or [1]:
        projected = centred @ vh[:k].T
        mean, inverse_root = _whitener(projected.numpy(), seed)
        scores = que_scores((projected - mean) @ inverse_root)
        kept = ~top_k_flags(scores, budget)
        # Selection: whiten with the samples this k keeps; the k whose data still deviates most wins.
        rest = projected[kept]
        values, vectors = torch.linalg.eigh(torch.cov(rest.T).reshape(k, k))
        root = vectors @ torch.diag(1.0 / (values.clamp_min(0).sqrt() + 1e-3)) @ vectors.T
        tau = float(que_scores((projected - rest.mean(0)) @ root).mean())
        if tau > best_tau:
            best_scores, best_tau = scores, tau
    assert best_scores is not None  # the loop above runs at least once
    return best_scores


@DEFENSES.register("spectre")
class Spectre(Defense):
    """SPECTRE (Hayase et al. 2021): robust whitening and QUE scores per class, remove the top outliers."""

    kind = DefenseKind.DATA_DETECTION
    citation = "Hayase, Kong, Somani, Oh. SPECTRE: Defending Against Backdoor Attacks Using Robust Statistics. ICML 2021."

    def __init__(self, poison_fraction: OpenRate = 0.1) -> None:
        self.poison_fraction = float(poison_fraction)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        train_x, train_y = context.training_set()
        features = read_activations(context.model, train_x, "penultimate")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=context.generator("spectre")))
        scores, flagged = remove_per_class(train_y, self.poison_fraction, 8,
                                           lambda members, budget: spectre_class(features[members], budget, seed))
        return DefenseOutcome(sample_scores=scores, flagged=flagged)
