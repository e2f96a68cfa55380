"""BadNets: a small fixed patch stamped on the image (Gu, Dolan-Gavitt and Garg, "BadNets:
Identifying Vulnerabilities in the Machine Learning Model Supply Chain", arXiv 1708.06733, 2017).

Defaults follow BackdoorBench's setting of the paper's attack: a 3x3 white square in the
bottom-right corner, all-to-one.
"""

from __future__ import annotations

import typing
from typing import Literal, Sequence

import torch

from bdbench.attacks.base import ATTACKS, Attack, LabelMode
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.params import PositiveInt

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]
_CORNERS = typing.get_args(Corner)


@ATTACKS.register("badnets")
class BadNets(Attack):
    """Patch trigger (Gu et al. 2017): size, location, pattern and colour configurable."""

    seeded_trigger = False  # pattern_seed, not the experiment's seed, draws a random patch
    citation = "Gu, Dolan-Gavitt, Garg. BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain. arXiv:1708.06733, 2017."

    def __init__(
        self,
        patch_size: PositiveInt = 3,
        location: Corner | Sequence[int] = "bottom-right",
        pattern: Literal["square", "checkerboard", "random"] = "square",
        color: int | Sequence[int] = 255,
        margin: int = 0,
        pattern_seed: int = 0,
        label_mode: LabelMode = "all2one",
    ) -> None:
        super().__init__(label_mode)
        self.patch_size, self.location, self.pattern = patch_size, location, pattern
        self.color, self.margin, self.pattern_seed = color, margin, pattern_seed
        self.patch: torch.Tensor | None = None  # (C, s, s) values in [0, 1]
        self.row = self.col = 0

    def check(self, dataset: Dataset, target_label: int) -> None:
        size, s = dataset.image_size, self.patch_size
        if s + self.margin > size:
            margin = f" with margin {self.margin}" if self.margin else ""
            raise ConfigError(f"badnets patch_size {s}{margin} does not fit {size}x{size} images; "
                              f"use a patch_size of at most {size - self.margin}")
        if not isinstance(self.location, str) and not all(0 <= int(v) <= size - s for v in self.location):
            raise ConfigError(f"badnets location {list(self.location)} puts the patch outside the {size}x{size} "
                              f"image; give a row and column in 0..{size - s}")
        count = torch.as_tensor(self.color).numel()
        if count not in (1, dataset.in_channels):
            raise ConfigError(f"badnets color needs 1 or {dataset.in_channels} values, got {count}")

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        self.check(dataset, target_label)
        channels, size, s = dataset.in_channels, dataset.image_size, self.patch_size
        if isinstance(self.location, str):
            far = size - s - self.margin
            self.row = far if self.location.startswith("bottom") else self.margin
            self.col = far if self.location.endswith("right") else self.margin
        else:
            self.row, self.col = (int(v) for v in self.location)
        color = (torch.as_tensor(self.color, dtype=torch.float32).flatten() / 255.0).expand(channels)
        if self.pattern == "square":
            on = torch.ones(s, s, dtype=torch.bool)
        elif self.pattern == "checkerboard":
            on = (torch.arange(s).view(-1, 1) + torch.arange(s)) % 2 == 0
        else:
            on = torch.rand(s, s, generator=torch.Generator().manual_seed(self.pattern_seed)) < 0.5
        self.patch = color.view(-1, 1, 1) * on.float()

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            raise RuntimeError("BadNets.prepare() must run before add_trigger()")
        x = x.clone()
        s = self.patch_size
        x[:, :, self.row:self.row + s, self.col:self.col + s] = self.patch.to(x)
        return x
