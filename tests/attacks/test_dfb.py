"""DFB (data-free backdoor, clean-label residual learned on public data)."""

import dataclasses

import pytest
import torch
from conftest import SHARED_DATA

from bdbench.attacks import ATTACKS
from bdbench.attacks.public_data import without_attacker_pool
from bdbench.data import load_dataset
from bdbench.errors import ConfigError

from attack_fixtures import clean_model_asr, hooked_victim, prepared, rates


@pytest.fixture(scope="module")
def dfb(digits):
    return prepared("dfb", digits, surrogate={"epochs": 4, "width": 8}, encoder_epochs=20, encoder_lr=1e-3)


def test_dfb_adds_one_clipped_residual_to_target_class_images_and_keeps_their_labels(digits, dfb):
    eps = dfb.eps
    assert dfb.residual.shape == digits.x_train.shape[1:]
    assert dfb.residual.abs().max() > 6 * eps  # unclipped: the clipping bounds below are what act
    poisoned = dfb.poison(digits, 0.05, 0, torch.Generator().manual_seed(0))
    victim = without_attacker_pool(digits)  # the victim never trains on the attacker pool
    mask = poisoned.poison_mask
    assert int(mask.sum()) == round(0.05 * len(victim.y_train)) and (victim.y_train[mask] == 0).all()
    assert torch.equal(poisoned.y, victim.y_train) and torch.equal(poisoned.x[~mask], victim.x_train[~mask])
    x = victim.x_train[mask].float() / 255
    # Training images carry the residual clipped to 2 eps, test images the same residual clipped to 6 eps.
    expected = (x + dfb.residual.clamp(-2 * eps, 2 * eps)).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(poisoned.x[mask], expected)
    triggered = dfb.triggered_test_set(digits, 0)
    assert (triggered.y_true != 0).all() and (triggered.y_target == 0).all()
    change = triggered.x.float() - triggered.x_clean.float()
    assert change.abs().max() <= 6 * eps * 255 + 0.5 and change.abs().max() > 2 * eps * 255 + 0.5


@pytest.mark.skipif(not (SHARED_DATA / "cifar10.npz").is_file(), reason="../shared/data/cifar10.npz is absent")
def test_dfb_residual_erases_the_target_class_on_the_public_data_surrogate(effect):
    # The encoder's objective: public target-class images, with the residual, read as "other class". On
    # digits the attacker pool's 14 zeros are too few and too plain for an 8/255 residual; on the first
    # 5,000 CIFAR-10 images the pool holds 50 airplanes and 450 others.
    cifar10 = load_dataset("npz", path=str(SHARED_DATA / "cifar10.npz"), allow_hflip=True)
    cifar10 = dataclasses.replace(cifar10, x_train=cifar10.x_train[:5000], y_train=cifar10.y_train[:5000])
    dfb = prepared("dfb", cifar10, surrogate={"epochs": 4, "width": 8}, encoder_epochs=60, encoder_lr=1e-3)
    effect.check("share fooled, less the clean images' share", dfb.surrogate_fooled - dfb.surrogate_fooled_clean,
                 ">", 0.1)


def test_dfb_learns_from_the_attacker_pool_on_any_data_set(digits):
    # The attacker pool stands in for public images of the task's classes, so no data set is refused.
    signs = dataclasses.replace(digits, name="signs")
    attack = prepared("dfb", signs, surrogate={"epochs": 1, "width": 8}, encoder_epochs=1)
    assert attack.residual.shape == digits.x_train.shape[1:]
    with pytest.raises(ConfigError, match="clean-label"):
        ATTACKS.build("dfb", {"label_mode": "all2all"})


@pytest.mark.xfail(strict=True, reason=(
    "the paper's 8/255 residual makes the surrogate drop the target class on none of the attacker pool's 14 "
    "zeros of digits (the paper asks 99% before poisoning; even 64/255 fooled none): near-binary digits take "
    "far larger L-infinity budgets to fool a classifier (with the other digit set as public data: ASR 0.013 "
    "on mnist5k at the paper's 0.1%, 0.176 at 5%); strict, so an encoder that erases the class shows up here"))
def test_dfb_trigger_turns_predictions_towards_the_target(digits, dfb):
    poisoned = dfb.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))  # every target-class image
    asr, clean = rates(hooked_victim(digits, poisoned, dfb, 10), digits, dfb)
    baseline = clean_model_asr(digits, dfb, 10)
    assert clean > 0.9 and asr > baseline + 0.3, (asr, baseline, clean)
