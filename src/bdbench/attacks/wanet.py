"""WaNet: an imperceptible warping of the whole image as the trigger (Nguyen and Tran, "WaNet --
Imperceptible Warping-based Backdoor Attack", ICLR 2021).

The trigger is one fixed, smooth warping field: a k x k grid of random offsets in [-1, 1],
normalised to mean magnitude 1, upsampled bicubically to the image size and scaled by s / H, so
that the strength means the same at every resolution (paper: k=4, s=0.5, grid_rescale=1).

Noise mode (the paper's defence against trigger reverse-engineering): in every batch,
`cross_ratio` times as many rows as the batch holds poisoned samples are warped with the trigger
field plus independent random per-pixel noise (uniform in [-1, 1] / H) and keep their true
labels, so that the network learns the exact field and not "any warp".

What "poisoned samples" means here: the paper warps a fresh `poison_rate` share of every batch.
bdbench fixes a seeded subset of `poison_rate` of the training rows instead (as the base
`select` picks them); those rows are stored warped (uint8, as a poisoned file would be) with the
target label, so the ground-truth mask and what a data-inspecting defense sees are the samples
the victim learns the backdoor from. The warp is therefore applied before the trainer's
augmentation (a shifted crop of the warped image), where the paper warps the augmented batch.
The noise samples are drawn per batch by the training hook from the other rows; they are not in
the mask (they change every batch and keep their labels).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from bdbench.attacks.base import ATTACKS, Attack, LabelMode, PoisonedRows, clean_rows
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.params import NonNegativeFloat, PositiveFloat
from bdbench.training import BatchHook


@ATTACKS.register("wanet")
class WaNet(Attack):
    """Warping-field trigger with noise mode during training (Nguyen and Tran, ICLR 2021)."""

    citation = "Nguyen, Tran. WaNet - Imperceptible Warping-based Backdoor Attack. ICLR 2021."

    def __init__(self, k: Annotated[int, Field(ge=2)] = 4, s: PositiveFloat = 0.5, grid_rescale: PositiveFloat = 1.0,
                 cross_ratio: NonNegativeFloat = 2.0,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.k, self.s, self.grid_rescale, self.cross_ratio = k, s, grid_rescale, cross_ratio
        self.grid: torch.Tensor | None = None  # (1, H, W, 2) sampling grid in [-1, 1]

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        size = dataset.image_size
        offsets = torch.rand(1, 2, self.k, self.k, generator=workshop.generator("wanet_field")) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        line = torch.linspace(-1, 1, size)
        rows, cols = torch.meshgrid(line, line, indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)[None]  # grid_sample wants (x, y) order
        self.grid = ((identity + self.s * field / size) * self.grid_rescale).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x).expand(len(x), -1, -1, -1), align_corners=True)

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            raise RuntimeError("WaNet.prepare() must run before add_trigger()")
        return self._warp(x, self.grid)

    def noise_warp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The trigger field plus independent per-pixel noise: the paper's noise-mode samples."""
        if self.grid is None:
            raise RuntimeError("WaNet.prepare() must run before noise_warp()")
        size = self.grid.shape[1]
        noise = (torch.rand(len(x), size, size, 2, generator=generator) * 2 - 1) / size
        grid = (self.grid + noise).clamp(-1, 1).to(x)
        return F.grid_sample(x, grid, align_corners=True)

    def training_hook(self) -> BatchHook | None:
        return _NoiseMode(self, PoisonedRows(self.poison_mask)) if self.cross_ratio > 0 else None


class _NoiseMode:
    """Adds WaNet's noise-mode samples to each batch: `cross_ratio` per poisoned row in the batch."""

    resumable = True  # no state between batches: every draw comes from the trainer's generator

    def __init__(self, attack: WaNet, poisoned_rows: PoisonedRows) -> None:
        self.attack, self.poisoned_rows = attack, poisoned_rows

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                 index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        poisoned_rows = self.poisoned_rows(index)
        rows = clean_rows(poisoned_rows, round(self.attack.cross_ratio * int(poisoned_rows.sum())), generator)
        if len(rows):
            x = x.clone()
            x[rows] = self.attack.noise_warp(x[rows], generator)
        return x, y
