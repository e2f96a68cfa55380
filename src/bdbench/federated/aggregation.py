"""Server-side aggregation rules: what the server makes of the clients' model updates.

A rule sees only what a federated server sees: the round's updates (one flattened vector per participating
client, `updates` of shape (K, D)), how many samples each client reports (`sizes`), and its own random
generator. It never sees which clients are malicious, their data or any test data; the simulation scores the
global model. `aggregate` returns the one update (D,) that the server adds to the global model, scaled by the
federation's `server_lr`.

Every rule registers its class with `@SERVER_DEFENSES.register("name")`; its constructor's annotations are its
parameter checks (`bdbench.params`). Lockdown, which changes what clients train and send as well as how the
server fuses them, lives in `bdbench.federated.lockdown`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from bdbench.errors import ConfigError
from bdbench.params import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from bdbench.registry import Registry

Weighting = Literal["samples", "uniform"]


@dataclass
class RoundContext:
    """What a server knows in one round besides the updates: the round (1-based), the number of rounds, the
    number of clients in the federation, a generator seeded for this round (for noise), and, for a defense with
    a root set (`ServerDefense.root_samples`), the server's own flattened update trained on it this round."""

    round: int
    rounds: int
    clients: int
    generator: torch.Generator
    server_update: torch.Tensor | None = None


class ServerDefense:
    """An aggregation rule. Subclasses set `citation` and implement `aggregate`."""

    citation: ClassVar[str] = ""
    reference: ClassVar[bool] = False  # FedAvg: the undefended server the others are compared with
    # Whether clients run Lockdown's masked protocol (bdbench.federated.lockdown) instead of dense training.
    sparse_clients: ClassVar[bool] = False
    # Clean training samples the server holds out of the clients' shares as its root set (FLTrust); 0: none.
    root_samples: int = 0

    def check(self, clients: int, per_round: int) -> None:
        """Refuse, before any training, a setting this federation cannot take (a one-line `ConfigError`)."""

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        raise NotImplementedError


SERVER_DEFENSES: Registry[type[ServerDefense]] = Registry("server defense")


def weighted_mean(updates: torch.Tensor, sizes: torch.Tensor, weighting: Weighting = "samples") -> torch.Tensor:
    """FedAvg's mean of the updates, each weighted by its client's sample count (or all alike)."""
    if weighting == "uniform":
        return updates.mean(0)
    weights = sizes.to(updates.dtype)
    return (weights[:, None] * updates).sum(0) / weights.sum()


@SERVER_DEFENSES.register("fedavg")
class FedAvg(ServerDefense):
    """FedAvg (McMahan et al. 2017): the updates' mean weighted by each client's sample count; no defense."""

    citation = ("McMahan, Moore, Ramage, Hampson, Arcas. Communication-Efficient Learning of Deep Networks from "
                "Decentralized Data. AISTATS 2017.")
    reference = True

    def __init__(self, weighting: Weighting = "samples") -> None:
        self.weighting = weighting

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        return weighted_mean(updates, sizes, self.weighting)


@SERVER_DEFENSES.register("clip")
class NormClipping(ServerDefense):
    """Norm clipping with optional Gaussian noise (Sun et al. 2019).

    From "Can You Really Backdoor Federated Learning?".

    Each update is scaled to an L2 norm of at most `max_norm` (u / max(1, ||u|| / M)), the clipped updates are
    averaged as FedAvg does, and independent Gaussian noise of standard deviation `noise_std` is added to every
    coordinate of the average (the paper's weak differential privacy; 0 turns it off). Lockdown's code clips at
    M = 2, the default here.
    """

    citation = ("Sun, Kairouz, Suresh, McMahan. Can You Really Backdoor Federated Learning? "
                "arXiv:1911.07963, 2019.")

    def __init__(self, max_norm: PositiveFloat = 2.0, noise_std: NonNegativeFloat = 0.0,
                 weighting: Weighting = "samples") -> None:
        self.max_norm, self.noise_std, self.weighting = max_norm, noise_std, weighting

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        norms = updates.norm(dim=1, keepdim=True)
        clipped = updates / torch.clamp(norms / self.max_norm, min=1.0)
        mean = weighted_mean(clipped, sizes, self.weighting)
        if self.noise_std > 0:
            noise = torch.randn(mean.shape, generator=context.generator, dtype=mean.dtype)
            mean = mean + self.noise_std * noise.to(mean.device)
        return mean


