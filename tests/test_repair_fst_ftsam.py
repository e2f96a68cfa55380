"""Feature Shift Tuning and FT-SAM: their effect on a tiny BadNets model, and the core math of each."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.fst import FeatureShiftObjective
from bdbench.defenses.ftsam import sam_perturbation, sharpness_aware_loss
from bdbench.defenses.layers import classifier_layer
from bdbench.errors import ConfigError


# The paper's 10 epochs of FST (alpha 0.2) lower this ASR by only 0.3-0.4 on a 150-image budget (about
# 40 steps at batch 32, where the paper takes about 80); 20 epochs take it well below. FT-SAM runs with
# its defaults (adaptive SAM, rho 2, 20 epochs).
SETTINGS = {"fst": {"epochs": 20}, "ftsam": {}}


@pytest.fixture(scope="module")
def repaired(badnets):
    """Each defense run once on the BadNets model, checking that the deployed model stays untouched."""
    before = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    models = {name: DEFENSES.build(name, params).run(badnets.context(sees_training_set=False)).model
              for name, params in SETTINGS.items()}
    assert all(torch.equal(before[k], v) for k, v in badnets.model.state_dict().items())
    return models


def test_both_are_model_repairs_and_reject_bad_settings():
    assert DEFENSES.get("fst").kind is DEFENSES.get("ftsam").kind is DefenseKind.MODEL_REPAIR
    for name, params in [("fst", {"alpha": -1}), ("fst", {"epochs": 0}), ("ftsam", {"rho": -0.1}),
                         ("ftsam", {"label_smoothing": 1.0}), ("ftsam", {"lr": 0})]:
        with pytest.raises(ConfigError, match=name):
            DEFENSES.build(name, params)


@pytest.mark.parametrize("name", SETTINGS)
def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(name, badnets, repaired, effect):
    model = repaired[name]
    (clean_before, asr_before), (clean_after, asr_after) = badnets.scores(badnets.model), badnets.scores(model)
    effect.check("ASR before", asr_before, ">", 0.95)
    effect.check("ASR drop", asr_before - asr_after, ">", 0.3)
    effect.check("clean accuracy drop", clean_before - clean_after, "<", 0.15)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


def test_fst_keeps_the_head_norm_and_turns_the_head_away_from_the_original(badnets, repaired):
    original = classifier_layer(badnets.model).weight.detach()
    weight = classifier_layer(repaired["fst"]).weight.detach()
    assert torch.allclose(weight.norm(), original.norm(), rtol=1e-5)
    assert F.cosine_similarity(weight.flatten(), original.flatten(), dim=0) < 0  # alpha * <w, w_ori> was minimised


def test_fst_objective_projects_the_last_step_and_adds_the_inner_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    head = model[1]
    original = torch.randn(3, 4)
    objective = FeatureShiftObjective(head, original, alpha=0.5)
    with torch.no_grad():
        head.weight.mul_(7.0)  # as if an optimiser step had moved it off the sphere
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    loss = objective(model, x, y)
    assert torch.allclose(head.weight.norm(), original.norm())
    expected = F.cross_entropy(head(x.flatten(1)), y) + 0.5 * (head.weight * original).sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    ce_only = copy.deepcopy(model)
    F.cross_entropy(ce_only(x), y).backward()
    assert torch.allclose(head.weight.grad - ce_only[1].weight.grad, 0.5 * original)  # the penalty's gradient


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).train()


@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_loss_gradient_is_the_gradient_at_the_perturbed_weights(adaptive):
    model = _tiny_model()
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    rho = 0.5

    # Reference, computed by hand: g at w, e = rho T^2 g / ||T g|| (T = |w|, or 1 for plain SAM), the
    # gradient of the loss of a copy whose weights are w + e.
    reference = copy.deepcopy(model)
    grads = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
    scales = [p.detach().abs() if adaptive else torch.ones_like(p) for p in reference.parameters()]
    norm = torch.sqrt(sum(((s * g) ** 2).sum() for s, g in zip(scales, grads)))
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p, s, g in zip(perturbed.parameters(), scales, grads):
            p.add_(rho * s * s * g / norm)
    F.cross_entropy(perturbed(x), y).backward()

    stats_before = model[1].running_mean.clone()
    loss = sharpness_aware_loss(rho, adaptive, F.cross_entropy)(model, x, y)
    loss.backward()
    for p, q in zip(model.parameters(), perturbed.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    plain = _tiny_model()
    F.cross_entropy(plain(x), y).backward()
    assert not torch.allclose(model[0].weight.grad, plain[0].weight.grad, atol=1e-3)  # e really moved the point
    # BatchNorm's running statistics moved once (the gradient pass), as one forward pass moves them.
    once = _tiny_model()
    once(x)
    assert not torch.equal(model[1].running_mean, stats_before)
    assert torch.allclose(model[1].running_mean, once[1].running_mean)


def test_adaptive_perturbation_has_radius_rho_in_the_weight_scaled_norm():
    w = [torch.tensor([2.0, -1.0, 0.5]), torch.tensor([[3.0]])]
    g = [torch.tensor([1.0, 1.0, -2.0]), torch.tensor([[0.5]])]
    e = sam_perturbation(w, g, rho=0.3, adaptive=True)
    # T g = [2, -1, -1, 1.5]: ||T g|| = sqrt(8.25); e = 0.3 * w^2 * g / sqrt(8.25).
    assert torch.allclose(e[0], 0.3 * torch.tensor([4.0, 1.0, -0.5]) / 8.25 ** 0.5)
    assert torch.allclose(e[1], 0.3 * torch.tensor([[4.5]]) / 8.25 ** 0.5)
    assert torch.allclose(torch.cat([(ei / wi.abs()).flatten() for ei, wi in zip(e, w)]).norm(), torch.tensor(0.3))
    plain = sam_perturbation(w, g, rho=0.3, adaptive=False)
    assert torch.allclose(torch.cat([p.flatten() for p in plain]).norm(), torch.tensor(0.3))
