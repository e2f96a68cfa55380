"""Spectral Signatures (Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

For each class (by the label the training set carries), centre the penultimate representations
of its samples, take the top right singular vector, and score each sample by its squared
projection on it. Poisoned samples leave a spectral signature: they dominate that direction.
The paper's rule (Algorithm 1): in every class y, of n = |D_y| samples, remove the 1.5 x eps x n
highest-scoring samples, where eps (`poison_fraction`, default 0.1) bounds the poisoned share of
the class (the reference code adds 500 poisons to a class of 5,000 and removes the top 15% of the
class's scores). eps is a share of each class, not of the training set: read as a number of poisons
in the whole set and applied per class, it would remove far more than 1.5 x eps of every class
(half of each on mnist5k at eps = 0.1), even from a clean model. The removal is capped at half the
class, which binds only for eps > 1/3.

Scores are divided by their class mean so that they compare across classes (for AUROC); the
flagged set is the per-class top, so there is no single threshold (`threshold` stays None).
"""

from __future__ import annotations

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import read_activations
from bdbench.defenses.scoring import remove_per_class
from bdbench.params import OpenRate


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Squared projections of centred `features` (n, d) on their top right singular vector."""
    centred = features.double() - features.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]).pow(2)


@DEFENSES.register("ss")
class SpectralSignatures(Defense):
    """Spectral Signatures (Tran et al. 2018): remove the top outliers along each class's top singular direction."""

    kind = DefenseKind.DATA_DETECTION
    citation = "Tran, Li, Madry. Spectral Signatures in Backdoor Attacks. NeurIPS 2018."

    def __init__(self, poison_fraction: OpenRate = 0.1) -> None:
        self.poison_fraction = float(poison_fraction)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        train_x, train_y = context.training_set()
        features = read_activations(context.model, train_x, "penultimate")
        scores, flagged = remove_per_class(train_y, self.poison_fraction, 2,
                                           lambda members, _budget: spectral_scores(features[members]))
        return DefenseOutcome(sample_scores=scores, flagged=flagged)
