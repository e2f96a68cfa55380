"""The attack interface.

An attack turns a clean training set into a poisoned one and returns the ground-truth mask of
the samples it poisoned; it can put its trigger on any batch of test images. Attacks that must
learn something first (a generator, a perturbation) do it in `prepare`; attacks that must
control training return a `BatchHook` from `training_hook` (the trainer's one hook).

Per-batch attacks (WaNet's noise mode, BPP's negative samples, input-aware's generator) still
poison a fixed, seeded subset of training rows: `poison` picks them and returns them in the mask,
and the hook recognises them in each batch by their row numbers. Extra samples such attacks draw
per batch (noise, negative or cross-trigger samples, which keep their true labels) are not
poisoned samples: they change from batch to batch and carry no backdoor label.

An attack whose trigger is learned while the victim trains (`learns_with_victim`) hands what it
learned to the experiment through `victim_state`; the experiment stores it beside the victim, so
that a cached victim always comes back with the trigger it was trained against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.registry import Registry
from bdbench.training import BatchHook

LabelMode = Literal["all2one", "all2all"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 images, as a poisoned image file would store them."""
    return x.clamp(0, 1).mul(255.0).round().to(torch.uint8)


@dataclass(frozen=True, eq=False)
class PoisonedTrainingSet:
    """The training set the victim learns from, and which of its samples the attack touched.

    `poison_mask` holds every sample the attack changed. Attacks with cover samples (adaptive_blend,
    adaptive_patch, source_specific) also poison samples that keep their true label: a trigger (or part of one)
    under the true class, which teaches the model that the trigger alone does not mean the target. `cover_mask`
    marks those (None: the attack has none); the other poisoned samples are the payload (`payload_mask`), the
    ones that carry the backdoor. Only the runner reads the masks, to score defenses; no defense sees them.
    """

    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,), or float (N, K) label distributions for soft-label attacks (lsp)
    poison_mask: torch.Tensor  # bool (N,)
    cover_mask: torch.Tensor | None = None  # bool (N,), a subset of poison_mask; None where there are no covers

    def __post_init__(self) -> None:
        if self.cover_mask is not None and (self.cover_mask.shape != self.poison_mask.shape
                                            or bool((self.cover_mask & ~self.poison_mask).any())):
            raise ValueError("cover_mask must mark a subset of poison_mask's samples, with its shape")

    @property
    def payload_mask(self) -> torch.Tensor:
        """The poisoned samples that carry the backdoor: all of them, less the cover samples."""
        return self.poison_mask if self.cover_mask is None else self.poison_mask & ~self.cover_mask


@dataclass(frozen=True, eq=False)
class TriggeredTestSet:
    """Test images that carry the trigger, with their true labels and the labels the attacker wants."""

    x: torch.Tensor
    y_true: torch.Tensor
    y_target: torch.Tensor
    x_clean: torch.Tensor | None = None  # the same images without the trigger (PSNR/SSIM); None if unknown


