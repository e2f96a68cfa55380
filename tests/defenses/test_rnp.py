"""RNP (Reconstructive Neuron Pruning)."""

import copy

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES
from bdbench.defenses.anp import NeuronPerturbation
from bdbench.errors import ConfigError

from defense_fixtures import toy_context


def test_rnp_recovering_drops_the_mask_of_a_neuron_that_hurts_clean_data_and_learns_nothing_else(effect):
    # Two BatchNorm neurons read the images' brightness, one with the sign that helps the label (class 1 =
    # bright), one with the opposite sign; the head adds both to class 1's logit, so the second costs clean
    # accuracy. Recovering must drive its mask to 0 and keep the first at 1, changing no weight.
    torch.manual_seed(0)
    y = torch.arange(64) % 2
    x = (60 + 120 * y.view(-1, 1, 1, 1) + torch.randint(0, 40, (64, 1, 4, 4))).to(torch.uint8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.ones(16), -torch.ones(16)]) / 16)
        model[1].bias.zero_()
        model[3].weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 1.0]]))
        model[3].bias.zero_()
    context = toy_context(model.eval(), x, y)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    rnp = DEFENSES.build("rnp", {"recovering_epochs": 40})
    masks = rnp.recover(context, NeuronPerturbation(model)).masks[0]
    assert masks[0] == 1.0
    effect.check("mask of the backdoor neuron", masks[1], "<", 0.05)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_rnp_unlearning_stops_at_the_first_epoch_at_or_below_the_clean_threshold(badnets, effect):
    context = badnets.context(sees_training_set=False)

    def unlearned(**params):
        return DEFENSES.build("rnp", params).unlearn(context, copy.deepcopy(badnets.model)).state_dict()

    # Every epoch's accuracy is at most 1: a threshold of 1 stops after the first, however many are allowed.
    one = unlearned(unlearning_epochs=1, clean_threshold=1.0)
    stopped = unlearned(unlearning_epochs=5, clean_threshold=1.0)
    assert all(torch.equal(one[k], stopped[k]) for k in one)
    two = unlearned(unlearning_epochs=2, clean_threshold=0.0)
    assert any(not torch.equal(one[k], two[k]) for k in one)
    # With the paper's settings, gradient ascent takes the clean budget's accuracy from 0.99 to near chance.
    model = DEFENSES.build("rnp", {}).unlearn(context, copy.deepcopy(badnets.model))
    effect.check("budget accuracy before", context.budget_accuracy(badnets.model), ">", 0.95)
    effect.check("budget accuracy after unlearning", context.budget_accuracy(model), "<", 0.3)


def test_rnp_prunes_the_deployed_weights_not_the_unlearned_ones(badnets):
    before = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    settings = {"unlearning_epochs": 3, "recovering_epochs": 2, "fraction": 0.1}
    repaired = DEFENSES.build("rnp", settings).run(badnets.context(sees_training_set=False)).model
    assert all(torch.equal(before[k], v) for k, v in badnets.model.state_dict().items())
    after = repaired.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    scales = [m.weight for m in repaired.modules() if isinstance(m, nn.BatchNorm2d)]
    total = sum(s.numel() for s in scales)
    assert changed and all(k.endswith(".weight") and (after[k][after[k] != before[k]] == 0).all() for k in changed)
    assert sum(int((s == 0).sum()) for s in scales) == round(0.1 * total)
    with pytest.raises(ConfigError):
        DEFENSES.build("rnp", {"clean_threshold": 1.5})
