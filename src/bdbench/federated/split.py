"""How a training set is shared among clients: IID (stratified, equal shares) or Dirichlet non-IID."""

from __future__ import annotations

import numpy as np
import torch

from bdbench.errors import ConfigError
from bdbench.federated.config import DirichletSplit


def split_iid(y: torch.Tensor, clients: int, seed: int) -> list[torch.Tensor]:
    """Each class shuffled and dealt to the clients in turn, so every client holds about the same number of
    samples of each class (and floor or ceil of N / clients in all)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([members[torch.randperm(len(members), generator=generator)]
                       for members in (torch.nonzero(y == c).flatten() for c in torch.unique(y))])
    # Deal in turn, starting each class where the previous ended: shares differ by at most one sample.
    return [torch.sort(order[k::clients]).values for k in range(clients)]


def split_dirichlet(y: torch.Tensor, clients: int, split: DirichletSplit, seed: int,
                    attempts: int = 1000) -> list[torch.Tensor]:
    """Hsu, Qi, Brown (2019), as Lockdown's `distribute_data_dirichlet`: for each class, proportions
    p ~ Dirichlet(alpha), with clients already holding N / clients or more left out of that class, then the class's
    samples cut by the cumulative proportions; drawn again until every client holds `min_samples`."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    n = len(labels)
    for _ in range(attempts):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            rng.shuffle(members)
            p = rng.dirichlet(np.full(clients, split.dirichlet))
            p = p * np.array([len(s) < n / clients for s in shares])
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(members)).astype(int)[:-1]
            for share, part in zip(shares, np.split(members, cuts)):
                share.extend(part.tolist())
        if min(len(s) for s in shares) >= split.min_samples:
            return [torch.sort(torch.tensor(s, dtype=torch.long)).values for s in shares]
    raise ConfigError(f"split dirichlet alpha={split.dirichlet:g} left some client below min_samples="
                      f"{split.min_samples} in {attempts} draws; raise alpha or lower min_samples")


def hold_out(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` of the rows 0..n-1 drawn uniformly at random (a server's root set), and the rest, both sorted."""
    if not 0 < size < n:
        raise ConfigError(f"a root set of {size} samples does not fit a training set of {n}; pick a root_size "
                          f"between 1 and {n - 1}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.sort(order[:size]).values, torch.sort(order[size:]).values


__all__ = ["hold_out", "split_dirichlet", "split_iid"]
