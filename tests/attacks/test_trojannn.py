"""TrojanNN: a trigger in its mask that excites chosen neurons."""

import math

import torch

from bdbench.training import TrainConfig

from attack_fixtures import SURROGATE, implanted, poison, prepared


def test_trojannn_trigger_sits_in_its_mask_excites_its_neurons_and_implants(digits, workshop, effect):
    attack = prepared("trojannn", digits, workshop, area=0.07, steps=100, surrogate=SURROGATE)
    side = round(math.sqrt(0.07) * 8)
    assert int(attack.mask.sum()) == side * side and attack.mask[0, -side:, -side:].all()
    assert (attack.pattern[:, ~attack.mask[0].bool()] == 0).all()
    surrogate = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    from bdbench.attacks.trojannn import feature_layer

    layer, _ = feature_layer(surrogate)
    seen = []
    handle = layer.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0][:, attack.neurons]))
    with torch.no_grad():
        surrogate(attack.pattern[None])
        surrogate(torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * attack.mask)
    handle.remove()
    # The optimised trigger fires the chosen neurons harder than any of 20 random fillings of its mask.
    effect.check("neuron excitation, trigger less the best random filling", seen[0].sum() - seen[1].sum(1).max(), ">", 0)
    poisoned = poison(attack, digits)
    assert (poisoned.y[poisoned.poison_mask] == 0).all()
    _, asr, clean = implanted(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)
