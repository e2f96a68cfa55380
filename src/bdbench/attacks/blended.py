"""Blended: a full-image pattern mixed into the input, x' = (1 - alpha) x + alpha p (Chen, Liu, Li,
Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
arXiv 1712.05526, 2017). The paper's random-noise pattern is drawn from a fixed seed; alpha
defaults to 0.2 as in BackdoorBench.
"""

from __future__ import annotations

import torch

from bdbench.attacks.base import ATTACKS, Attack, LabelMode
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.params import UpToOne


def blend_pattern(dataset: Dataset, pattern_seed: int) -> torch.Tensor:
    """Blended's pattern for `dataset`'s image shape: uniform noise in [0, 1] drawn from `pattern_seed`."""
    shape = (dataset.in_channels, dataset.image_size, dataset.image_size)
    return torch.rand(shape, generator=torch.Generator().manual_seed(pattern_seed))


@ATTACKS.register("blended")
class Blended(Attack):
    """Blend a fixed-seed uniform noise pattern into the whole image at ratio alpha (Chen et al. 2017)."""

    seeded_trigger = False  # pattern_seed, not the experiment's seed, draws the pattern
    citation = "Chen, Liu, Li, Lu, Song. Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning. arXiv:1712.05526, 2017."

    def __init__(self, alpha: UpToOne = 0.2, pattern_seed: int = 0, label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.alpha, self.pattern_seed = alpha, pattern_seed
        self.pattern: torch.Tensor | None = None

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        self.pattern = blend_pattern(dataset, self.pattern_seed)

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("Blended.prepare() must run before add_trigger()")
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x)
