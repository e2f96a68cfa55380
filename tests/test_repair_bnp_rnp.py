"""Model repair by BNP and RNP: BNP's effect on a tiny BadNets model, the core of both on hand-made cases.

The effect test uses a cnn-small of width 16 on 8x8 digits with a clean budget of 150 images, far from
the papers' ResNet-18s on CIFAR-10. RNP's effect is not shown: on this model its unlearning does remove
clean accuracy, but masks on the norm layers' scales cannot bring it back (the unlearned model keeps
predicting the target class; unlearning also moves the BatchNorm shifts, which no mask touches), so
the lowest masks fall on neurons that clean accuracy needs and the clean-budget check prunes next to
nothing (measured: ASR 0.93 or more in every variant tried: one and two threads, 10% and 15% poisoning,
a width of 32, Blended). Its stages are tested one by one instead.
"""

import copy
import math

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseContext
from bdbench.defenses.anp import NeuronPerturbation
from bdbench.defenses.bnp import gaussian_kl, preactivation_divergences
from bdbench.errors import ConfigError, NotApplicable
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig

from defense_fixtures import poisoned_digits


@pytest.fixture(scope="module")
def badnets15(digits):
    # BNP's signal is how far the poisoned share of the training set pulls a backdoor neuron's running
    # statistics. At the other repair tests' 10% the backdoor neurons' divergences stand 2.4 to 2.8 std above
    # their layers' means (16 and 32 neurons a layer), so the paper's u = 3 prunes nothing; at 15% they
    # can stand out, and the paper's default is what is tested.
    return poisoned_digits(digits, "badnets", {"patch_size": 2}, 0.15)


def _toy_context(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> DefenseContext:
    return DefenseContext(model=model, clean_x=x, clean_y=y, num_classes=int(y.max()) + 1, in_channels=x.shape[1],
                          image_size=x.shape[-1], crop_padding=0, allow_hflip=False, train_config=TrainConfig(),
                          seed=0, device=torch.device("cpu"), new_model=lambda: copy.deepcopy(model))


def test_bnp_with_the_paper_default_keeps_clean_accuracy(badnets15, effect):
    before = {k: v.clone() for k, v in badnets15.model.state_dict().items()}
    repaired = DEFENSES.build("bnp", {}).run(badnets15.context(sees_training_set=False)).model
    assert all(torch.equal(before[k], v) for k, v in badnets15.model.state_dict().items())  # deployed model untouched
    (clean_before, asr_before), (clean_after, asr_after) = badnets15.scores(badnets15.model), badnets15.scores(repaired)
    effect.check("ASR before", asr_before, ">", 0.95)
    # The removal is not asserted: whether the backdoor neurons' divergences clear u = 3 on this 16-channel
    # model depends on the CPU's kernels and the threads. Measured ASR drops (tools/effect_spread.py): at 15%
    # poison 0.09 (AVX-512, one thread) and 0.13 (AVX2, one thread), 0.33-0.34 on the CPU this test was first
    # written on; 0.00-0.15 at 20%; at 25% 0.57 with one thread and 0.07 on AVX-512 with two. BNP's effect is
    # measured on the model-defenses grid.
    # Measured 0.18 on AVX-512 kernels with two threads (BNP prunes some clean-serving neurons too).
    effect.check("clean accuracy drop", clean_before - clean_after, "<", 0.3)


def test_bnp_reads_the_budget_images_not_their_labels_and_needs_batchnorm(badnets, digits):
    context = badnets.context(sees_training_set=False)
    shuffled = DefenseContext(**{**{f: getattr(context, f) for f in context.__dataclass_fields__},
                                 "clean_y": context.clean_y[torch.randperm(len(context.clean_y))]})
    bnp = DEFENSES.build("bnp", {"u": 2.0})
    first, second = bnp.run(context).model, bnp.run(shuffled).model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), badnets.model.state_dict().values()))

    vit = with_normalization(create_model("vit-small", 10, 1, 8, width=0.125), digits.mean, digits.std).eval()
    with pytest.raises(NotApplicable, match="no BatchNorm layer"):
        bnp.run(_toy_context(vit, context.clean_x[:8], context.clean_y[:8]))
    with pytest.raises(ConfigError):
        DEFENSES.build("bnp", {"u": -1.0})


def test_bnp_scores_the_kl_divergence_from_the_running_statistics_and_prunes_the_outlier():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 8, 4, 4), dtype=torch.uint8)
    model = nn.Sequential(nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16, 3)).eval()  # BN reads the images
    pixels = x.float().div(255).transpose(0, 1).reshape(8, -1)
    mean, var = pixels.mean(1), pixels.var(1)
    with torch.no_grad():
        model[0].running_mean.copy_(mean)
        model[0].running_var.copy_(var)
        model[0].running_mean[5] += 2 * var[5].sqrt()  # neuron 5's statistics were pulled two std away
        model[0].running_var[2] *= 4.0  # neuron 2's spread was doubled
    eps = model[0].eps
    (layer, divergence), = preactivation_divergences(model, x, 0, False, torch.Generator())
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (var + eps).sqrt()),
                                                 torch.distributions.Normal(model[0].running_mean,
                                                                            (model[0].running_var + eps).sqrt()))
    assert layer is model[0] and torch.allclose(divergence, expected, atol=1e-5)
    assert torch.allclose(divergence[5], torch.tensor(2.0), atol=1e-3)  # (2 std)^2 / 2
    assert torch.allclose(divergence[2], torch.tensor(0.5 * math.log(4.0) + 1 / 8 - 1 / 2), atol=1e-3)
    assert torch.allclose(gaussian_kl(mean, var, mean, var), torch.zeros(8))

    repaired = DEFENSES.build("bnp", {"u": 2.0}).run(_toy_context(model, x, torch.zeros(64, dtype=torch.long))).model
    scale = repaired[0].weight.detach()
    assert scale[5] == 0 and (scale[torch.arange(8) != 5] == 1).all()  # 7/sqrt(8) = 2.47 std: only 5 exceeds 2


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
    context = _toy_context(model.eval(), x, y)
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
