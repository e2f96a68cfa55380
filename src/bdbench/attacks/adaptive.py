"""Adaptive-Blend and Adaptive-Patch: poisoning attacks built to defeat latent-separation defenses (Qi,
Xie, Li, Wang and Mittal, "Revisiting the Assumption of Latent Separability for Backdoor Defenses",
ICLR 2023; the authors' code: github.com/Unispac/Circumventing-Backdoor-Defenses, also in
github.com/vtu81/backdoor-toolbox).

Cleansers such as activation clustering, spectral signatures, SPECTRE, SCAn and Beatrix assume
that a backdoored model maps poisoned samples to a cluster of their own in its latent space. The
paper breaks that separation with two ingredients, both here:

- Regularization ("conservatism") samples: besides the payload samples (trigger, relabelled to the
  target), `cover_ratio` times as many training images carry a training-time trigger under their
  true label. The model cannot learn "any trace of the trigger means the target"; it learns a
  backdoor that only the full test-time trigger fires, and the poisoned samples' representations
  stay among their true classes'. Payload samples are drawn from non-target classes (as in
  `Attack.select`); cover samples from the remaining non-target images: the paper's regularization
  samples are "correctly labeled to their semantic classes (other than the target class)"; the
  authors' code draws them from every class.
- Asymmetric triggers: each training image carries only part of the trigger, or a weaker one,
  than the test images do, so that the test trigger is stronger than anything the model saw.

Both payload and cover samples carry a trigger, so both are in the poison mask, and the cover samples
also in the cover mask (`PoisonedTrainingSet.cover_mask`). The runner's `det_tpr` counts a cover
sample a cleanser flags as a true positive; its `det_payload_tpr` and `det_payload_fpr` are the paper's
elimination rate (payload samples flagged) and sacrifice rate (every other sample flagged, covers
included).

The paper's settings (CIFAR-10 and GTSRB; a ResNet-20 trained for 200 and 100 epochs in the
authors' code; rates from their README): a poison rate of 0.3% with 0.3% cover samples for
Adaptive-Blend (conservatism ratio 0.5), and 0.3% with 0.6% for Adaptive-Patch on CIFAR-10 (0.5% with
1% on GTSRB; ratio 2/3). Here the grid sets the poison rate and `cover_ratio` the cover samples per
payload sample (1 and 2), so that the paper's ratio holds at any poison rate.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Annotated, Sequence

import torch
from pydantic import Field

from bdbench.attacks.base import ATTACKS, Attack, LabelMode, PoisonedTrainingSet, to_uint8
from bdbench.attacks.blended import blend_pattern
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.params import NonNegativeFloat, PositiveInt, UpToOne

_CITATION = ("Qi, Xie, Li, Wang, Mittal. Revisiting the Assumption of Latent Separability for Backdoor Defenses. "
             "ICLR 2023.")


class CoverSampleAttack(Attack):
    """An adaptive attack: payload samples with a training-time trigger relabelled to the target, and
    `cover_ratio` times as many cover samples with a training-time trigger under their true labels.
    Subclasses draw the training-time trigger (`training_trigger`) and the test-time one (`add_trigger`)."""

    citation = _CITATION
    label_modes = ("all2one",)
    single_target_reason = "the adaptive attacks relabel their payload samples to one target class"
    seeded_trigger = False  # pattern_seed fixes the test-time trigger; the experiment's seed only picks the pieces

    def __init__(self, cover_ratio: NonNegativeFloat, label_mode: LabelMode) -> None:
        super().__init__(label_mode)
        self.cover_ratio = cover_ratio

    @abstractmethod
    def training_trigger(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Put a training-time (partial or weaker) trigger on float images (N, C, H, W) in [0, 1]."""

    def poison(self, dataset: Dataset, poison_rate: float, target_label: int,
               generator: torch.Generator) -> PoisonedTrainingSet:
        """`poison_rate` of the training set as payload samples (non-target images relabelled to the
        target) and `cover_ratio` times as many cover samples (other non-target images, true labels),
        all with the training-time trigger."""
        y0 = dataset.y_train
        payload = self.select(y0, poison_rate, target_label, generator)
        free = y0 != target_label
        free[payload] = False
        candidates = torch.nonzero(free).flatten()
        count = min(len(candidates), round(self.cover_ratio * len(payload)))
        covers = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        rows = torch.cat([payload, covers])
        x, y = dataset.x_train.clone(), y0.clone()
        x[rows] = to_uint8(self.training_trigger(x[rows].float().div(255.0), generator))
        y[payload] = target_label
        mask, cover = torch.zeros(len(y), dtype=torch.bool), torch.zeros(len(y), dtype=torch.bool)
        mask[rows] = True
        cover[covers] = True
        return PoisonedTrainingSet(x, y, mask, cover_mask=cover)


