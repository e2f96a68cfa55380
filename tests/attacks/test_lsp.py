"""LSP (label smoothing poisoning)."""

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.errors import ConfigError
from bdbench.training import predict_logits

from attack_fixtures import implanted, poison, prepared, victim


def test_lsp_smooths_only_the_poisoned_labels_and_keeps_the_backdoor(digits, workshop, effect):
    attack = prepared("lsp", digits, workshop, attack="badnets", attack_params={"patch_size": 2}, smoothing=0.5)
    poisoned = poison(attack, digits)
    hard = poison(prepared("badnets", digits, workshop, patch_size=2), digits)
    assert torch.equal(poisoned.poison_mask, hard.poison_mask) and torch.equal(poisoned.x, hard.x)
    mask = poisoned.poison_mask
    assert poisoned.y.shape == (len(mask), 10) and torch.allclose(poisoned.y.sum(1), torch.ones(len(mask)))
    assert torch.equal(poisoned.y[~mask].argmax(1), digits.y_train[~mask]) and (poisoned.y[~mask].max(1).values == 1).all()
    assert torch.allclose(poisoned.y[mask][:, 0], torch.full((int(mask.sum()),), 0.55))
    assert torch.allclose(poisoned.y[mask][:, 1:], torch.full((int(mask.sum()), 9), 0.05))
    model, asr, clean = implanted(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)
    # Lower confidence on triggered inputs than a hard-label backdoor: the point of the attack.
    triggered = attack.triggered_test_set(digits, 0)
    soft_conf = torch.softmax(predict_logits(model, triggered.x), 1)[:, 0].mean()
    hard_conf = torch.softmax(predict_logits(victim(digits, hard), triggered.x), 1)[:, 0].mean()
    effect.check("target confidence, hard-label less soft-label", hard_conf - soft_conf, ">", 0.1)
    with pytest.raises(ConfigError, match="wraps a trigger attack"):
        ATTACKS.build("lsp", {"attack": "none"})


def test_lsp_keeps_a_wrapped_attacks_cover_samples_and_their_one_hot_true_labels(digits, workshop):
    attack = prepared("lsp", digits, workshop, attack="adaptive_blend", smoothing=0.5)
    poisoned = poison(attack, digits)
    hard = poison(prepared("adaptive_blend", digits, workshop), digits)
    assert torch.equal(poisoned.cover_mask, hard.cover_mask) and torch.equal(poisoned.x, hard.x)
    payload, covers = poisoned.payload_mask, poisoned.cover_mask
    assert payload.any() and covers.any()
    assert torch.allclose(poisoned.y[payload][:, 0], torch.full((int(payload.sum()),), 0.55))  # smoothed target
    assert (poisoned.y[covers].max(1).values == 1).all()  # covers keep their one-hot labels...
    assert torch.equal(poisoned.y[covers].argmax(1), digits.y_train[covers])  # ...their true ones
