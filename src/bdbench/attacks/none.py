"""No attack: the clean reference model of each cell, and the benign model that measures false positives."""

from __future__ import annotations

import torch

from bdbench.attacks.base import ATTACKS, Attack, PoisonedTrainingSet
from bdbench.data import Dataset


@ATTACKS.register("none")
class NoAttack(Attack):
    """No poisoning: trains the clean reference model (benign false positives, CA baseline)."""

    citation = ""
    reference = True

    def __init__(self) -> None:
        super().__init__("all2one")

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def poison(self, dataset: Dataset, poison_rate: float, target_label: int,
               generator: torch.Generator) -> PoisonedTrainingSet:
        return PoisonedTrainingSet(dataset.x_train, dataset.y_train,
                                   torch.zeros(len(dataset.y_train), dtype=torch.bool))
