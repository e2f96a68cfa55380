"""ShrinkPad (Li, Zhai, Wu, Jiang, Li and Xia, "Backdoor Attack in the Physical World", ICLR 2021
Workshop on Robust and Reliable Machine Learning in the Real World; arXiv:2104.02361).

A trigger stamped at a fixed place works because the backdoored model learned it there. ShrinkPad
pre-processes every input: shrink the image by `shrink` pixels a side (bilinear) and pad it back to
its size with zeros at a random offset, so a trigger moves by up to `shrink` pixels and changes
scale, while the object of a clean image stays recognisable. The model's weights are untouched; the
defended model is the pre-processing followed by the deployed model.

The paper shrinks 32x32 CIFAR-10 images by 4 pixels; by default the shrink here is the same share of
the side, an eighth (4 pixels at 32 and 28 pixels, 1 at 8). Nothing is tuned, on test data or on
anything else: the defender's clean budget is not even needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses import Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.errors import ConfigError


class ShrinkPadded(nn.Module):
    """`model` behind ShrinkPad: each image in [0, 1] shrunk by `shrink` pixels, zero-padded back at a random
    offset drawn from `generator` (so a run is repeatable from the defense's seed)."""

    def __init__(self, model: nn.Module, shrink: int, seed: int) -> None:
        super().__init__()
        self.model, self.shrink = model, shrink
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        small = F.interpolate(x, size=(height - self.shrink, width - self.shrink), mode="bilinear",
                              align_corners=False)
        top = torch.randint(0, self.shrink + 1, (n,), generator=self.generator).tolist()
        left = torch.randint(0, self.shrink + 1, (n,), generator=self.generator).tolist()
        padded = torch.stack([F.pad(image, (lft, self.shrink - lft, t, self.shrink - t))
                              for image, t, lft in zip(small, top, left)])
        return self.model(padded)


class ShrinkPad(Defense):
    """ShrinkPad (Li et al. 2021): shrink each input a few pixels and pad it back at a random offset."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Li, Zhai, Wu, Jiang, Li, Xia. Backdoor Attack in the Physical World. ICLR 2021 Workshop on "
                "Robust and Reliable Machine Learning in the Real World (arXiv:2104.02361).")
    needs_internals = False  # only queries the model's predictions

    def __init__(self, shrink: int | None = None) -> None:
        if shrink is not None and shrink < 1:
            raise ConfigError(f"shrinkpad shrink must be at least 1 pixel, not {shrink}")
        self.shrink = shrink

    def run(self, context: DefenseContext) -> DefenseOutcome:
        side = context.image_size
        shrink = self.shrink if self.shrink is not None else max(1, round(side / 8))
        if shrink >= side:
            raise ConfigError(f"shrinkpad shrink {shrink} leaves nothing of a {side}x{side} image; give at most {side - 1}")
        # The padding offsets come from the experiment's seed, so the same cell gives the same numbers anywhere.
        seed = int(context.generator("shrinkpad").initial_seed())
        return DefenseOutcome(model=ShrinkPadded(context.model, shrink, seed))
