"""BNP (pruning by the BatchNorm statistics' divergence)."""

import math

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseContext
from bdbench.defenses.bnp import gaussian_kl, preactivation_divergences
from bdbench.errors import ConfigError, NotApplicable
from bdbench.models import create_model, with_normalization

from defense_fixtures import poisoned_digits, toy_context


@pytest.fixture(scope="module")
def badnets15(digits):
    # BNP's signal is how far the poisoned share of the training set pulls a backdoor neuron's running
    # statistics. At the other repair tests' 10% the backdoor neurons' divergences stand 2.4 to 2.8 std above
    # their layers' means (16 and 32 neurons a layer), so the paper's u = 3 prunes nothing; at 15% they
    # can stand out, and the paper's default is what is tested.
    return poisoned_digits(digits, "badnets", {"patch_size": 2}, 0.15)


def test_bnp_with_the_paper_default_keeps_clean_accuracy(badnets15, effect):
    repaired = badnets15.repair("bnp", {})
    (clean_before, asr_before), (clean_after, _) = badnets15.scores(badnets15.model), badnets15.scores(repaired)
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
        bnp.run(toy_context(vit, context.clean_x[:8], context.clean_y[:8]))
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
        model[0].bias.fill_(0.5)  # a shift that zeroing would change
    eps = model[0].eps
    (layer, divergence), = preactivation_divergences(model, x, 0, False, torch.Generator())
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (var + eps).sqrt()),
                                                 torch.distributions.Normal(model[0].running_mean,
                                                                            (model[0].running_var + eps).sqrt()))
    assert layer is model[0] and torch.allclose(divergence, expected, atol=1e-5)
    assert torch.allclose(divergence[5], torch.tensor(2.0), atol=1e-3)  # (2 std)^2 / 2
    assert torch.allclose(divergence[2], torch.tensor(0.5 * math.log(4.0) + 1 / 8 - 1 / 2), atol=1e-3)
    assert torch.allclose(gaussian_kl(mean, var, mean, var), torch.zeros(8))

    repaired = DEFENSES.build("bnp", {"u": 2.0}).run(toy_context(model, x, torch.zeros(64, dtype=torch.long))).model
    scale = repaired[0].weight.detach()
    assert scale[5] == 0 and (scale[torch.arange(8) != 5] == 1).all()  # 7/sqrt(8) = 2.47 std: only 5 exceeds 2
    # The authors' code zeroes the BatchNorm weight only (BackdoorBench zeroes the bias too): the shift stays.
    assert torch.equal(repaired[0].bias.detach(), model[0].bias.detach())


def test_bnp_pools_the_moments_over_every_batch_of_the_budget():
    # More images than one forward pass takes (256): the moments are those of all of them, not of the last
    # batch (which is what BackdoorBench's BatchNorm keeps when it is run over several batches).
    torch.manual_seed(1)
    x = torch.randint(0, 256, (300, 4, 2, 2), dtype=torch.uint8)
    x[256:] //= 4  # the last batch is darker than the rest
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2)).eval()
    (layer, divergence), = preactivation_divergences(model, x, 0, False, torch.Generator())
    pixels = x.double().div(255).transpose(0, 1).reshape(4, -1)
    expected = gaussian_kl(pixels.mean(1).float(), pixels.var(1).float() + layer.eps, layer.running_mean,
                           layer.running_var + layer.eps)
    assert torch.allclose(divergence, expected, atol=1e-5)
