"""SPECTRE (robust covariance estimation and QUE scores) on a tiny poisoned digits set and a clean one."""

import numpy as np
import scipy.linalg
import torch

from bdbench.defenses.scoring import top_k_flags
from bdbench.defenses.spectre import _whitener, que_scores, spectre_class


def test_spectre_flags_the_poisons_after_robust_whitening(sparse_badnets, effect):
    _, tpr, _, auroc = sparse_badnets.detect_poisons("spectre", poison_fraction=0.3)
    effect.check("TPR", tpr, ">=", 0.8)
    effect.check("AUROC", auroc, ">=", 0.7)  # 0.75-0.93 over seeds 0-5 and one or two threads (AVX2)


def test_spectre_removes_one_and_a_half_eps_of_each_class_of_a_clean_set(benign):
    benign.check_spectral_removal("spectre")


def _authors_selection_score(space: np.ndarray, kept: np.ndarray) -> float:
    """rcov_auto_quantum_filter's measure of one candidate's removal, written out afresh: whiten the class
    with the covariance of the kept samples, S the covariance of the result, Q = expm(4 (S - I) / (||S|| - 1)),
    the measure tr(S Q) / tr(Q)."""
    values, vectors = np.linalg.eigh(np.cov(space[kept].T))
    whitened = space @ (vectors / np.sqrt(values)) @ vectors.T
    s = np.cov(whitened.T)
    q = scipy.linalg.expm(4 * (s - np.eye(len(s))) / (np.linalg.norm(s, 2) - 1))
    return float(np.trace(s @ q) / np.trace(q))


def test_spectre_judges_every_dimension_in_one_space_as_the_authors_code_does():
    """Hayase et al.'s code compares the candidate k in one space, the top directions of its largest k. Here
    (a class of 450 anisotropic Gaussian samples and 50 shifted along a weak direction, 64 features) that
    rule picks k = 16; judging each k in its own k-dimensional space picked k = 8."""
    g = torch.Generator().manual_seed(4)
    scales = torch.linspace(3, 0.5, 64, dtype=torch.float64)
    direction = torch.zeros(64, dtype=torch.float64)
    direction[10:30] = 1 / 20 ** 0.5
    clean = torch.randn(450, 64, generator=g, dtype=torch.float64) * scales
    poisons = torch.randn(50, 64, generator=g, dtype=torch.float64) * scales + 8 * direction
    features = 100 * torch.cat([clean, poisons])  # large, so that the whitening's 1e-3 regulariser is negligible
    budget = 75
    centred = features - features.mean(0)
    space = centred @ torch.linalg.svd(centred, full_matrices=False)[2][:32].T
    candidates = {}
    for k in (2, 4, 8, 16, 32):
        mean, inverse_root = _whitener(space[:, :k].numpy(), 0)
        candidates[k] = que_scores((space[:, :k] - mean) @ inverse_root)
    measures = {k: _authors_selection_score(space.numpy(), (~top_k_flags(scores, budget)).numpy())
                for k, scores in candidates.items()}
    chosen = max(measures, key=measures.__getitem__)
    assert chosen == 16, measures
    assert torch.allclose(spectre_class(features, budget, 0), candidates[chosen], rtol=1e-6, atol=0)
