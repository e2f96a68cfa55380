"""Lockdown: isolated subspace training against federated backdoors (Huang, Hu, Chow, Ilhan, Tekin, Liu,
"Lockdown: Backdoor Defense for Federated Learning with Isolated Subspace Training", NeurIPS 2023).

Every client trains only the coordinates of its own sparse mask, and sends and receives only those:

1. masks start from an ERK density per layer (Evci et al.'s Erdos-Renyi-Kernel rule: a layer's density is
   proportional to sum(shape) / prod(shape), layers that would exceed density 1 are made dense and the rest
   rescaled so that the whole model keeps `density`);
2. each round a client starts from the global model restricted to its mask, regrows as many coordinates per
   layer as it pruned last round, picking the zero coordinates of largest accumulated gradient magnitude on its
   own data, trains with its gradients masked, then prunes ceil(ratio * nonzeros) coordinates per layer of
   smallest magnitude, with the cosine-decayed ratio alpha0 / 2 * (1 + cos(round * pi / rounds));
3. its upload is its masked update; the server averages the updates;
4. the evaluated model is fused by consensus: a parameter is kept only where at least `theta` clients' masks
   hold it, and set to zero elsewhere. This removes a backdoor only as far as it lives in coordinates that
   fewer than `theta` masks hold; every client starts from one mask and swaps ceil(ratio * nonzeros) coordinates
   a layer a round, so masks part slowly (the authors' ResNet9: 1.25% of a client's mask over 200 rounds), and
   what the attackers train on the shared coordinates reaches the fused model as under FedAvg (measured on
   small digits and mnist5k federations in docs/federated_lockdown.md: consensus dropped 1-2.5% of the
   attackers' coordinates and did not stop BadNets).

Reimplemented from the paper and the authors' code (git-disl/Lockdown, `src/agent_sparse.py`,
`src/federated.py`, `src/utils.py`), whose defaults these are: density 0.25, alpha0 (`anneal_factor`) 1e-4,
theta 20 for 40 clients, every client starting from the same ERK mask (`same_mask=1`). Where the code and
the paper differ, bdbench follows the code and says so:

- the code's `dense_ratio` is a density: 0.25 keeps 25% of the weights (75% sparsity); `density` here is the same;
- the code averages the masked updates weighted by each client's sample count, over all participating
  clients (a coordinate few masks hold is therefore shrunk, not averaged over its holders); `weighting` can
  make it uniform;
- the code fuses with the masks the clients held at the start of the round (the previous round's uploads);
  bdbench fuses with the masks of the current round's uploads, which is what a server holds once a round ends;
- the code regrows before training on the model it has already restricted to the old mask, so regrown
  coordinates start at zero and their update also carries minus the global value there; kept as in the code;
- the code masks every tensor of the state dict with ERK keeping BatchNorm statistics dense; bdbench models
  for federated runs have no running statistics, and fixed buffers (the input normalisation) are never sent.

Communication: a client receives and sends the values of its mask's coordinates only (4 bytes each); the
index set it holds is not counted, as in the paper's 0.25x figure (a bitmap would add 1 bit per parameter).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from bdbench.errors import ConfigError
from bdbench.federated.aggregation import SERVER_DEFENSES, RoundContext, ServerDefense, Weighting, weighted_mean
from bdbench.params import NonNegativeFloat, PositiveInt, UpToOne

Tensors = dict[str, torch.Tensor]


def erk_densities(shapes: dict[str, torch.Size], density: float) -> dict[str, float]:
    """Per-layer densities of the Erdos-Renyi-Kernel rule at overall `density` (the authors'
    `calculate_sparsities(distribution="ERK")`, as densities): raw_l = sum(shape_l) / prod(shape_l); find eps with
    sum_l eps * raw_l * n_l over sparse layers = density * (their size) - (1 - density) * (dense layers' size),
    making a layer dense while eps * raw_l exceeds 1."""
    dense: set[str] = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name in dense:
                rhs -= n * (1 - density)
            else:
                rhs += n * density
                raw[name] = sum(shape) / n
                divisor += raw[name] * n
        if not raw:
            return {name: 1.0 for name in shapes}
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps <= 1:
            return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
        dense.update(name for name, value in raw.items() if value == top)


def init_masks(shapes: dict[str, torch.Size], clients: int, density: float, generator: torch.Generator,
               rule: Literal["erk", "uniform"] = "erk", same: bool = True) -> Tensors:
    """Stacked 0/1 masks (clients, *shape) per parameter, int(density_l * n_l) ones at random positions per layer
    (`init_masks`); `same`: every client starts from one mask, as the code's default `same_mask=1`."""
    densities = erk_densities(shapes, density) if rule == "erk" else dict.fromkeys(shapes, density)
    masks: Tensors = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        keep = int(densities[name] * n)
        rows = []
        for _ in range(1 if same else clients):
            row = torch.zeros(n)
            row[torch.randperm(n, generator=generator)[:keep]] = 1.0
            rows.append(row)
        stacked = torch.stack(rows).view(len(rows), *shape)
        masks[name] = stacked.expand(clients, *shape).clone() if same else stacked
    return masks


def prune_ratio(round_: int, rounds: int, alpha0: float) -> float:
    """The share of each layer's kept weights pruned after local training in `round_` (1-based):
    alpha0 / 2 * (1 + cos(round * pi / rounds)) (`fire_mask`)."""
    return alpha0 / 2 * (1 + math.cos(round_ * math.pi / rounds))


def prune(masks: Tensors, params: Tensors, ratio: float) -> tuple[Tensors, dict[str, torch.Tensor]]:
    """Drop ceil(ratio * nonzeros) coordinates of smallest |weight| from each client's mask of each layer.
    `masks` and `params` are stacked (K, *shape); returns the new masks and the counts removed (K,) per layer."""
    new, removed = {}, {}
    for name, mask in masks.items():
        k = mask.shape[0]
        flat, weights = mask.reshape(k, -1).clone(), params[name].detach().reshape(k, -1).abs()
        counts = torch.ceil(ratio * flat.sum(1)).long()
        scores = torch.where(flat > 0, weights, torch.full_like(weights, math.inf))
        order = torch.argsort(scores, dim=1, stable=True)
        for client in range(k):
            flat[client, order[client, :int(counts[client])]] = 0.0
        new[name], removed[name] = flat.view_as(mask), counts
    return new, removed


def regrow(masks: Tensors, gradients: Tensors, counts: dict[str, torch.Tensor]) -> Tensors:
    """Add to each client's mask of each layer the `counts` zero coordinates of largest accumulated |gradient|
    (`update_mask`)."""
    new = {}
    for name, mask in masks.items():
        k = mask.shape[0]
        flat, grads = mask.reshape(k, -1).clone(), gradients[name].detach().reshape(k, -1).abs()
        scores = torch.where(flat > 0, torch.full_like(grads, -math.inf), grads)
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        for client in range(k):
            flat[client, order[client, :int(counts[name][client])]] = 1.0
        new[name] = flat.view_as(mask)
    return new


def consensus(params: Tensors, masks: Tensors, theta: int) -> Tensors:
    """Consensus fusion: each parameter kept where at least `theta` of the clients' masks (K, *shape) hold it,
    zero elsewhere."""
    return {name: torch.where(masks[name].sum(0) >= theta, value, torch.zeros_like(value))
            for name, value in params.items()}


@SERVER_DEFENSES.register("lockdown")
class Lockdown(ServerDefense):
    """Lockdown (Huang et al., NeurIPS 2023): isolated sparse client subspaces, fused by consensus.

    See the module's docstring for the protocol and where the authors' code and the paper differ; `weighting`
    `uniform` is the paper's 1/M average (its Algorithm 1, line 9), `samples` the code's."""

    citation = ("Huang, Hu, Chow, Ilhan, Tekin, Liu. Lockdown: Backdoor Defense for Federated Learning with "
                "Isolated Subspace Training. NeurIPS 2023.")
    sparse_clients = True

    def __init__(self, theta: PositiveInt = 20, density: UpToOne = 0.25, alpha0: NonNegativeFloat = 1e-4,
                 mask_init: Literal["erk", "uniform"] = "erk", same_init_mask: bool = True,
                 weighting: Weighting = "samples") -> None:
        self.theta, self.density, self.alpha0 = theta, density, alpha0
        self.mask_init, self.same_init_mask, self.weighting = mask_init, same_init_mask, weighting

    def check(self, clients: int, per_round: int) -> None:
        if self.theta > clients:
            raise ConfigError(f"lockdown theta={self.theta} is more masks than the federation's {clients} clients, "
                              "so consensus fusion would zero every weight; lower theta")

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, context: RoundContext) -> torch.Tensor:
        return weighted_mean(updates, sizes, self.weighting)


__all__ = ["Lockdown", "consensus", "erk_densities", "init_masks", "prune", "prune_ratio", "regrow"]
