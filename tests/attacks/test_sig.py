"""SIG (clean-label sinusoidal signal)."""

import math

import torch

from attack_fixtures import assert_clean_label, poison, prepared


def test_sig_adds_the_papers_sinusoid_to_target_class_images_only(digits, workshop):
    attack = prepared("sig", digits, workshop, delta=20, frequency=6, delta_test=40)
    poisoned = poison(attack, digits)
    assert_clean_label(poisoned, digits)
    assert int(poisoned.poison_mask.sum()) == min(int((digits.y_train == 0).sum()), round(0.1 * len(digits.y_train)))
    grey = torch.full((1, 1, 8, 8), 0.5)
    signal = torch.tensor([20 / 255 * math.sin(2 * math.pi * j * 6 / 8) for j in range(8)])
    assert torch.allclose(attack.poison_images((grey * 255).to(torch.uint8), torch.tensor([0])).float() / 255,
                          (127 / 255 + signal).expand(1, 1, 8, 8), atol=1 / 255)
    assert torch.allclose(attack.add_trigger(grey), (0.5 + 2 * signal).expand(1, 1, 8, 8))  # delta_test = 2 delta
    assert torch.allclose(prepared("sig", digits, workshop, signal="ramp", delta=80).add_trigger(torch.zeros(1, 1, 8, 8))[0, 0, 3],
                          torch.arange(8) / 8 * 80 / 255)
    triggered = attack.triggered_test_set(digits, 0)
    assert (triggered.y_target == 0).all() and (triggered.y_true != 0).all()
