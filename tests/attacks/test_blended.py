"""Blended: its mixed-in pattern and its effect on a tiny model."""

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.errors import ConfigError

from attack_fixtures import implanted, poison, prepared


def test_blended_mixes_a_fixed_pattern_at_alpha(digits):
    a = prepared("blended", digits, alpha=0.2)
    b = prepared("blended", digits, alpha=0.2)
    assert torch.equal(a.pattern, b.pattern)  # fixed seed: the same pattern every time
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(a.add_trigger(x), 0.8 * x + 0.2 * a.pattern)
    with pytest.raises(ConfigError, match="parameter 'alpha' is 1.5: input should be less than or equal to 1"):
        ATTACKS.build("blended", {"alpha": 1.5})


def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect):
    attack = prepared("blended", digits, alpha=0.2)
    _, asr, clean = implanted(attack, digits, poison(attack, digits))
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.9)
