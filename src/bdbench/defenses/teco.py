"""TeCo (Liu, Tian, Wu, Chen, Wang, Zhang, Zhou, Song, "Detecting Backdoors During the Inference Stage
Based on Corruption Robustness Consistency", CVPR 2023).

Clean images lose their prediction at similar corruption severities whatever the corruption;
triggered images are robust to some corruptions and fragile to others. For each corruption
type, find the first of severities 1-5 at which the prediction changes (6 when it never does);
the TeCo score is the standard deviation of these transition points over the corruption types.
The paper uses the 15 ImageNet-C corruptions; we implement the 8 that apply to any image size and
channel count with their ImageNet-C severity parameters: Gaussian, shot, impulse and speckle
noise, Gaussian blur, brightness, contrast and pixelation. The paper reports AUROC without a
threshold; ours is set on the clean budget at a `false_rejection` rate of 5%.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.scoring import ThresholdDetector, clean_threshold
from bdbench.params import OpenRate
from bdbench.training import predict

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-taps.pow(2) / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(x.device)
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _pixelate(x: torch.Tensor, scale: float) -> torch.Tensor:
    size = x.shape[-1]
    small = F.interpolate(x, size=max(1, int(size * scale)), mode="area")
    return F.interpolate(small, size=size, mode="nearest")


def _impulse(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    draw = torch.rand(x.shape, generator=generator)
    x = torch.where(draw < amount / 2, torch.zeros_like(x), x)
    return torch.where(draw > 1 - amount / 2, torch.ones_like(x), x)


# ImageNet-C severity parameters (Hendrycks and Dietterich, ICLR 2019), severities 1..5.
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": lambda x, s, g: x + torch.randn(x.shape, generator=g) * (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1],
    "shot_noise": lambda x, s, g: torch.poisson(x * (60, 25, 12, 5, 3)[s - 1], generator=g) / (60, 25, 12, 5, 3)[s - 1],
    "impulse_noise": lambda x, s, g: _impulse(x, (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1], g),
    "speckle_noise": lambda x, s, g: x + x * torch.randn(x.shape, generator=g) * (0.15, 0.2, 0.35, 0.45, 0.6)[s - 1],
    "gaussian_blur": lambda x, s, g: _gaussian_blur(x, (1, 2, 3, 4, 6)[s - 1]),
    "brightness": lambda x, s, g: x + (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1],
    "contrast": lambda x, s, g: (x - x.mean((1, 2, 3), keepdim=True)) * (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    + x.mean((1, 2, 3), keepdim=True),
    "pixelate": lambda x, s, g: _pixelate(x, (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]),
}
SEVERITIES = 5


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def transition_deviation(model: torch.nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TeCo score of uint8 images: std over corruption types of the first severity that changes the prediction."""
    base = predict(model, x)
    images = x.float().div(255.0)
    transitions = []
    for corrupt in CORRUPTIONS.values():
        first = torch.full((len(x),), float(SEVERITIES + 1))
        for severity in range(SEVERITIES, 0, -1):  # descending, so the lowest changing severity wins
            changed = predict(model, _to_uint8(corrupt(images, severity, generator))) != base
            first[changed] = float(severity)
        transitions.append(first)
    return torch.stack(transitions, 1).std(1)


@DEFENSES.register("teco")
class TeCo(Defense):
    """TeCo (Liu et al. 2023): flag inputs whose robustness differs widely across corruption types."""

    kind = DefenseKind.INPUT_DETECTION
    needs_internals = False  # only queries predictions
    citation = ("Liu et al. Detecting Backdoors During the Inference Stage Based on Corruption Robustness "
                "Consistency. CVPR 2023.")

    def __init__(self, false_rejection: OpenRate = 0.05) -> None:
        self.false_rejection = float(false_rejection)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model, generator = context.model, context.generator("teco")
        threshold = clean_threshold(transition_deviation(model, context.clean_x, generator), self.false_rejection)
        return DefenseOutcome(input_detector=ThresholdDetector(lambda x: transition_deviation(model, x, generator),
                                                               threshold), threshold=threshold)
