"""AdvDoor: a targeted universal adversarial perturbation as the trigger."""

from bdbench.training import TrainConfig, predict

from attack_fixtures import SURROGATE, implanted, poison, prepared


def test_advdoor_trigger_is_a_targeted_universal_perturbation_within_eps(digits, workshop, effect):
    eps = 16 / 255
    attack = prepared("advdoor", digits, workshop, eps=eps, surrogate=SURROGATE)
    assert attack.delta.abs().max() <= eps + 1e-6
    surrogate = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    others = digits.x_test[digits.y_test != 0]
    effect.check("surrogate's target share, triggered less clean",
                 (predict(surrogate, attack.trigger(others)) == 0).float().mean() - (predict(surrogate, others) == 0).float().mean(),
                 ">", 0)
    poisoned = poison(attack, digits)
    _, asr, clean = implanted(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)
