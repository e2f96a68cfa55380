"""Pivotal Tuning (Lukas and Kerschbaum, "Pick your Poison: Undetectability versus Robustness in Data
Poisoning Attacks", arXiv 2305.09671, 2023), the paper's repair with a small trusted clean set (1% of
CIFAR-10's training data there).

The deployed model is the pivot: a frozen copy of it stays beside the model being tuned, and the tuning
on the clean budget minimises, per batch,

    cross-entropy(f(x), y)
    + param_lambda * mean over all weights of (theta - theta_pivot)^2
    + slol_lambda * SLOL(features of f, features of the pivot, y)

where the features are the penultimate representation (the classifier layer's input). SLOL, the soft
latent orthogonality loss ("feature grinding"), works on the batch's class centroids of those features:
(1) the Frobenius norm of the off-diagonal part of the centroids' (D x D) second-moment matrix, pushing the
feature dimensions apart, plus (2) the sum over pairs of classes of the cosine similarity between the
tuned model's centroid difference and the pivot's, pushing the directions between classes away from the
pivot's. A backdoor is a shortcut in the pivot's latent space from every class to the target; the
orthogonality term breaks that linear route while the parameter term keeps the tuned model close to the
pivot, so the few clean images cannot drag it far from where clean accuracy is.

Sources and choices. The paper's own text was not reachable where this was written; the algorithm and its
defaults are those of the authors' released implementation (the `PivotalTuning` defense and its
`ParameterLoss` and `SLOLLoss` criteria, shipped in the Universal Backdoor Attacks repository of
Schneider, Lukas and Kerschbaum): SGD with Nesterov momentum 0.9, no weight decay, lr 1e-4,
param_lambda 20,000, slol_lambda 0.05, ground-truth labels. Choices made here:
- Length: the reference runs 2,000 steps of its batch size; here `epochs` (default 40) passes over the
  clean budget at batch size 32, about 300 steps on `model-defenses`' 250-image budget, the same order as
  the other repairs' cost on this bench.
- Learning rate: the reference's 1e-4 suits the large pretrained models it repairs; a small model
  trained from scratch for a dozen epochs barely moves at that rate (measured on the digits BadNets
  model of the tests: 40 epochs at 1e-4 left the ASR at 0.99). `lr` defaults to 0.01, the `ft` recipe's
  rate, with a constant schedule as in the reference.
- SLOL's orthogonality term: the reference subtracts the diagonal by broadcasting a vector over the
  matrix; here the diagonal is zeroed, the off-diagonal norm its comment describes. Classes missing from
  a batch have no centroid and drop out of that batch's term.
- The reference stops early when the measured TEST accuracy falls below a floor (1% by default, so it
  never fires); a defender has no test data, so here the clean budget is the yardstick: when the tuned
  model's clean-budget accuracy falls more than `max_accuracy_drop` (0.1) below the pivot's, the run is
  repeated from the pivot at half the learning rate, at most `backoffs` (3) times.
Nothing is tuned on test data.

What it does at this bench's scale (measured, seed 0): on the `model-defenses` BadNets victim (10%) the
ASR goes from 1.00 to 0.93 at a 0.009 clean-accuracy cost, where `ft` leaves 1.00 (0.81 at 0.012 with the
seed of CTI's rows, whose repair this is); the clean victim loses 0.014 (`ft`: 0.015); on the digits
BadNets model of the tests the ASR stays at 0.98. A 10% BadNets is the robust, over-poisoned attack of the paper's
trade-off; the paper's claim (all tested attacks mitigated within a 2% accuracy drop with 1% clean data
on CIFAR-10) is for its own attacks and poison rates, not checked here. On `attacks-gtsrb`'s cnn-small
victims (43 classes, 5% budget) the SLOL's orthogonality term collapses the model at every learning rate down
to the reference's 1e-4 (clean accuracy 0.000-0.029; 0.964 with `slol_lambda` 0): its gradient at the pivot
is 720 times the cross-entropy's there against 17 times on `model-defenses`, the features being about four
times larger (docs/new_methods_gtsrb.md). The term is the reference's, kept as it is. Since revision 2 a
tuning that no halving keeps within `max_accuracy_drop` is declined (`DefenseContext.halve_until_within_budget`):
the deployed model is kept and the row says `repair_declined`, so on those victims PT leaves the backdoor in
place rather than handing over a model that answers nothing, and CTI, with no reference, is `not_applicable`.

Cost: 40 epochs of the 250-image `model-defenses` budget are 10,000 images forward and backward (and
forward through the pivot for SLOL), against the 60,000 forward and backward passes that train the
victim: four times `ft`'s 10 epochs, about a fifth of the victim.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.base import DEFENSES, BudgetedRepair, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import capture, classifier_layer
from bdbench.params import BatchSize, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, UnitInterval
from bdbench.training import LossFn


def parameter_distance(model: nn.Module, pivot: list[torch.Tensor]) -> torch.Tensor:
    """The mean, over every weight of `model`, of its squared difference from the pivot's (same order)."""
    params = list(model.parameters())
    total = sum(((p - q) ** 2).sum() for p, q in zip(params, pivot))
    return total / sum(p.numel() for p in params)  # type: ignore[return-value]


