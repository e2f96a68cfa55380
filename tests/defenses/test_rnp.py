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


def _brightness_digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` 4x4 grey images, class 1 bright and class 0 dark."""
    torch.manual_seed(0)
    y = torch.arange(n) % 2
    return (60 + 120 * y.view(-1, 1, 1, 1) + torch.randint(0, 40, (n, 1, 4, 4))).to(torch.uint8), y


def test_rnp_unlearns_with_one_plain_momentum_sgd_over_all_epochs_and_the_authors_lr_milestones():
    # The authors' main.py makes one SGD (momentum 0.9, not Nesterov, weight decay 5e-4) and one MultiStepLR
    # (milestones 10 and 20, gamma 0.1) before the epoch loop, so the momentum runs on across epochs. On a
    # budget of one batch every epoch is one full-batch step of -CE: the result must be those 22 steps.
    x, y = _brightness_digits(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]) / 4)
        model[1].bias.copy_(torch.tensor([30.0, -30.0]))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.1)
    for _ in range(22):
        logits = reference(x.float() / 255)
        assert (logits.argmax(1) == y).any()  # the stopping rule (threshold 0) never fires
        optimizer.zero_grad()
        (-nn.functional.cross_entropy(logits, y)).backward()
        optimizer.step()
        scheduler.step()
    rnp = DEFENSES.build("rnp", {"unlearning_epochs": 22, "clean_threshold": 0.0})
    unlearned = rnp.unlearn(toy_context(model, x, y), model)
    for ours, theirs in zip(unlearned.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_rnp_recovers_the_masks_with_plain_momentum_sgd_clipped_after_every_step():
    # The authors' mask optimiser: SGD(lr 0.2, momentum 0.9), no Nesterov, no weight decay, masks clamped to
    # [0, 1] after each step, the unlearned network in training mode (BatchNorm on the batch's statistics).
    x, y = _brightness_digits(16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.ones(16), -torch.ones(16)]) / 16)
        model[3].weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 1.0]]))
    reference = NeuronPerturbation(copy.deepcopy(model).train())
    reference.masks = [mask.requires_grad_(True) for mask in reference.masks]
    optimizer = torch.optim.SGD(reference.masks, lr=0.2, momentum=0.9)
    for _ in range(6):
        optimizer.zero_grad()
        (0.2 * nn.functional.cross_entropy(reference(x.float() / 255, perturbed=False), y)).backward()
        optimizer.step()
        with torch.no_grad():
            reference.masks[0].clamp_(0.0, 1.0)
    theirs = reference.masks[0].detach()
    assert 0.0 < theirs[1] < 1.0  # a mask inside the box, where the optimiser's path shows
    ours = DEFENSES.build("rnp", {"recovering_epochs": 6}).recover(toy_context(model, x, y),
                                                                   NeuronPerturbation(model)).masks[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_rnp_deals_the_budget_in_batches_of_128_keeping_the_ragged_last_one():
    # The authors' DataLoader(batch_size=128, shuffle=True) keeps the last batch: 200 images make 128 and 72,
    # in both learning stages, and the unlearning accuracy is over all 200.
    x, y = _brightness_digits(200)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    seen: list[int] = []
    model.register_forward_hook(lambda _module, inputs, _output: seen.append(len(inputs[0])))
    rnp = DEFENSES.build("rnp", {"unlearning_epochs": 2, "clean_threshold": 0.0, "recovering_epochs": 2})
    context = toy_context(model, x, y)
    rnp.unlearn(context, model)
    assert seen == [128, 72, 128, 72]
    seen.clear()
    rnp.recover(context, NeuronPerturbation(model))
    assert seen == [128, 72, 128, 72]
