"""The defense interface: kinds, what a defender may see (`DefenseContext`), and what it returns
(`DefenseOutcome`). The runner, never the defense, scores an outcome against ground truth.

Defenses follow scikit-learn's estimator habits: parameters with the paper's defaults in the
constructor and no work there, one verb (`run`), results in a small object.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Callable, ClassVar, Protocol

import torch
from torch import nn

from bdbench.registry import Registry
from bdbench.seeding import derive_seed
from bdbench.training import LossFn, TrainConfig, cross_entropy, predict, train

log = logging.getLogger(__name__)


class DefenseKind(str, Enum):
    """TrojanZoo's families, plus robust training and the no-defense reference."""

    NONE = "none"
    MODEL_REPAIR = "model_repair"
    MODEL_DETECTION = "model_detection"
    DATA_DETECTION = "training_data_detection"
    INPUT_DETECTION = "input_detection"
    ROBUST_TRAINING = "robust_training"


# Kinds that inspect the training set the defender was handed (poison labels never included).
SEES_TRAINING_SET = (DefenseKind.DATA_DETECTION, DefenseKind.ROBUST_TRAINING)


@dataclass(frozen=True, eq=False)
class DefenseContext:
    """Everything a defender is allowed to have, and nothing else: no test data, no poison mask, no ASR.

    `model` is a private copy of the deployed model. `clean_x`/`clean_y` are the defender's clean
    budget (uint8 images and true labels). `train_x`/`train_y` are the training set as handed
    over, with the attacker's labels, and are present only for kinds that inspect training data.
    `new_model` builds an untrained network of the victim's architecture.
    """

    model: nn.Module
    clean_x: torch.Tensor
    clean_y: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    crop_padding: int
    allow_hflip: bool
    train_config: TrainConfig
    seed: int
    device: torch.device
    new_model: Callable[[], nn.Module]
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training set as handed over (images, the attacker's labels), which only the kinds in
        `SEES_TRAINING_SET` get; asking for it in another kind's context is a bug in that defense."""
        if self.train_x is None or self.train_y is None:
            raise RuntimeError("this context holds no training set: only data-detection and robust-training "
                               "defenses are handed one")
        return self.train_x, self.train_y

    def generator(self, purpose: str) -> torch.Generator:
        """A generator for one named random choice, derived from the experiment's seed."""
        return torch.Generator().manual_seed(derive_seed(self.seed, purpose))

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
            purpose: str = "fit", loss_fn: LossFn = cross_entropy) -> nn.Module:
        """Train with the one trainer, this data set's augmentation facts and a seed for `purpose`."""
        return train(model, x, y, config, seed=derive_seed(self.seed, purpose), crop_padding=self.crop_padding,
                     hflip=self.allow_hflip, device=self.device, loss_fn=loss_fn)

    def budget_accuracy(self, model: nn.Module) -> float:
        """`model`'s accuracy on the clean budget: the one yardstick a defender has for what a repair costs."""
        return float((predict(model, self.clean_x, device=self.device) == self.clean_y).double().mean())

    def halve_until_within_budget(self, name: str, repair: Callable[[float], nn.Module], max_accuracy_drop: float,
                                  backoffs: int) -> BudgetedRepair:
        """Run `repair(scale)` at scale 1, 1/2, 1/4, ... (at most `backoffs` halvings; `scale` multiplies the
        repair's step size or loss weight, as the `name`d defense says) and keep the first model whose
        clean-budget accuracy is within `max_accuracy_drop` of the deployed model's.

        When no attempt is, the repair is declined: a defender whose only yardstick is the clean budget
        would not ship a model that fails it, so the deployed model is kept (a copy) and the outcome says
        so (`repair_declined`), rather than handing over the last, broken attempt."""
        deployed = self.budget_accuracy(self.model)
        floor = deployed - max_accuracy_drop
        for attempt in range(backoffs + 1):
            scale = 0.5 ** attempt
            model = repair(scale)
            accuracy = self.budget_accuracy(model)
            if accuracy >= floor:
                log.info("%s: kept the attempt at scale %g (clean-budget accuracy %.3f)", name, scale, accuracy)
                return BudgetedRepair(model, declined=False)
            log.info("%s: scale %g gives clean-budget accuracy %.3f, below the floor %.3f", name, scale, accuracy,
                     floor)
        log.warning("%s: no attempt (%d, the last at scale %g) kept the clean-budget accuracy within %g of the "
                    "deployed model's %.3f; the repair is declined and the deployed model kept", name, backoffs + 1,
                    scale, max_accuracy_drop, deployed)
        return BudgetedRepair(copy.deepcopy(self.model), declined=True)