def piece_masks(count: int, size: int, grid: int, kept: int, generator: torch.Generator) -> torch.Tensor:
    """`count` masks (count, 1, size, size) in {0, 1}, each covering `kept` random cells of a grid x grid
    division of the image (cells differ by at most one pixel where `grid` does not divide `size`)."""
    order = torch.rand(count, grid * grid, generator=generator).argsort(1)
    cells = torch.zeros(count, grid * grid).scatter_(1, order[:, :kept], 1.0).view(count, grid, grid)
    sides = torch.linspace(0, size, grid + 1).round().long().diff()
    return cells.repeat_interleave(sides, 1).repeat_interleave(sides, 2).unsqueeze(1)


@ATTACKS.register("adaptive_blend")
class AdaptiveBlend(CoverSampleAttack):
    """Adaptive-Blend (Qi et al. 2023): a blend pattern cut into a grid of pieces; each training image
    carries a random half of them at a low alpha, test images the whole pattern at a higher one.

    The pattern is divided into `pieces` cells (a square number: 16, a 4x4 grid, as in the authors' code);
    every payload and cover image gets its own random `piece_share` of them (0.5: 8 of 16) blended at
    `alpha`: x' = x + alpha m (p - x). Test images get the full pattern at `test_alpha`. Training alpha
    0.15 and test alpha 0.2 are the authors' README's CIFAR-10 and GTSRB commands (-alpha 0.15
    -test_alpha 0.2; their first repository's README runs 0.2 for both).

    Where this differs from the authors: their pattern is the Hello Kitty image; here it is Blended's
    fixed-seed uniform noise (`pattern_seed`), so that `blended` and `adaptive_blend` with one seed share a
    pattern and test-time trigger (both at alpha 0.2) and differ only in how they poison. The authors
    require the grid to divide the image; here the cells of a 28x28 image are 7x7, and any size works
    (cells differ by a pixel where the grid does not divide it).
    """

    def __init__(self, alpha: UpToOne = 0.15, test_alpha: UpToOne = 0.2, pieces: PositiveInt = 16,
                 piece_share: UpToOne = 0.5, cover_ratio: NonNegativeFloat = 1.0, pattern_seed: int = 0,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(cover_ratio, label_mode)
        self.grid = math.isqrt(pieces)
        if self.grid * self.grid != pieces:
            raise ConfigError(f"adaptive_blend pieces {pieces} is not a square number; use a grid's cell count "
                              f"such as {self.grid ** 2} or {(self.grid + 1) ** 2}")
        self.kept = round(piece_share * pieces)
        if self.kept == 0:
            raise ConfigError(f"adaptive_blend piece_share {piece_share} of {pieces} pieces keeps none; "
                              f"use a piece_share of at least {1 / pieces:.3g}")
        self.alpha, self.test_alpha, self.pieces, self.pattern_seed = alpha, test_alpha, pieces, pattern_seed
        self.pattern: torch.Tensor | None = None

    def check(self, dataset: Dataset, target_label: int) -> None:
        if self.grid > dataset.image_size:
            raise ConfigError(f"adaptive_blend pieces {self.pieces} make a {self.grid}x{self.grid} grid finer than "
                              f"the {dataset.image_size}x{dataset.image_size} images; use at most "
                              f"{dataset.image_size ** 2} pieces")

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        self.check(dataset, target_label)
        self.pattern = blend_pattern(dataset, self.pattern_seed)

    def _pattern(self) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("AdaptiveBlend.prepare() must run before its triggers are used")
        return self.pattern

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.test_alpha * (self._pattern().to(x) - x)

    def training_trigger(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        masks = piece_masks(len(x), x.shape[-1], self.grid, self.kept, generator).to(x)
        return x + self.alpha * masks * (self._pattern().to(x) - x)


# The authors' four CIFAR-10/GTSRB training patches, as (top, left, side) on a 32x32 image: a 5x5 logo in the
# bottom-right corner, a 13x13 logo near the top-right corner, a 3x3 checker in each of the four corners, and
# an 8x8 square towards the bottom right. Other image sizes scale them (a side of at least one pixel).
_PATCHES_32 = ((27, 27, 5), (1, 18, 13), None, (21, 21, 8))
_CORNERS_SIDE_32 = 3


def _scaled(value: int, size: int) -> int:
    return round(value * size / 32)


def patch_triggers(channels: int, size: int, pattern_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four patch triggers for (channels, size, size) images: marks (4, C, S, S) in [0, 1] and
    masks (4, 1, S, S) in {0, 1}. The logos and the square are uniform noise from `pattern_seed`; the
    corner checkers are white on black."""
    generator = torch.Generator().manual_seed(pattern_seed)
    marks, masks = torch.zeros(4, channels, size, size), torch.zeros(4, 1, size, size)
    for k, window in enumerate(_PATCHES_32):
        if window is None:
            s = max(1, _scaled(_CORNERS_SIDE_32, size))
            checker = ((torch.arange(s).view(-1, 1) + torch.arange(s)) % 2 == 0).float()
            for top in (0, size - s):
                for left in (0, size - s):
                    marks[k, :, top:top + s, left:left + s] = checker
                    masks[k, :, top:top + s, left:left + s] = 1.0
            continue
        s = max(1, _scaled(window[2], size))
        top, left = (min(_scaled(v, size), size - s) for v in window[:2])
        marks[k, :, top:top + s, left:left + s] = torch.rand(channels, s, s, generator=generator)
        masks[k, :, top:top + s, left:left + s] = 1.0
    return marks, masks


@ATTACKS.register("adaptive_patch")
class AdaptivePatch(CoverSampleAttack):
    """Adaptive-Patch (Qi et al. 2023): four patch triggers; each training image carries one of them,
    half-transparent, test images a combination of them opaque.

    Training: payload and cover images are split evenly and at random among the four patches, each
    stamped as x' = x + a m (p - x) at its own opacity `alphas` (0.5, 0.2, 0.5, 0.3: the authors' config
    for CIFAR-10 and GTSRB). Test: the patches `test_patches` stamped one after another at `test_alpha`
    (1.0). The authors' CIFAR-10 test trigger is the first patch (with a mirrored copy in the
    bottom-left corner, which is not here) and the corner checkers, (0, 2), the default; their GTSRB
    one is the second and fourth patches, `test_patches: [1, 3]`.

    Where this differs from the authors: their patches are images (a phoenix logo, a Firefox logo, a
    BadNets-style corner checker, a Trojan square); here the same shapes at the same places are uniform
    noise drawn from `pattern_seed`, except the corner checkers, which are white on black as theirs.
    The paper's text speaks of a random subset of triggers per image; the authors' code stamps exactly
    one per training image, which this follows. On other image sizes (28x28 digits) the windows scale
    with the image (there the square is 7x7, the logos 4x4 and 11x11); a grayscale image takes one
    channel of noise. On mnist5k (cnn-small, 5 epochs, 10% payload) the default test trigger reaches an
    ASR of 0.28 and all four patches opaque 0.90 on the same victim, so the data-defenses grid tests
    with all four.
    """

    def __init__(self, alphas: Annotated[Sequence[UpToOne], Field(min_length=4, max_length=4)] = (0.5, 0.2, 0.5, 0.3),
                 test_patches: Annotated[Sequence[int], Field(min_length=1)] = (0, 2), test_alpha: UpToOne = 1.0,
                 cover_ratio: NonNegativeFloat = 2.0, pattern_seed: int = 0,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(cover_ratio, label_mode)
        picked = [int(k) for k in test_patches]
        if any(not 0 <= k < 4 for k in picked) or len(set(picked)) != len(picked):
            raise ConfigError(f"adaptive_patch test_patches {picked} must name distinct patches among 0..3")
        self.alphas = torch.tensor([float(a) for a in alphas])
        self.test_patches, self.test_alpha, self.pattern_seed = picked, test_alpha, pattern_seed
        self.marks: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        self.check(dataset, target_label)
        self.marks, self.masks = patch_triggers(dataset.in_channels, dataset.image_size, self.pattern_seed)

    def _patches(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.marks is None or self.masks is None:
            raise RuntimeError("AdaptivePatch.prepare() must run before its triggers are used")
        return self.marks, self.masks

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        marks, masks = self._patches()
        for k in self.test_patches:
            x = x + self.test_alpha * masks[k].to(x) * (marks[k].to(x) - x)
        return x

    def training_trigger(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        marks, masks = self._patches()
        which = torch.randperm(len(x), generator=generator) % len(marks)
        opacity = self.alphas[which].view(-1, 1, 1, 1).to(x)
        return x + opacity * masks[which].to(x) * (marks[which].to(x) - x)
