"""Progressive Backdoor Erasing (Mu, Niu, Wang, Wang, Miao, Jin and Hua, "Progressive Backdoor Erasing
via connecting Backdoor and Adversarial Attacks", CVPR 2023), in the setting with a clean budget.

The paper observes that the untargeted adversarial examples of a backdoored model behave like its
triggered images (they activate the same neurons and tend to land in the target class), so
fine-tuning the model to classify its own adversarial examples correctly erases the backdoor.
Algorithm 1 alternates (1) model purification: fine-tune on untargeted PGD adversarial examples of
the clean images with their true labels, (2) fine-tuning on the clean images themselves, to restore
clean accuracy, and (3) data purification: re-select clean images from the training set with the
purified model. With a clean budget, the initialisation (a random pick from the training set) and step 3
are dropped and steps 1 and 2 run once on the known clean images (the paper's AFT setting, as the
authors' README states it; `rounds` repeats them).

Defaults are the authors' released code for this setting (`aft_main.py`, `aft_train.py` and `config.py`
of github.com/John-niu-07/BPE, the same files as Syyabb/BPE): 20 epochs with one SGD optimiser, the first 3
on adversarial examples only (no clean term in the loss) and the other 17 on the clean images; PGD on an
L-infinity ball of eps 6/255 with 7 signed steps of eps/5 that ascend the cross-entropy of the true label
from the clean image (no random start), the model in eval mode while PGD runs and in training mode for
the update; SGD (momentum 0.9, weight decay 5e-4) at lr 0.001, never decayed (their MultiStepLR is built
but never stepped), batch size 128, with the victim's augmentation applied before the attack, as in the
code. All epochs are one run of the one trainer (`context.fit`), so that, as there, one optimiser and its
momentum carry from the adversarial epochs into the ordinary ones; the `loss_fn` builds the batch's
adversarial examples during each round's first `adversarial_epochs` epochs and is plain cross-entropy after.

Where ours differs from that code, on purpose:
- The clean budget is the grid's (`context.clean_x`); `aft_main.py` fine-tunes on the whole clean
  training set (50,000 CIFAR-10 images), which no defender of this benchmark is given.
- PGD keeps its images in [0, 1] (the shared `linf_pgd`); the authors' projection has that clamp commented
  out, so their examples may leave [0, 1] by up to eps.
- The one trainer is shared by every defense: its SGD uses Nesterov momentum (theirs plain momentum) and
  drops the ragged last batch of each epoch (theirs keeps it); on CUDA it runs under bfloat16 autocast,
  PGD's gradients included. Changing that trainer would change every defense and every cached victim.
The 16-defense study of Dunnett et al. (2024; github.com/WhoDunnett/BackdoorBenchmark, defense/pbe.py)
instead alternates one adversarial and one ordinary epoch for 20 rounds at lr 0.01, batch 256, eps 0.02
(`rounds: 20, adversarial_epochs: 1, epochs: 1, lr: 0.01, batch_size: 256, eps: 0.02`); what that cannot
reproduce here: their PGD starts at a random point of the ball and mostly runs with the model in training
mode (where their updates leave it), and their optimiser is rebuilt for every adversarial batch and every
ordinary epoch.
Nothing is tuned on data and nothing needed scaling down for the CPU.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.adversarial import linf_pgd
from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.ft import fine_tune
from bdbench.params import BatchSize, NonNegativeInt, PositiveFloat, PositiveInt, UpToOne
from bdbench.training import LossFn, cross_entropy, steps_per_epoch


def adversarial_cross_entropy(eps: float, step_size: float, steps: int) -> LossFn:
    """Cross-entropy on untargeted PGD adversarial examples of the batch (from the images themselves,
    against their true labels), found with the model in eval mode; the model is left in training mode."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.eval()
        adversarial = linf_pgd(lambda z: F.cross_entropy(model(z), y), x, eps=eps, step_size=step_size, steps=steps)
        model.train()
        return F.cross_entropy(model(adversarial), y)

    return loss_fn


def by_epoch(first: LossFn, second: LossFn, first_epochs: int, cycle_epochs: int, per_epoch: int) -> LossFn:
    """A loss for one run of the trainer that takes `per_epoch` steps an epoch: `first` in the first
    `first_epochs` epochs of every `cycle_epochs`, `second` in the rest (it counts the trainer's steps)."""
    calls = itertools.count()

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        epoch = next(calls) // per_epoch
        return (first if epoch % cycle_epochs < first_epochs else second)(model, x, y)

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
        settings: dict[str, Any] = {"lr": self.lr, "batch_size": self.batch_size, "schedule": "constant",
                                    "momentum": 0.9, "weight_decay": 5e-4}
        cycle = self.adversarial_epochs + self.epochs
        loss_fn = by_epoch(adversarial_cross_entropy(self.eps, self.step_fraction * self.eps, self.steps),
                           cross_entropy, self.adversarial_epochs, cycle,
                           steps_per_epoch(len(context.clean_x), self.batch_size))
        model = fine_tune(context, model, context.clean_x, context.clean_y, epochs=self.rounds * cycle, purpose="pbe",
                          loss_fn=loss_fn, **settings)
        return DefenseOutcome(model=model.eval())
