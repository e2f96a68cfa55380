"""FT-SAM (fine-tuning with sharpness-aware minimisation): its effect on a tiny BadNets model and its loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.ftsam import sam_perturbation, sharpness_aware_loss
from bdbench.errors import ConfigError


def test_ftsam_is_a_model_repair_and_rejects_bad_settings():
    assert DEFENSES.get("ftsam").kind is DefenseKind.MODEL_REPAIR
    for params in [{"rho": -0.1}, {"label_smoothing": 1.0}, {"lr": 0}]:
        with pytest.raises(ConfigError, match="ftsam"):
            DEFENSES.build("ftsam", params)


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    repaired = badnets.repair("ftsam", {})  # the defaults: adaptive SAM, rho 2, 20 epochs
    badnets.check_repair(repaired, effect, 0.3, 0.15)
    assert not repaired.training and all(p.dtype == torch.float32 for p in repaired.parameters())


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
