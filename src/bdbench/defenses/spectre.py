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
removal is capped at half the class, which binds only for eps > 1/3.

Choice of k, per class, as the authors' code makes it (rcov_auto_quantum_filter in
quantum_filters.jl): for each candidate k, whiten the class with the covariance of the samples that
k's removal keeps and take the mean QUE score tr(S Q) / tr(Q) of the whitened class; the k with the
largest wins (a removal that took the poisons out leaves them standing out of the kept samples'
covariance). Every candidate is measured in the same space, the top singular directions of the
largest k tried (the authors' code: 100 directions, its largest k). Measured in each k's own space
instead, the score would shrink as k grows (the more directions near the identity, the more they
dilute it) and pull the choice towards the smallest k.

Deviations from the authors' code, deliberate:
- The robust estimator: theirs is the filtering algorithm of Diakonikolas et al. (dkk17.jl); we use
  the Minimum Covariance Determinant (scikit-learn's MinCovDet), another robust estimator that
  tolerates contamination below one half. Neither can work when poisons are half a class or more.
  The QUE scores are centred on MCD's robust location (theirs on the class mean).
- The candidates: theirs are k = 1, 4, 9, ..., 100; ours are 2, 4, 8, 16, 32, and only those at most
  a quarter of the class and the rank of its representations (MCD in 100 dimensions, per class and
  per candidate, is too slow for a CPU benchmark).
- The classes: their experiments run SPECTRE on the target class only, knowing it; we run it on
  every class, as a defender who does not know the target must.
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
_ALPHA = 4.0


def _quantum_weights(covariance: torch.Tensor, alpha: float) -> torch.Tensor:
    """Q = expm(alpha (S - I) / (||S||_2 - 1)) of a whitened covariance S."""
    k = covariance.shape[0]
    spread = torch.linalg.matrix_norm(covariance, ord=2) - 1.0
    return torch.linalg.matrix_exp(alpha * (covariance - torch.eye(k, dtype=covariance.dtype)) / spread.clamp_min(1e-6))


def que_scores(whitened: torch.Tensor, alpha: float = _ALPHA) -> torch.Tensor:
    """QUE scores of whitened samples (n, k): large where a sample lies along the directions in which
    the whitened covariance most exceeds the identity."""
    n, _ = whitened.shape
    q = _quantum_weights(whitened.T @ whitened / n, alpha)
    return ((whitened @ q) * whitened).sum(1) / torch.trace(q)


def _inverse_root(covariance: torch.Tensor) -> torch.Tensor:
    """A regularised inverse square root of a covariance matrix."""
    values, vectors = torch.linalg.eigh(covariance)
    return vectors @ torch.diag(1.0 / (values.clamp_min(0).sqrt() + 1e-3)) @ vectors.T


def _whitener(points: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust (mean, inverse square root of the covariance) of `points`."""
    from sklearn.covariance import MinCovDet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MCD warns when the covariance is near singular; we regularise
        estimate = MinCovDet(random_state=seed).fit(points)
    return torch.from_numpy(estimate.location_), _inverse_root(torch.from_numpy(estimate.covariance_))


def selection_score(space: torch.Tensor, kept: torch.Tensor, alpha: float = _ALPHA) -> float:
    """How far a class (n, d), whitened by the covariance of its `kept` samples, still deviates from
    them: the mean QUE score tr(S Q) / tr(Q), S the covariance of the whitened class."""
    d = space.shape[1]
    whitened = space @ _inverse_root(torch.cov(space[kept].T).reshape(d, d))
    covariance = torch.cov(whitened.T).reshape(d, d)
    q = _quantum_weights(covariance, alpha)
    return float(torch.trace(covariance @ q) / torch.trace(q))


def spectre_class(features: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
    """QUE scores of one class's representations (n, d), at the k the authors' selection rule picks."""
    centred = features.double() - features.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    candidates = [k for k in _DIMENSIONS if k <= min(vh.shape[0], len(features) // 4)] or [1]
    space = centred @ vh[:max(candidates)].T  # every candidate is judged in the largest one's space
    best_scores, best_tau = None, -float("inf")
    for k in candidates:
        projected = space[:, :k]
        mean, inverse_root = _whitener(projected.numpy(), seed)
        scores = que_scores((projected - mean) @ inverse_root)
        tau = selection_score(space, ~top_k_flags(scores, budget))
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
