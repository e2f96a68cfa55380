"""Label-smoothing poisoning, LSP (Li, Guo, Peng, Li and Wang, "LSP Framework: A Compensatory Model
for Defeating Trigger Reverse Engineering via Label Smoothing Poisoning", arXiv 2404.12852, 2024).

Trigger reverse engineering (Neural Cleanse and its successors) searches, for each class, the
smallest trigger that sends clean images there, and flags a class whose trigger is unusually
small. Its objective is a classification term plus a size (regularisation) term. LSP lowers the
backdoored model's confidence on triggered inputs, so the true trigger pays a larger
classification term and the search must grow it to compensate; the real trigger then no longer
stands out as small. The confidence is lowered by training the poisoned samples on smoothed
labels, and LSP is a wrapper: any trigger attack keeps its trigger, selection and hard target
labels, and only its poisoned samples' labels change.

The soft-label rule used here, for a poisoned sample whose wrapped attack gives label t among K
classes, is standard label smoothing with factor `smoothing` = s:

    y = (1 - s) * onehot(t) + s / K      (target mass 1 - s + s/K, every other class s/K),

and clean samples keep their one-hot labels (the whole label tensor becomes (N, K) floats, which
the trainer accepts), as do a wrapped attack's cover samples (adaptive_blend's, source_specific's):
they carry the trigger under their true label, and smoothing that would not lower the confidence
on triggered inputs. The target keeps the largest mass for any s < 1, so the triggered inputs
still go to the target. The paper computes the smallest sufficient smoothing from its
compensatory model, given the defender's regularisation weight; we could not reproduce that
bound without the defender's settings, so `smoothing` is a parameter, default 0.5 (target mass
0.55 with 10 classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from bdbench.attacks.base import ATTACKS, Attack, PoisonedTrainingSet, TriggeredTestSet
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.params import BelowOne
from bdbench.training import BatchHook


@ATTACKS.register("lsp")
class LabelSmoothingPoisoning(Attack):
    """Wraps any trigger attack: its poisoned samples train on smoothed soft labels, defeating trigger reverse-engineering (Li et al. 2024)."""

    citation = ("Li, Guo, Peng, Li, Wang. LSP Framework: A Compensatory Model for Defeating Trigger Reverse "
                "Engineering via Label Smoothing Poisoning. arXiv:2404.12852, 2024.")

    def __init__(self, attack: str = "badnets", attack_params: dict[str, Any] | None = None,
                 smoothing: BelowOne = 0.5) -> None:
        if attack == "lsp" or ATTACKS.is_reference(attack):
            raise ConfigError(f"lsp wraps a trigger attack; {attack!r} is not one (try badnets or blended)")
        self.inner: Attack = ATTACKS.build(attack, attack_params or {})
        super().__init__(self.inner.label_mode)
        self.smoothing = smoothing
        self.seeded_trigger = self.inner.seeded_trigger

    def check(self, dataset: Dataset, target_label: int) -> None:
        self.inner.check(dataset, target_label)

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        self.inner.prepare(dataset, target_label, workshop)

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.add_trigger(x)

    def poison(self, dataset: Dataset, poison_rate: float, target_label: int,
               generator: torch.Generator) -> PoisonedTrainingSet:
        hard = self.inner.poison(dataset, poison_rate, target_label, generator)
        k = dataset.num_classes
        soft = F.one_hot(hard.y, k).float()
        payload = hard.payload_mask  # a wrapped attack's cover samples keep their one-hot true labels
        soft[payload] = (1 - self.smoothing) * soft[payload] + self.smoothing / k
        return dataclasses.replace(hard, y=soft)

    def triggered_test_set(self, dataset: Dataset, target_label: int) -> TriggeredTestSet:
        return self.inner.triggered_test_set(dataset, target_label)

    def training_hook(self) -> BatchHook | None:
        return self.inner.training_hook()
