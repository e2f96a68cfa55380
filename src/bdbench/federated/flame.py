"""FLAME (Nguyen, Rieger, Chen, Yalame, Moellering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni,
Koushanfar, Sadeghi, Schneider, "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022).

Each round the server (the paper's Algorithm 1):

1. computes the pairwise cosine distances c_ij = 1 - cos(u_i, u_j) of the n updates and clusters them with
   HDBSCAN (minimum cluster size n/2 + 1, so at most one cluster can hold a majority); the updates of that
   majority cluster are admitted, every other one (HDBSCAN's outliers) is dropped;
2. takes the clipping bound S_t, the median of the L2 norms of all n updates, and scales each admitted update
   to a norm of at most S_t (u * min(1, S_t / ||u||));
3. averages the clipped admitted updates (a plain mean, as the paper sums and divides by their count);
4. adds Gaussian noise of standard deviation sigma = lambda * S_t to every coordinate.

Choices the paper leaves open or that differ from it, and what bdbench does:

- the paper measures cosine distances between the local models W_i; all of them are the same global model plus
  an update, so the distances are taken between the updates u_i = W_i - G, which is what the paper's clipping
  (e_i = ||G - W_i||) measures too;
- HDBSCAN is scikit-learn's (`sklearn.cluster.HDBSCAN` on the precomputed distance matrix) with `min_samples=1`
  and `allow_single_cluster=True`: with one honest majority the whole majority is one cluster, which
  HDBSCAN would otherwise refuse to report; where HDBSCAN finds no cluster at all, nothing is admitted and the
  global model moves by the noise only. HDBSCAN labels a lone cluster's members by its densest level: the
  updates that join it last are labelled noise, so a round with one benign majority admits about n/2 + 1
  updates, not all benign ones (measured: 22 of 36 benign, none of 4 opposite, in a 40-client blob);
- lambda defaults to 0.001, the paper's noise level factor for image classification (0.01 is its value for
  the IoT intrusion-detection task);
- the noise is added to the aggregated update, which the simulation adds to the global model scaled by
  `server_lr`; with the protocol's server_lr = 1 that is the paper's noise on the global model.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import HDBSCAN

from bdbench.errors import ConfigError
from bdbench.federated.aggregation import SERVER_DEFENSES, RoundContext, ServerDefense
from bdbench.params import NonNegativeFloat


def cosine_distances(updates: torch.Tensor) -> torch.Tensor:
    """Pairwise 1 - cos(u_i, u_j) of the rows of `updates` (K, D), in float64; a zero update is at distance 1
    from every other."""
    u = updates.double()
    unit = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    distances = (1.0 - unit @ unit.T).clamp_min(0.0)
    distances.fill_diagonal_(0.0)
    return distances


def majority_cluster(distances: torch.Tensor) -> torch.Tensor:
    """The indices HDBSCAN (minimum cluster size n // 2 + 1) puts in its largest cluster, sorted; empty where it
    finds no cluster."""
    n = len(distances)
    clusterer = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                        allow_single_cluster=True, copy=True)
    labels = clusterer.fit_predict(distances.cpu().numpy())
    clustered = labels[labels >= 0]
    if len(clustered) == 0:
        return torch.empty(0, dtype=torch.long)
    largest = np.bincount(clustered).argmax()
    return torch.from_numpy(np.flatnonzero(labels == largest)).long()


@SERVER_DEFENSES.register("flame")
class Flame(ServerDefense):
    """FLAME (Nguyen et al., USENIX Security 2022): HDBSCAN on the updates' cosine distances keeps the majority
    cluster, clipping to the median norm, Gaussian noise of std `noise_lambda` x that median (module docstring)."""

    citation = ("Nguyen, Rieger, Chen, Yalame, Moellering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni, "
                "Koushanfar, Sadeghi, Schneider. FLAME: Taming Backdoors in Federated Learning. USENIX Security 2022.")

    def __init__(self, noise_lambda: NonNegativeFloat = 0.001) -> None:
        self.noise_lambda = noise_lambda

    def check(self, clients: int, per_round: int) -> None:
        if per_round < 2:
            raise ConfigError(f"flame clusters the round's updates and needs at least 2 clients per round, this "
                              f"federation has {per_round}; raise clients or participation")

    def clipping_bound(self, updates: torch.Tensor) -> torch.Tensor:
        """S_t: the median L2 norm of all the round's updates (the mean of the two middle ones for an even count)."""
        return torch.quantile(updates.double().norm(dim=1), 0.5)

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        admitted = majority_cluster(cosine_distances(updates)).to(updates.device)
        bound = self.clipping_bound(updates)
        kept = updates[admitted]
        norms = kept.double().norm(dim=1, keepdim=True)
        clipped = kept * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0).to(updates.dtype)
        mean = clipped.mean(0) if len(kept) else torch.zeros_like(updates[0])
        sigma = self.noise_lambda * float(bound)
        if sigma > 0:
            noise = torch.randn(mean.shape, generator=context.generator, dtype=mean.dtype)
            mean = mean + sigma * noise.to(mean.device)
        return mean


__all__ = ["Flame", "cosine_distances", "majority_cluster"]
