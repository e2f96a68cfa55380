"""Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li and Ma, "Anti-Backdoor Learning: Training Clean
Models on Poisoned Data", NeurIPS 2021).

Backdoored samples are learned faster than clean ones. 1. Isolation: train a fresh model on the
poisoned set with local gradient ascent (loss flooding at gamma = 0.5: the batch loss is
sign(L - gamma) x L, so no batch is pushed below gamma) for `isolation_epochs` (paper: 20) at
lr 0.1, then isolate the `isolation_rate` (1%) of samples with the lowest loss. 2. Keep training
that model on the rest with cross-entropy for `tuning_epochs` (paper: 60). 3. Unlearning: gradient
ascent on the isolated samples (minimise -CE) for `unlearning_epochs` (20) at lr 5e-4, which
breaks the trigger-target link they share. Batch size and augmentation are the victim's; every
stage goes through the one trainer with its `loss_fn` hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.params import NonNegativeInt, OpenRate, PositiveInt
from bdbench.training import predict_logits


def flooded_loss(gamma: float):
    """Local gradient ascent: the batch cross-entropy, sign-flipped when it falls below gamma."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return torch.sign(loss - gamma) * loss

    return loss_fn


def ascent_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on cross-entropy: unlearn the labels of `x`."""
    return -F.cross_entropy(model(x), y)


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(predict_logits(model, x), y, reduction="none")


@DEFENSES.register("abl")
class AntiBackdoorLearning(Defense):
    """Anti-Backdoor Learning (Li et al. 2021): isolate the fastest-learned 1% by loss flooding, then unlearn them."""

    kind = DefenseKind.ROBUST_TRAINING
    needs_internals = False  # trains its own model from scratch
    citation = "Li, Lyu, Koren, Lyu, Li, Ma. Anti-Backdoor Learning: Training Clean Models on Poisoned Data. NeurIPS 2021."

    def __init__(self, isolation_epochs: PositiveInt = 20, tuning_epochs: NonNegativeInt = 60,
                 unlearning_epochs: PositiveInt = 20, isolation_rate: OpenRate = 0.01, gamma: float = 0.5,
                 lr: float = 0.1,
                 unlearning_lr: float = 5e-4) -> None:
        self.isolation_epochs, self.tuning_epochs, self.unlearning_epochs = isolation_epochs, tuning_epochs, unlearning_epochs
        self.isolation_rate = float(isolation_rate)
        self.gamma, self.lr, self.unlearning_lr = gamma, lr, unlearning_lr

    def isolate(self, context: DefenseContext) -> tuple[nn.Module, torch.Tensor]:
        """Stage 1: a fresh model trained with loss flooding, and the mask of the `isolation_rate` of
        training samples it fits best (lowest loss), the samples ABL takes for poisons."""
        x, y = context.training_set()
        model = context.new_model()
        isolation = context.train_config.model_copy(update={"epochs": self.isolation_epochs, "lr": self.lr,
                                                            "schedule": "constant"})
        context.fit(model, x, y, isolation, "abl_isolation", loss_fn=flooded_loss(self.gamma))
        count = max(1, int(round(self.isolation_rate * len(y))))
        isolated = torch.zeros(len(y), dtype=torch.bool)
        isolated[per_sample_loss(model, x, y).topk(count, largest=False).indices] = True
        return model, isolated

    def run(self, context: DefenseContext) -> DefenseOutcome:
        (x, y), base = context.training_set(), context.train_config
        model, isolated = self.isolate(context)
        if self.tuning_epochs:
            tuning = base.model_copy(update={"epochs": self.tuning_epochs, "schedule": "cosine", "lr": self.lr})
            context.fit(model, x[~isolated], y[~isolated], tuning, "abl_tuning")
        unlearning = base.model_copy(update={"epochs": self.unlearning_epochs, "lr": self.unlearning_lr,
                                             "schedule": "constant"})
        # As in the paper's code, unlearning runs in training mode, so BatchNorm statistics follow the
        # isolated batches too; on a small isolated set this costs clean accuracy (reported as measured).
        context.fit(model, x[isolated], y[isolated], unlearning, "abl_unlearning", loss_fn=ascent_loss)
        return DefenseOutcome(model=model)
