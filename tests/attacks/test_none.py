"""The no-attack reference."""

import torch

from attack_fixtures import prepared


def test_no_attack_poisons_nothing(digits):
    attack = prepared("none", digits)
    poisoned = attack.poison(digits, 0.0, 0, torch.Generator())
    assert not poisoned.poison_mask.any() and torch.equal(poisoned.y, digits.y_train)