def krum_scores(updates: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each update (Blanchard et al. 2017): the sum of its squared distances to its
    n - f - 2 nearest other updates."""
    n = len(updates)
    distances = torch.cdist(updates.double(), updates.double()).pow(2)
    distances.fill_diagonal_(float("inf"))
    nearest = torch.sort(distances, dim=1).values[:, :n - f - 2]
    return nearest.sum(1)


@SERVER_DEFENSES.register("krum")
class Krum(ServerDefense):
    """Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017).

    With n updates of which at most `f` are Byzantine, each update's score is the sum of its squared Euclidean
    distances to its n - f - 2 nearest neighbours; Krum returns the update of lowest score, Multi-Krum (`m` > 1)
    the plain mean of the `m` updates of lowest scores. Krum needs n > 2f + 2 (the paper's condition).
    Lockdown's code (and its experiments) run Krum with f = the number of corrupt clients, m = 1.
    """

    citation = ("Blanchard, El Mhamdi, Guerraoui, Stainer. Machine Learning with Adversaries: Byzantine Tolerant "
                "Gradient Descent. NeurIPS 2017.")

    def __init__(self, f: NonNegativeInt = 4, m: PositiveInt = 1) -> None:
        self.f, self.m = f, m

    def check(self, clients: int, per_round: int) -> None:
        if per_round <= 2 * self.f + 2:
            raise ConfigError(f"krum f={self.f} needs more than 2f + 2 = {2 * self.f + 2} clients per round, this "
                              f"federation has {per_round}; lower f or raise clients or participation")
        if self.m > per_round:
            raise ConfigError(f"krum m={self.m} selects more updates than the {per_round} clients per round; lower m")

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        chosen = torch.argsort(krum_scores(updates, self.f), stable=True)[:self.m]
        return updates[chosen].mean(0)


@SERVER_DEFENSES.register("median")
class CoordinateMedian(ServerDefense):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018).

    Each coordinate of the aggregate is the median of that coordinate over the updates (the mean of the two middle values for an even count, as the
    paper defines the median; Lockdown's code takes `torch.median`, the lower of the two)."""

    citation = ("Yin, Chen, Ramchandran, Bartlett. Byzantine-Robust Distributed Learning: Towards Optimal "
                "Statistical Rates. ICML 2018.")

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        n = len(updates)
        ordered = torch.sort(updates, dim=0).values
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@SERVER_DEFENSES.register("trimmed-mean")
class TrimmedMean(ServerDefense):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, the mean without the extremes.

    For each coordinate, drop the `beta` share of largest and the `beta` share of smallest values (floor(beta * n)
    each) and average the rest."""

    citation = CoordinateMedian.citation

    def __init__(self, beta: Annotated[float, Field(ge=0, lt=0.5)] = 0.1) -> None:
        self.beta = beta

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        n = len(updates)
        cut = math.floor(self.beta * n)
        ordered = torch.sort(updates, dim=0).values
        return ordered[cut:n - cut].mean(0)


@SERVER_DEFENSES.register("rlr")
class RobustLearningRate(ServerDefense):
    """Robust learning rate (Ozdayi, Kantarcioglu, Gel, AAAI 2021): a per-coordinate sign vote.

    Where the absolute sum of the updates' signs reaches the threshold `theta`, the coordinate keeps the server's
    learning rate; below it, the learning rate is negated, so the server moves that coordinate against the
    (weighted) mean update. Lockdown's code runs RLR with theta = 8 for 40 clients and weights the mean by
    sample count, as here.
    """

    citation = ("Ozdayi, Kantarcioglu, Gel. Defending against Backdoors in Federated Learning with Robust "
                "Learning Rate. AAAI 2021.")

    def __init__(self, theta: PositiveInt = 8, weighting: Weighting = "samples") -> None:
        self.theta, self.weighting = theta, weighting

    def check(self, clients: int, per_round: int) -> None:
        if self.theta > per_round:
            raise ConfigError(f"rlr theta={self.theta} is more votes than the {per_round} clients per round, so "
                              "every coordinate would be flipped; lower theta")

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        votes = torch.sign(updates).sum(0).abs()
        direction = torch.where(votes >= self.theta, 1.0, -1.0).to(updates.dtype)
        return direction * weighted_mean(updates, sizes, self.weighting)


__all__ = ["SERVER_DEFENSES", "CoordinateMedian", "FedAvg", "Krum", "NormClipping", "RobustLearningRate",
           "RoundContext", "ServerDefense", "TrimmedMean", "krum_scores", "weighted_mean"]