@dataclass(frozen=True)
class BudgetedRepair:
    """What `DefenseContext.halve_until_within_budget` kept: the `model`, and whether every attempt failed the
    budget, so that it is the deployed model (`declined`). The kept scale and accuracy are logged there."""

    model: nn.Module
    declined: bool


class InputDetector(Protocol):
    """A run-time filter: suspicion scores (higher = more likely triggered) and a flag per image."""

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


@dataclass
class DefenseOutcome:
    """What a defense returns; any field it does not produce stays None.

    - `model`: a repaired (or robustly trained) model, measured in place of the deployed one.
    - `detected`, `anomaly_index`, `suspected_targets`: a model-level verdict.
    - `sample_scores`, `flagged`: per training sample suspicion (higher = more suspicious) and the
      samples to remove; the runner retrains on the kept ones.
    - `input_detector`: a run-time filter, which the runner applies to clean and triggered test images.
    - `threshold`: the score above which a detector flags (set on the defender's own data), where it
      has one threshold; reported as `det_threshold`.
    - `class_statistics`: the per-class statistic behind a class-level verdict (Neural Cleanse's mask norms,
      MM-BD's maximum margins, SCAn's J*), and `pictures`: images for a person to look at (each label's reversed
      trigger), name -> (C, H, W) in [0, 1]. Neither is scored; `bdbench scan` shows them.
    - `repair_declined`: a repair bound by an accuracy budget (`DefenseContext.halve_until_within_budget`)
      found no attempt within it and kept the deployed model (True), or kept an attempt (False).
    """

    model: nn.Module | None = None
    detected: bool | None = None
    anomaly_index: float | None = None
    suspected_targets: tuple[int, ...] | None = None
    sample_scores: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    input_detector: InputDetector | None = None
    threshold: float | None = None
    class_statistics: torch.Tensor | None = None
    pictures: dict[str, torch.Tensor] | None = None
    repair_declined: bool | None = None

    def class_statistics_list(self) -> list[float] | None:
        """`class_statistics` as plain floats, one per class (as rows and scan reports store them)."""
        if self.class_statistics is None:
            return None
        return [float(v) for v in self.class_statistics.flatten().tolist()]


class Defense(ABC):
    """Base class. Subclasses set `kind` and `citation` and implement `run`."""

    kind: ClassVar[DefenseKind]
    citation: ClassVar[str] = ""
    reference: ClassVar[bool] = False  # the no-defense entry: the undefended row DER compares against
    # True where the defense differentiates through the model, trains it or reads its layers; the
    # runner then checks that the deployed model passes input gradients and, where it does not
    # (int8 kernels), hands over its straight-through twin. False: only queries predictions.
    needs_internals: ClassVar[bool] = True

    @abstractmethod
    def run(self, context: DefenseContext) -> DefenseOutcome:
        """Defend using only what `context` holds."""

    def detect(self, context: DefenseContext) -> DefenseOutcome:
        """The model-level verdict alone, for an audit (`bdbench scan`): a detector that also repairs skips the
        repair here. Defaults to `run`."""
        return self.run(context)

# Every defense registers itself with `@DEFENSES.register("name")` on its class; `bdbench.defenses` imports them all.
DEFENSES: Registry[type[Defense]] = Registry("defense")
