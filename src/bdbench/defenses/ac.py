"""Activation Clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy and Srivastava,
"Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", SafeAI@AAAI 2019).

For each class (by the training label), take the penultimate activations of its samples, reduce
them to 10 dimensions with ICA (the paper's choice), and split them into two clusters with
k-means. Rule: the paper's relative-size analysis, which expects poisoned data to be the smaller
cluster and no more than about a third of a class: the smaller cluster is flagged when it holds
less than `size_threshold` (0.35, the value IBM's Adversarial Robustness Toolbox uses for the
paper's method) of its class. When the poisons make up half of a class or more, this rule cannot
flag them; that is a limitation of the method, reported as measured.

Each sample's score is 1 minus the relative size of its cluster (smaller cluster = more
suspicious), so flagged <=> score > 1 - size_threshold, the reported threshold.
"""

from __future__ import annotations

import warnings
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import read_activations
from bdbench.params import PositiveInt


def two_means_clusters(features: np.ndarray, components: int, seed: int) -> np.ndarray:
    """Cluster ids (0/1) of `features` after FastICA to `components` dimensions and 2-means."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    # Dead ReLU units are constant over a class; FastICA's unit-variance whitening turns them into NaN
    # (scikit-learn 1.9), and they carry nothing to separate, so they are left out.
    features = features[:, features.std(0) > 0]
    components = min(components, features.shape[1], len(features) - 1)
    if components < 1:  # every unit constant over the class: one cluster
        return np.zeros(len(features), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # ICA on dead ReLU units converges slowly
        reduced = FastICA(n_components=components, random_state=seed, max_iter=400,
                          whiten="unit-variance").fit_transform(features)
    return KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)


@DEFENSES.register("ac")
class ActivationClustering(Defense):
    """Activation Clustering (Chen et al. 2019): per class ICA to 10 dims, 2-means, flag a small cluster."""

    kind = DefenseKind.DATA_DETECTION
    citation = ("Chen et al. Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering. "
                "SafeAI@AAAI 2019.")

    def __init__(self, components: PositiveInt = 10,
                 size_threshold: Annotated[float, Field(gt=0, le=0.5)] = 0.35) -> None:
        self.components = components
        self.size_threshold = float(size_threshold)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        train_x, labels = context.training_set()
        features = read_activations(context.model, train_x, "penultimate").double().numpy()
        scores = torch.zeros(len(labels), dtype=torch.float64)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=context.generator("ac")))
        for label in labels.unique():
            members = torch.nonzero(labels == label).flatten()
            if len(members) < 3:
                continue
            clusters = two_means_clusters(features[members.numpy()], self.components, seed)
            sizes = np.bincount(clusters, minlength=2) / len(clusters)
            scores[members] = torch.from_numpy(1.0 - sizes[clusters])
        threshold = 1.0 - self.size_threshold
        return DefenseOutcome(sample_scores=scores, flagged=scores > threshold, threshold=threshold)
