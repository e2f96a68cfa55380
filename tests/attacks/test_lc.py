"""Label-consistent attack (LC): adversarial perturbations within eps plus corner triggers."""

import torch

from bdbench.training import TrainConfig, predict

from attack_fixtures import SURROGATE, assert_clean_label, implanted, poison, prepared


def test_lc_perturbs_target_images_within_eps_adds_corner_triggers_and_implants(digits, workshop, effect):
    eps = 16 / 255
    attack = prepared("lc", digits, workshop, eps=eps, steps=20, surrogate=SURROGATE)
    poisoned = poison(attack, digits)
    assert_clean_label(poisoned, digits)
    mask = poisoned.poison_mask
    x0, x1 = digits.x_train[mask].float(), poisoned.x[mask].float()
    corners = attack.mask.bool()
    # Outside the four 3x3 corners only the PGD perturbation, within eps; inside, the pattern.
    assert (x1 - x0)[:, :, ~corners].abs().max() <= 16 + 1
    assert (x1 - x0)[:, :, ~corners].abs().max() >= 8  # PGD used its budget
    pattern = (attack.sign > 0).float() * 255
    assert torch.equal(x1[:, :, corners], pattern[corners].expand_as(x1[:, :, corners]))
    # The perturbation works against the surrogate: it misclassifies the perturbed images more.
    surrogate = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    idx = torch.nonzero(mask).flatten()
    adv = torch.stack([attack.x_adv[int(i)] for i in idx])
    effect.check("surrogate's accuracy on the images, unperturbed less perturbed",
                 (predict(surrogate, digits.x_train[idx]) == 0).float().mean() - (predict(surrogate, adv) == 0).float().mean(),
                 ">", 0)
    _, asr, clean = implanted(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.8)
