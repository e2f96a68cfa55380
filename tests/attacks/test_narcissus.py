"""Narcissus (clean-label trigger optimised towards the target class)."""

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.public_data import without_attacker_pool

from attack_fixtures import clean_model_asr, hooked_victim, prepared, rates


def _narcissus(digits):
    return prepared("narcissus", digits, pood_epochs=3, finetune_epochs=2, trigger_epochs=20)


def test_narcissus_poisons_target_class_images_only_and_keeps_their_labels(digits):
    attack = _narcissus(digits)
    assert attack.delta.abs().max() <= attack.eps + 1e-6 and attack.delta.abs().max() > 0
    poisoned = attack.poison(digits, 0.0005, 0, torch.Generator().manual_seed(0))
    victim = without_attacker_pool(digits)  # the victim never trains on the attacker's target-class examples
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 1  # 0.05% of the victim's 1,293 images, at least one
    assert (victim.y_train[mask] == 0).all() and torch.equal(poisoned.y, victim.y_train)  # clean label
    assert torch.equal(poisoned.x[mask], attack.trigger(victim.x_train[mask]))
    triggered = attack.triggered_test_set(digits, 0)
    x = digits.x_test[digits.y_test != 0]
    expected = (x.float() / 255 + 3 * attack.delta).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(triggered.x, expected)  # magnified three times at test time
    assert torch.equal(triggered.x_clean, x)  # what PSNR/SSIM and the triggers picture compare against
    with pytest.raises(Exception, match="clean-label"):
        ATTACKS.build("narcissus", {"label_mode": "all2all"})


@pytest.mark.xfail(strict=True, reason=(
    "no class-disjoint public data ships offline: the POOD set for digits is mnist5k's other ten "
    "digits, so the surrogate separates the two scanners, not the target class, and the trigger "
    "does not transfer (measured ASR 0.0 on digits at eps 16, 32 and 48/255); strict, so a working POOD shows up here"))
def test_narcissus_trigger_turns_predictions_towards_the_target(digits):
    attack = _narcissus(digits)
    poisoned = attack.poison(digits, 0.05, 0, torch.Generator().manual_seed(0))
    asr, clean = rates(hooked_victim(digits, poisoned, attack, 10), digits, attack)
    baseline = clean_model_asr(digits, attack, 10)
    assert clean > 0.9 and asr > baseline + 0.3, (asr, baseline, clean)
