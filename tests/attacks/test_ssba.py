"""SSBA (sample-specific invisible trigger): its residuals, its 8-bit training, and its effect."""

import torch

from attack_fixtures import check_dirty_label_effect, prepared


def test_ssba_residuals_are_small_and_sample_specific(digits):
    attack = prepared("ssba", digits, steps=600)
    x = digits.x_test[:64]
    residual = attack.trigger(x).float() - x.float()
    assert residual.abs().max() <= 255 * attack.max_residual + 1
    assert residual.abs().mean() > 0.5  # the secret is really written into the image
    assert (residual[0] != residual[1]).any()  # each image its own residual


def test_ssba_trains_on_the_stored_8_bit_image_with_the_rounding_passed_straight_through():
    from bdbench.attacks.ssba import stored_as_uint8

    x = torch.tensor([0.0, 0.3 / 255, 0.7 / 255, 0.5], requires_grad=True)
    stored = stored_as_uint8(x)
    assert torch.allclose(stored, torch.tensor([0.0, 0.0, 1 / 255, 128 / 255]))  # what a uint8 file holds
    stored.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))  # a residual below half a grey level still gets a gradient


def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect):
    check_dirty_label_effect("ssba", digits, effect, {"steps": 1500}, 20)