class Attack(ABC):
    """Base class. Subclasses set `citation`, take their parameters (with the paper's defaults) in
    the constructor, and implement `add_trigger` on float batches in [0, 1]."""

    citation: ClassVar[str] = ""
    reference: ClassVar[bool] = False  # the no-attack entry: the clean reference and benign model
    label_modes: ClassVar[tuple[str, ...]] = ("all2one", "all2all")
    single_target_reason: ClassVar[str] = ""  # why an attack without all-to-all has one target
    learns_with_victim: ClassVar[bool] = False
    # Whether the test-time trigger depends on the experiment's seed (drawn or learned from it). False only where
    # the attack's parameters alone fix it, so that every seed shares one cached set of stealth metrics.
    seeded_trigger: bool = True

    def __init__(self, label_mode: LabelMode = "all2one") -> None:
        if label_mode not in self.label_modes:
            raise ConfigError(f"{type(self).__name__} supports label_mode {' or '.join(self.label_modes)} only, "
                              f"not {label_mode!r}: {self.single_target_reason}")
        self.label_mode = label_mode
        self.poison_mask: torch.Tensor | None = None  # set by `poison`, for per-batch training hooks

    def check(self, dataset: Dataset, target_label: int) -> None:
        """Refuse, cheaply and before any work, settings this data set cannot take (a trigger larger
        than its images, a class it does not have) with a one-line `ConfigError`. `prepare` runs it too."""

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        """Fix whatever depends on the data (image shape, learned triggers). Called once before use;
        anything learned here goes through `workshop.learned` so it is trained once and cached."""
        self.check(dataset, target_label)

    @abstractmethod
    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Put the trigger on float images (N, C, H, W) in [0, 1]."""

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Put the trigger on uint8 images, returning uint8 images (as a poisoned file would be)."""
        return to_uint8(self.add_trigger(x.float().div(255.0)))

    def target_labels(self, y: torch.Tensor, target_label: int, num_classes: int) -> torch.Tensor:
        if self.label_mode == "all2all":
            return (y + 1) % num_classes
        return torch.full_like(y, target_label)

    def select(self, y: torch.Tensor, poison_rate: float, target_label: int,
               generator: torch.Generator) -> torch.Tensor:
        """Indices to poison: `poison_rate` of the whole training set, drawn from samples whose
        label the attack changes (all samples for all-to-all, non-target ones for all-to-one)."""
        candidates = torch.arange(len(y)) if self.label_mode == "all2all" else torch.nonzero(y != target_label).flatten()
        count = min(len(candidates), int(round(poison_rate * len(y))))
        return candidates[torch.randperm(len(candidates), generator=generator)[:count]]

    def poison(self, dataset: Dataset, poison_rate: float, target_label: int,
               generator: torch.Generator) -> PoisonedTrainingSet:
        idx = self.select(dataset.y_train, poison_rate, target_label, generator)
        x, y = dataset.x_train.clone(), dataset.y_train.clone()
        x[idx] = self.poison_images(x[idx], idx)
        y[idx] = self.target_labels(y[idx], target_label, dataset.num_classes)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        self.poison_mask = mask
        return PoisonedTrainingSet(x, y, mask)

    def poison_images(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The poisoned versions of the uint8 training images `x` (training-set indices `idx`); by
        default the test-time trigger. Attacks that perturb training images differently from test
        images (label-consistent) override this."""
        return self.trigger(x)

    def triggered_test_set(self, dataset: Dataset, target_label: int) -> TriggeredTestSet:
        """Every test image whose label the attack would change, with the trigger on it."""
        y_target = self.target_labels(dataset.y_test, target_label, dataset.num_classes)
        keep = y_target != dataset.y_test
        clean = dataset.x_test[keep]
        return TriggeredTestSet(self.trigger(clean), dataset.y_test[keep], y_target[keep], x_clean=clean)

    def training_hook(self) -> BatchHook | None:
        """A hook for attacks that control training; none for pure data poisoning."""
        return None

    def victim_state(self) -> dict[str, torch.Tensor]:
        """What the attack learned while the victim trained (only where `learns_with_victim`)."""
        return {}

    def load_victim_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `victim_state` when the victim itself comes from the cache."""

    def after_training(self, poisoned: PoisonedTrainingSet) -> PoisonedTrainingSet:
        """The poisoned training set as a defender inspecting it finds it once the victim is trained:
        the same, except for attacks whose trigger was still being learned when `poison` ran."""
        return poisoned


# Every attack registers itself with `@ATTACKS.register("name")` on its class; `bdbench.attacks` imports them all.
ATTACKS: Registry[type[Attack]] = Registry("attack")


class CleanLabelAttack(Attack):
    """A clean-label attack: it poisons only training images of the target class and keeps their
    (correct) labels, so it has one target by nature and only the all-to-one mode."""

    label_modes = ("all2one",)
    single_target_reason = "a clean-label attack poisons target-class images under their own label"

    def select(self, y: torch.Tensor, poison_rate: float, target_label: int,
               generator: torch.Generator) -> torch.Tensor:
        """`poison_rate` of the whole training set, drawn from the target class only (all of it at most)."""
        candidates = torch.nonzero(y == target_label).flatten()
        count = min(len(candidates), int(round(poison_rate * len(y))))
        return candidates[torch.randperm(len(candidates), generator=generator)[:count]]


class PoisonedRows:
    """Which rows of a training batch are poisoned samples, looked up by their row numbers."""

    def __init__(self, poison_mask: torch.Tensor | None) -> None:
        if poison_mask is None:
            raise RuntimeError("poison() must run before training_hook()")
        self.poison_mask = poison_mask
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if index.device not in self._on_device:
            self._on_device[index.device] = self.poison_mask.to(index.device)
        return self._on_device[index.device][index]


def clean_rows(poisoned_rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random rows of a batch that are not poisoned samples (for the noise, negative or
    cross-trigger samples of per-batch attacks); fewer when the batch has fewer clean rows."""
    candidates = torch.nonzero(~poisoned_rows.cpu()).flatten()
    picked = candidates[torch.randperm(len(candidates), generator=generator)[:max(0, count)]]
    return picked.to(poisoned_rows.device)
