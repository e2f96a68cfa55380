"""Fine-tuning on the defender's clean budget, the baseline repair that every defense study
includes (used as such by Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018, and by BackdoorBench, Wu et al.,
NeurIPS 2022 Datasets and Benchmarks).

Defaults: 10 epochs of SGD at lr 0.01 with a cosine schedule and batch size 32 (a clean budget
is small, so small batches give it enough steps), with the victim's augmentation. Nothing is tuned: the settings are fixed before seeing data.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.params import PositiveFloat, PositiveInt
from bdbench.training import LossFn, cross_entropy


def fine_tune(context: DefenseContext, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
              lr: float, batch_size: int, purpose: str, loss_fn: LossFn = cross_entropy,
              **settings: object) -> nn.Module:
    """Fine-tune `model` in place on (x, y) with the victim's training settings, SGD at `lr` on a cosine
    schedule: the recipe of `ft`, shared by the defenses that fine-tune (Fine-Pruning, Neural Cleanse's
    unlearning, FST, FT-SAM, NPD, PBE). `loss_fn` is the objective; `settings` override further
    `TrainConfig` fields (momentum, weight decay, schedule, augmentation)."""
    config = context.train_config.model_copy(update={
        "epochs": epochs, "lr": lr, "schedule": "cosine", "batch_size": batch_size, **settings,
    })
    return context.fit(model, x, y, config, purpose, loss_fn=loss_fn)


@DEFENSES.register("ft")
class FineTuning(Defense):
    """Fine-tune the whole deployed model on the clean budget (the standard repair baseline)."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks. "
                "RAID 2018 (fine-tuning baseline).")

    def __init__(self, epochs: PositiveInt = 10, lr: PositiveFloat = 0.01, batch_size: PositiveInt = 32) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model)
        return DefenseOutcome(model=fine_tune(context, model, context.clean_x, context.clean_y, epochs=self.epochs,
                                              lr=self.lr, batch_size=self.batch_size, purpose="ft"))
