"""Fine-tuning on the defender's clean budget, the baseline repair that every defense study
includes (used as such by Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018, and by BackdoorBench, Wu et al.,
NeurIPS 2022 Datasets and Benchmarks).

Defaults: 10 epochs of SGD at lr 0.01 with a cosine schedule and batch size 32 (a clean budget
is small, so small batches give it enough steps), with the victim's augmentation. Nothing is tuned: the settings are fixed before seeing data.
"""

from __future__ import annotations

import copy

from bdbench.defenses.base import Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.errors import ConfigError


class FineTuning(Defense):
    """Fine-tune the whole deployed model on the clean budget (the standard repair baseline)."""

    kind = DefenseKind.MODEL_REPAIR
    citation = "Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks. RAID 2018 (fine-tuning baseline)."

    def __init__(self, epochs: int = 10, lr: float = 0.01, batch_size: int = 32) -> None:
        if epochs < 1 or lr <= 0:
            raise ConfigError(f"ft needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def run(self, context: DefenseContext) -> DefenseOutcome:
        config = context.train_config.model_copy(update={
            "epochs": self.epochs, "lr": self.lr, "schedule": "cosine",
            "batch_size": self.batch_size,
        })
        model = copy.deepcopy(context.model)
        return DefenseOutcome(model=context.fit(model, context.clean_x, context.clean_y, config, "ft"))
