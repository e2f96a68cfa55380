"""SIG: a clean-label backdoor whose trigger is a faint signal added to the whole image (Barni,
Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption without Label
Poisoning", ICIP 2019, arXiv 1902.11237).

Only training images of the target class are corrupted and their labels stay correct; at test
time the same signal on an image of any class pulls it to the target. The paper's two signals:

- sinusoidal (its traffic-sign experiments): v(i, j) = delta * sin(2 pi j f / m), with m the
  number of columns, delta = 20 (of 255) and f = 6;
- ramp (its MNIST experiments): v(i, j) = j delta / m.

The signal is added to every channel and the result clipped to the valid range. The paper also
strengthens the signal at test time to raise the success rate; `delta_test` does that (it
defaults to `delta`, the same signal at training and test time).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from bdbench.attacks.base import ATTACKS, CleanLabelAttack, LabelMode, to_uint8
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset

PixelAmplitude = Annotated[float, Field(gt=0, le=255)]  # units of 8-bit pixel values


@ATTACKS.register("sig")
class SIG(CleanLabelAttack):
    """Clean-label sinusoidal (or ramp) signal on target-class training images (Barni et al. 2019)."""

    seeded_trigger = False
    citation = ("Barni, Kallas, Tondi. A New Backdoor Attack in CNNs by Training Set Corruption without Label "
                "Poisoning. ICIP 2019 (arXiv:1902.11237).")

    def __init__(self, delta: PixelAmplitude = 20.0, frequency: float = 6.0, signal: Literal["sine", "ramp"] = "sine",
                 delta_test: PixelAmplitude | None = None, label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.delta, self.frequency, self.signal = delta, frequency, signal
        self.delta_test = delta if delta_test is None else delta_test
        self.pattern: torch.Tensor | None = None  # (W,) unit-amplitude signal along the columns

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        m = dataset.x_train.shape[3]
        j = torch.arange(m, dtype=torch.float32)
        self.pattern = torch.sin(2 * math.pi * j * self.frequency / m) if self.signal == "sine" else j / m

    def _add(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("SIG.prepare() must run before add_trigger()")
        return (x + delta / 255.0 * self.pattern.to(x)).clamp(0, 1)

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time signal (strength `delta_test`)."""
        return self._add(x, self.delta_test)

    def poison_images(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The training-time signal (strength `delta`)."""
        return to_uint8(self._add(x.float().div(255.0), self.delta))