def class_centroids(features: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean feature vector (K', D) of each class present in `y`, and those classes (K',)."""
    classes = torch.unique(y)
    return torch.stack([features[y == c].mean(0) for c in classes]), classes


def soft_latent_orthogonality(features: torch.Tensor, pivot_features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SLOL on a batch: the off-diagonal Frobenius norm of the class centroids' second-moment matrix, plus the
    summed cosine similarity, over pairs of classes, between the tuned and the pivot's centroid differences."""
    centroids, _ = class_centroids(features.flatten(1), y)
    pivot_centroids, _ = class_centroids(pivot_features.flatten(1), y)
    moments = centroids.T @ centroids / len(centroids)
    orthogonality = (moments - torch.diag_embed(torch.diagonal(moments))).norm()
    differences = (centroids[:, None] - centroids[None]).flatten(0, 1)
    pivot_differences = (pivot_centroids[:, None] - pivot_centroids[None]).flatten(0, 1)
    similarity = F.cosine_similarity(differences, pivot_differences, dim=1).view(len(centroids), len(centroids))
    pairs = torch.triu(torch.ones_like(similarity, dtype=torch.bool), diagonal=1)
    return orthogonality + similarity[pairs].sum()


def pivotal_loss(pivot: nn.Module, param_lambda: float, slol_lambda: float) -> LossFn:
    """Cross-entropy plus the parameter and SLOL regularisers against the frozen `pivot`."""
    pivot_params = [p.detach() for p in pivot.parameters()]

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with capture(classifier_layer(model), "input") as seen:
            logits = model(x)
        loss = F.cross_entropy(logits, y) + param_lambda * parameter_distance(model, pivot_params)
        if slol_lambda:
            with torch.no_grad(), capture(classifier_layer(pivot), "input") as pivot_seen:
                pivot(x)
            loss = loss + slol_lambda * soft_latent_orthogonality(seen[-1], pivot_seen[-1], y)
        return loss

    return loss_fn


def pivotal_tuning(context: DefenseContext, *, epochs: int, lr: float, batch_size: int, param_lambda: float,
                   slol_lambda: float, max_accuracy_drop: float, backoffs: int) -> BudgetedRepair:
    """Tune a copy of the deployed model around it (the pivot) on the clean budget; the deployed model is untouched.
    Declined (the deployed model kept) when no learning rate keeps the clean-budget accuracy within the budget."""
    pivot = copy.deepcopy(context.model).to(context.device).requires_grad_(False).eval()
    loss_fn = pivotal_loss(pivot, param_lambda, slol_lambda)

    def tune(scale: float) -> nn.Module:
        config = context.train_config.model_copy(update={
            "epochs": epochs, "lr": lr * scale, "batch_size": batch_size, "schedule": "constant", "momentum": 0.9,
            "weight_decay": 0.0})
        return context.fit(copy.deepcopy(pivot).requires_grad_(True), context.clean_x, context.clean_y, config,
                           "pt", loss_fn=loss_fn)

    return context.halve_until_within_budget("pt", tune, max_accuracy_drop, backoffs)


@DEFENSES.register("pt")
class PivotalTuning(Defense):
    """Pivotal Tuning (Lukas and Kerschbaum 2023): fine-tune on the clean budget, held near the deployed model."""

    kind = DefenseKind.MODEL_REPAIR
    revision = 2  # 2: when no learning rate keeps the budget, the deployed model is kept (the repair declined)
    citation = ("Lukas, Kerschbaum. Pick your Poison: Undetectability versus Robustness in Data Poisoning Attacks. "
                "arXiv 2305.09671, 2023 (Pivotal Tuning).")

    def __init__(self, epochs: PositiveInt = 40, lr: PositiveFloat = 0.01, batch_size: BatchSize = 32,
                 param_lambda: NonNegativeFloat = 20_000.0, slol_lambda: NonNegativeFloat = 0.05,
                 max_accuracy_drop: UnitInterval = 0.1, backoffs: NonNegativeInt = 3) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.param_lambda, self.slol_lambda = param_lambda, slol_lambda
        self.max_accuracy_drop, self.backoffs = max_accuracy_drop, backoffs

    def tune(self, context: DefenseContext) -> BudgetedRepair:
        """The repair (also Calibrated Trigger Inversion's reference model)."""
        return pivotal_tuning(context, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                              param_lambda=self.param_lambda, slol_lambda=self.slol_lambda,
                              max_accuracy_drop=self.max_accuracy_drop, backoffs=self.backoffs)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        tuned = self.tune(context)
        return DefenseOutcome(model=tuned.model, repair_declined=tuned.declined)
