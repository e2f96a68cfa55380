"""BadNets: its patch, its poison mask and labels, and its effect on a tiny model."""

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.errors import ConfigError

from attack_fixtures import implanted, poison, prepared


def test_badnets_stamps_a_white_square_bottom_right(digits):
    attack = prepared("badnets", digits, patch_size=3)
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    out = attack.trigger(x)
    assert (out[:, :, 5:, 5:] == 255).all()
    assert out[:, :, :5].sum() == 0 and out[:, :, :, :5].sum() == 0


def test_badnets_location_pattern_and_colour(digits):
    attack = prepared("badnets", digits, patch_size=2, location=[1, 2], pattern="checkerboard", color=100)
    out = attack.trigger(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))[0, 0]
    assert out[1:3, 2:4].tolist() == [[100, 0], [0, 100]]
    assert out.sum() == 200
    with pytest.raises(ConfigError, match="outside the 8x8 image"):
        prepared("badnets", digits, patch_size=2, location=[7, 7])
    with pytest.raises(ConfigError, match="parameter 'location' is 'middle': input should be 'bottom-right', "):
        ATTACKS.build("badnets", {"location": "middle"})


def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect):
    attack = prepared("badnets", digits, patch_size=2)
    _, asr, clean = implanted(attack, digits, poison(attack, digits))
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.9)
