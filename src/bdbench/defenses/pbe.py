"""Progressive Backdoor Erasing (Mu, Niu, Wang, Wang, Miao, Jin and Hua, "Progressive Backdoor Erasing
via connecting Backdoor and Adversarial Attacks", CVPR 2023), in the setting with a clean budget.

The paper observes that the untargeted adversarial examples of a backdoored model behave like its
triggered images (they activate the same neurons and tend to land in the target class), so
fine-tuning the model to classify its own adversarial examples correctly erases the backdoor.
Algorithm 1 alternates (1) model purification: fine-tune on untargeted PGD adversarial examples of
the clean images with their true labels, (2) fine-tuning on the clean images themselves, to restore
clean accuracy, and (3) data purification: re-select clean images from the training set with the
purified model. With a clean budget, step 3 is dropped and steps 1 and 2 run once (the paper's AFT
setting; `rounds` repeats them).

Defaults are the authors' released code for this setting: 3 epochs of adversarial fine-tuning, then
17 of ordinary fine-tuning, one round; PGD on an L-infinity ball of eps 6/255 with 7 steps of eps/5
from the clean image (no random start), the model in eval mode while PGD runs and in training mode
for the update; SGD (momentum 0.9, weight decay 5e-4) at a constant lr of 0.001, batch size 128, with
the victim's augmentation (applied before the attack, as in the code). Each epoch goes through the
one trainer (`context.fit`), the adversarial ones with a `loss_fn` that builds the batch's
adversarial examples. The 16-defense study of Dunnett et al. (2024) instead alternates one
adversarial and one ordinary epoch for 20 rounds at lr 0.01 with eps 0.02 and a random start
(`rounds: 20, adversarial_epochs: 1, epochs: 1, lr: 0.01, eps: 0.02`; the random start is not offered).
Nothing is tuned on data and nothing needed scaling down for the CPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.adversarial import linf_pgd
from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.ft import fine_tune
from bdbench.params import BatchSize, NonNegativeInt, PositiveFloat, PositiveInt, UpToOne
from bdbench.training import LossFn


def adversarial_cross_entropy(eps: float, step_size: float, steps: int) -> LossFn:
    """Cross-entropy on untargeted PGD adversarial examples of the batch (from the images themselves,
    against their true labels), found with the model in eval mode; the model is left in training mode."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.eval()
        adversarial = linf_pgd(lambda z: F.cross_entropy(model(z), y), x, eps=eps, step_size=step_size, steps=steps)
        model.train()
        return F.cross_entropy(model(adversarial), y)

    return loss_fn


@DEFENSES.register("pbe")
class ProgressiveBackdoorErasing(Defense):
    """PBE with a clean budget (Mu et al. 2023): fine-tune on the model's adversarial examples, then on clean data."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Mu, Niu, Wang, Wang, Miao, Jin, Hua. Progressive Backdoor Erasing via connecting Backdoor and "
                "Adversarial Attacks. CVPR 2023.")

    def __init__(self, rounds: PositiveInt = 1, adversarial_epochs: PositiveInt = 3, epochs: NonNegativeInt = 17,
                 lr: PositiveFloat = 0.001, batch_size: BatchSize = 128, eps: UpToOne = 6 / 255,
                 steps: PositiveInt = 7, step_fraction: PositiveFloat = 0.2) -> None:
        self.rounds, self.adversarial_epochs, self.epochs, self.lr = rounds, adversarial_epochs, epochs, lr
        self.batch_size, self.eps, self.steps, self.step_fraction = batch_size, eps, steps, step_fraction

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model).to(context.device)
        settings: dict[str, Any] = {"lr": self.lr, "batch_size": self.batch_size, "schedule": "constant", "momentum": 0.9,
                    "weight_decay": 5e-4}
        loss_fn = adversarial_cross_entropy(self.eps, self.step_fraction * self.eps, self.steps)
        for round_ in range(self.rounds):
            model = fine_tune(context, model, context.clean_x, context.clean_y, epochs=self.adversarial_epochs,
                              purpose=f"pbe_adversarial_{round_}", loss_fn=loss_fn, **settings)
            if self.epochs:
                model = fine_tune(context, model, context.clean_x, context.clean_y, epochs=self.epochs,
                                  purpose=f"pbe_clean_{round_}", **settings)
        return DefenseOutcome(model=model.eval())
