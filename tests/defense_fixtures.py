"""A poisoned digits model and the context a defender would get for it, shared by defense tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bdbench import metrics
from bdbench.attacks import ATTACKS, Attack, PoisonedTrainingSet, TriggeredTestSet
from bdbench.data import Dataset
from bdbench.defenses import DefenseContext
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, predict, train

from effects import test_seed

TRAINING = TrainConfig(epochs=10, batch_size=64)


@dataclass
class Poisoned:
    dataset: Dataset
    attack: Attack
    poisoned: PoisonedTrainingSet
    triggered: TriggeredTestSet
    model: torch.nn.Module
    architecture: str = "cnn-small"
    model_params: dict = field(default_factory=lambda: {"width": 16})

    def new_model(self) -> torch.nn.Module:
        net = create_model(self.architecture, 10, 1, self.dataset.image_size, **self.model_params)
        return with_normalization(net, self.dataset.mean, self.dataset.std)

    def scores(self, model: torch.nn.Module) -> tuple[float, float]:
        """`model`'s clean test accuracy and its attack success rate on this attack's triggered test set."""
        return (metrics.accuracy(predict(model, self.dataset.x_test), self.dataset.y_test),
                metrics.attack_success_rate(predict(model, self.triggered.x), self.triggered.y_target))

    def context(self, sees_training_set: bool) -> DefenseContext:
        budget = torch.randperm(len(self.dataset.y_train), generator=torch.Generator().manual_seed(1))[:150]
        return DefenseContext(
            model=self.model, clean_x=self.dataset.x_train[budget], clean_y=self.dataset.y_train[budget],
            num_classes=10, in_channels=1, image_size=self.dataset.image_size, crop_padding=1, allow_hflip=False,
            train_config=TRAINING, seed=0, device=torch.device("cpu"), new_model=self.new_model,
            train_x=self.poisoned.x if sees_training_set else None,
            train_y=self.poisoned.y if sees_training_set else None)


def poisoned_digits(dataset: Dataset, attack: str, params: dict, poison_rate: float,
                    architecture: str = "cnn-small", model_params: dict | None = None) -> Poisoned:
    """A model (default: cnn-small, width 16) trained on digits poisoned by `attack` (target class 0)."""
    chosen = ATTACKS.build(attack, params)
    chosen.prepare(dataset, 0, 0)
    poisoned = chosen.poison(dataset, poison_rate, 0, torch.Generator().manual_seed(test_seed()))
    result = Poisoned(dataset, chosen, poisoned, chosen.triggered_test_set(dataset, 0), None,  # type: ignore[arg-type]
                      architecture, {"width": 16} if model_params is None else model_params)
    torch.manual_seed(test_seed())
    result.model = train(result.new_model(), poisoned.x, poisoned.y, TRAINING, seed=test_seed(), crop_padding=1)
    return result
