"""TeCo (test-time corruption consistency), a run-time input detector: its score and corruptions as the
authors' code and ImageNet-C compute them, and its effect on a tiny BadNets model."""

import pytest
import torch
from torch import nn

from bdbench.defenses import teco


class Bright(nn.Module):
    """Class 1 when an image's mean pixel value exceeds 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1)


def test_teco_score_is_the_population_deviation_of_transition_points(monkeypatch):
    # One corruption flips the image to class 1 at severity 3, the other never: transitions 3 and 6,
    # whose population std (np.std, the authors' code) is 1.5, where the sample std would read 2.12.
    monkeypatch.setattr(teco, "CORRUPTIONS", {"lift": lambda x, s, g: x + 0.05 * s, "none": lambda x, s, g: x})
    x = torch.full((1, 1, 2, 2), 100, dtype=torch.uint8)  # 0.39: 0.49 at severity 2, 0.54 at 3
    assert teco.transition_deviation(Bright(), x, torch.Generator().manual_seed(0)).item() == pytest.approx(1.5)


def test_teco_contrast_keeps_each_channels_mean():
    # imagecorruptions' contrast scales each channel about its own mean: a flat image of any colour is unchanged.
    x = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.allclose(teco.CORRUPTIONS["contrast"](x, 3, torch.Generator()), x)


def test_teco_brightness_raises_the_hsv_value_keeping_hue_and_saturation():
    x = torch.tensor([0.2, 0.4, 0.8]).view(1, 3, 1, 1)
    brighter = teco.CORRUPTIONS["brightness"](x, 1, torch.Generator()).flatten()
    assert brighter.tolist() == pytest.approx([0.225, 0.45, 0.9])  # value 0.8 -> 0.9, every channel x 9/8
    grey = teco.CORRUPTIONS["brightness"](torch.tensor([0.0, 0.3, 0.95]).view(1, 1, 3, 1), 2, torch.Generator())
    assert grey.flatten().tolist() == pytest.approx([0.2, 0.5, 1.0])  # one channel: x + c, clipped


def test_teco_ranks_triggered_inputs_as_less_consistent_under_corruption(badnets, effect):
    # TeCo is threshold-free in its paper; here its ranking separates (AUROC) while the 5% clean
    # threshold catches few triggered inputs, which the grid reports as measured.
    _, fpr, _, auroc = badnets.screen_inputs("teco")
    effect.check("AUROC", auroc, ">=", 0.75)
    effect.check("FPR", fpr, "<=", 0.15)
