"""FLTrust (Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021).

The server holds a small clean root set (the paper's default: 100 training examples) and each round trains the
current global model on it as a client would, which gives it a server update g0. Then, for each client update
g_i (the paper's Algorithm 2):

1. trust score TS_i = ReLU(cos(g_i, g0)): an update pointing away from the server's gets no say;
2. the update is rescaled to the server update's norm: g_i * ||g0|| / ||g_i||;
3. the aggregate is sum_i TS_i * rescaled g_i / sum_i TS_i.

Choices the paper leaves open or that differ from it, and what bdbench does:

- where the root set comes from: the paper samples it from the union of the clients' clean training data;
  bdbench holds `root_size` training samples out before the clients' shares are dealt (`split.hold_out`), so
  the root set is clean, drawn from the training distribution, never the test set, and no client holds it
  (an FLTrust federation's clients therefore share `root_size` fewer samples than a FedAvg one's);
- the server trains with the clients' local SGD (epochs, learning rate, weight decay, momentum, augmentation),
  as the paper sets the server's learning rate and local iterations to the clients'; its batch is the clients'
  batch or the root set, whichever is smaller, so a root set smaller than a batch still gives one step an epoch;
- a round where every trust score is zero (no update within 90 degrees of the server's) leaves the global
  model unchanged: the paper's weighted mean is undefined there.
"""

from __future__ import annotations

import torch

from bdbench.errors import ConfigError
from bdbench.federated.aggregation import SERVER_DEFENSES, RoundContext, ServerDefense
from bdbench.params import PositiveInt


def trust_scores(updates: torch.Tensor, server_update: torch.Tensor) -> torch.Tensor:
    """ReLU(cos(g_i, g0)) of each row of `updates` (K, D) with the server update (D,); a zero update scores 0."""
    u, g0 = updates.double(), server_update.double()
    cos = (u @ g0) / (u.norm(dim=1) * g0.norm()).clamp_min(1e-12)
    return torch.relu(cos)


@SERVER_DEFENSES.register("fltrust")
class FLTrust(ServerDefense):
    """FLTrust (Cao et al., NDSS 2021): trust scores ReLU(cos) against the server's own update on a clean root
    set of `root_size` held-out training samples, client updates rescaled to its norm (module docstring)."""

    citation = ("Cao, Fang, Liu, Gong. FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping. "
                "NDSS 2021.")

    def __init__(self, root_size: PositiveInt = 100) -> None:
        self.root_samples = root_size

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        g0 = context.server_update
        if g0 is None:
            raise ConfigError("fltrust needs the server's update on its root set, which this round lacks; run it "
                              "through bdbench.federated.simulation")
        g0 = g0.to(updates.device, updates.dtype)
        scores = trust_scores(updates, g0).to(updates.dtype)
        if float(scores.sum()) == 0.0:
            return torch.zeros_like(g0)
        rescaled = updates * (g0.norm() / updates.norm(dim=1).clamp_min(1e-12))[:, None]
        return (scores[:, None] * rescaled).sum(0) / scores.sum()


__all__ = ["FLTrust", "trust_scores"]
