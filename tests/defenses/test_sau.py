"""Shared Adversarial Unlearning (SAU): its effect on a tiny BadNets model and its losses on hand-made cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind, sau
from bdbench.defenses.adversarial import linf_pgd, log_one_minus_softmax
from bdbench.defenses.sau import (
    SharedAdversarialObjective,
    jensen_shannon,
    unlearning_loss,
)
from bdbench.errors import ConfigError


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    assert DEFENSES.get("sau").kind is DefenseKind.MODEL_REPAIR
    # With 150 clean images and the authors' batch of 256, each epoch is one Adam step: 100 steps in all
    # where their 2500-image CIFAR budget gets 1000, and ASR only falls to about 0.8. Ten times the step
    # (1e-3) over 30 epochs makes up for it in a few seconds.
    repaired = badnets.repair("sau", {"lr": 0.001, "epochs": 30})
    assert not repaired.training and repaired.state_dict().keys() == badnets.model.state_dict().keys()  # no module added
    # Measured with one and with two torch threads: about 0.96 / 0.2; across kernel sets, threads and seeds 0-2 the
    # drop is 0.29-0.69.
    badnets.check_repair(repaired, effect, 0.2, 0.1)


def test_jensen_shannon_and_log_one_minus_softmax_on_hand_made_logits():
    big = 50.0
    opposite = jensen_shannon(torch.tensor([[big, 0.0]]), torch.tensor([[0.0, big]]))
    assert torch.allclose(opposite, torch.tensor([math.log(2)]), atol=1e-5)  # disjoint distributions: log 2
    logits = torch.randn(4, 3)
    assert torch.allclose(jensen_shannon(logits, logits), torch.zeros(4), atol=1e-6)
    p, q = F.softmax(logits[:1], 1), F.softmax(logits[1:2], 1)
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert torch.allclose(jensen_shannon(logits[:1], logits[1:2]), expected.view(1), atol=1e-6)

    classes = torch.tensor([0, 2, 1, 1])
    direct = torch.log(1 - F.softmax(logits, 1).gather(1, classes.view(-1, 1)).squeeze(1))
    assert torch.allclose(log_one_minus_softmax(logits, classes), direct, atol=1e-6)
    confident = log_one_minus_softmax(torch.tensor([[200.0, 0.0]]), torch.tensor([0]))
    assert torch.allclose(confident, torch.tensor([-200.0]))  # finite where 1 - p rounds to 0


def _linear(weight: list[list[float]]) -> nn.Module:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def test_shared_adversarial_objective_counts_only_unfooled_entropy_and_unshared_divergence():
    model, same, flipped = _linear([[10.0, 0.0], [0.0, 10.0]]), _linear([[10.0, 0.0], [0.0, 10.0]]), \
        _linear([[0.0, 10.0], [10.0, 0.0]])
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    shared = torch.tensor([[0.0, 1.0]])  # both (identical) models move from class 0 to class 1: shared
    assert float(SharedAdversarialObjective(model, same, x, y, 0.01, 1.0)(shared).detach()) == 0.0
    unfooled = torch.tensor([[1.0, 0.5]])
    entropy = F.cross_entropy(model(unfooled), y)  # both models still say 0; their predictions agree (JS 0)
    assert torch.allclose(SharedAdversarialObjective(model, same, x, y, 0.01, 1.0)(unfooled), 0.01 * entropy)
    # `flipped` says 1 on x and 0 on [0, 1]: both models are fooled, into different classes, so only the
    # divergence counts.
    divergence = jensen_shannon(model(shared), flipped(shared))
    assert torch.allclose(SharedAdversarialObjective(model, flipped, x, y, 0.01, 1.0)(shared), -divergence)


def test_unlearning_loss_unlearns_only_where_the_reference_is_fooled_into_a_new_wrong_class():
    model, reference = _linear([[1.0, 0.0], [0.0, 1.0]]), _linear([[10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    perturbed = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # the reference moves both from class 0 to class 1
    y = torch.tensor([0, 1])  # for the second image class 1 is the true label: nothing to unlearn there
    loss = unlearning_loss(model, reference, x, perturbed, y, (0.0, 0.0, 1.0))
    p1 = F.softmax(model(perturbed[:1]), 1)[0, 1]
    assert torch.allclose(loss, -torch.log(1e-6 + 1 - p1) / 2)
    full = unlearning_loss(model, reference, x, perturbed, y, (1.0, 2.0, 1.0))
    assert torch.allclose(full, F.cross_entropy(model(x), y) + 2 * F.cross_entropy(model(perturbed), y) + loss)


@pytest.mark.parametrize("params", [{"eps": 0}, {"epochs": 0}, {"unlearn_weight": -1}])
def test_bad_parameters_are_config_errors(params):
    with pytest.raises(ConfigError, match="sau"):
        DEFENSES.build("sau", params)


def test_pgd_stops_after_the_step_that_began_with_every_image_shared():
    # Both models are the same linear map, so an image moved across the boundary fools both into the same class.
    model = _linear([[10.0, 0.0], [0.0, 10.0]])
    x, y = torch.tensor([[0.6, 0.5], [0.55, 0.5]]), torch.tensor([0, 0])
    objective = SharedAdversarialObjective(model, model, x, y, 0.01, 1.0)
    calls = []

    def counted(z):
        calls.append(z.detach().clone())
        return objective(z)

    full = linf_pgd(counted, x, eps=0.2, step_size=0.1, steps=5)
    assert len(calls) == 5 and objective.all_shared()  # shared from the second step on: 0.6 - 0.1 < 0.5 + 0.1
    calls.clear()
    early = linf_pgd(counted, x, eps=0.2, step_size=0.1, steps=5, stop=objective.all_shared)
    assert len(calls) == 2  # the first step's start is unshared, the second's shared: stop after it
    # Once every image is shared the objective is flat there (no unfooled image, no unshared one): its gradient
    # is zero and the later steps cannot move the images, so the stop saves their passes and changes nothing.
    assert (model(early).argmax(1) == 1).all() and torch.equal(early, full)


def test_unlearning_term_is_bounded_as_in_the_authors_code():
    # The authors' -log(1 - p) drops the images h gives c0 a probability under 0.001 (a constant, no gradient)
    # and adds 1e-6 inside the logarithm, so a saturated image costs at most -log(1e-6) = 13.8, not -log(1 - p).
    model, reference = _linear([[1.0, 0.0], [0.0, 1.0]]), _linear([[10.0, 0.0], [0.0, 10.0]])
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    saturated = torch.tensor([[0.0, 25.0]])  # the reference says 1; h gives class 1 p = 1 - 1.4e-11
    loss = unlearning_loss(model, reference, x, saturated, y, (0.0, 0.0, 1.0))
    complement = torch.sigmoid(torch.tensor(-25.0))
    assert torch.allclose(loss, -torch.log(1e-6 + complement), rtol=1e-5)  # 13.8, where -log(1 - p) is 25
    logits = torch.tensor([[9.0, 0.0], [0.0, 9.0]], requires_grad=True)  # p of class 1: 1.2e-4, then 0.9999
    term = sau.bounded_unlearning_term(logits, torch.tensor([1, 1]))
    term.sum().backward()
    assert torch.allclose(term[0], -torch.log(torch.tensor(1e-6 + 0.999)))
    assert logits.grad is not None and torch.equal(logits.grad[0], torch.zeros(2)) and logits.grad[1].abs().min() > 0.5


def _first_sau_step(badnets, monkeypatch) -> dict:
    """What one Adam step of SAU (1 epoch of 150 images, one batch, one PGD step) saw: the first images its
    attack evaluated, the perturbed images and clean batch its update used, and its optimiser's arguments."""
    seen: dict = {}
    objective_call, update = SharedAdversarialObjective.__call__, sau.unlearning_loss

    def first_evaluation(self, perturbed):
        seen.setdefault("start", perturbed.detach().clone())
        return objective_call(self, perturbed)

    def spied_update(model, reference, x, perturbed, y, weights):
        seen.update(x=x.detach().clone(), perturbed=perturbed.detach().clone())
        return update(model, reference, x, perturbed, y, weights)

    class SpiedAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            seen["adam"] = kwargs
            super().__init__(params, **kwargs)

    monkeypatch.setattr(SharedAdversarialObjective, "__call__", first_evaluation)
    monkeypatch.setattr(sau, "unlearning_loss", spied_update)
    monkeypatch.setattr(torch.optim, "Adam", SpiedAdam)
    badnets.repair("sau", {"epochs": 1, "pgd_steps": 1})
    return seen


def test_pgd_starts_at_the_corner_and_is_not_clipped_to_the_image_range(badnets, monkeypatch):
    seen = _first_sau_step(badnets, monkeypatch)
    x, start, perturbed = seen["x"], seen["start"], seen["perturbed"]
    # The authors' init_type 'max': the first gradient is taken at x + 0.2, above 1 where x is white.
    assert torch.allclose(start, x + 0.2) and start.max() > 1.1
    # One step of 0.2 from +0.2 leaves each pixel at +0.2 or 0, and nothing clamps the result to [0, 1].
    delta = perturbed - x
    assert torch.all(((delta - 0.2).abs() < 1e-6) | (delta.abs() < 1e-6)) and (delta.abs() < 1e-6).any()
    assert perturbed.max() > 1.1


def test_adam_uses_amsgrad_as_backdoorbench_builds_it(badnets, monkeypatch):
    seen = _first_sau_step(badnets, monkeypatch)
    assert seen["adam"].get("amsgrad") is True and seen["adam"]["lr"] == 1e-4
