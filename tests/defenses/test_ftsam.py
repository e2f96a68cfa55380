"""FT-SAM (fine-tuning with sharpness-aware minimisation): its effect on a tiny BadNets model and its loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.ftsam import sam_perturbation, sharpness_aware_loss, smoothed_cross_entropy
from bdbench.errors import ConfigError

from defense_fixtures import grid_defense


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


def _authors_smoothed_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The authors' objective written out by hand: KL divergence from targets with 1 - s on the true class and
    s / (K - 1) on each other class, summed over classes, averaged over the batch."""
    k = logits.shape[1]
    target = torch.full_like(logits, smoothing / (k - 1))
    target[torch.arange(len(y)), y] = 1.0 - smoothing
    return (target * (target.log() - logits.log_softmax(1))).sum(1).mean()


def test_defense_trains_on_the_authors_label_smoothing(monkeypatch):
    # Capture the objective the defense hands to the trainer; at rho 0 it is the smoothed loss at w itself.
    import bdbench.defenses.ftsam as ftsam

    captured = {}

    def fake_fine_tune(context, model, x, y, **settings):
        captured.update(settings)
        return model

    monkeypatch.setattr(ftsam, "fine_tune", fake_fine_tune)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 10)).train()
    context = type("Context", (), {"model": model, "device": torch.device("cpu"), "clean_x": None, "clean_y": None})
    DEFENSES.build("ftsam", {"rho": 0.0, "label_smoothing": 0.1}).run(context)
    x, y = torch.randn(6, 3), torch.tensor([0, 3, 9, 1, 1, 5])
    trained = copy.deepcopy(model)
    captured["loss_fn"](trained, x, y).backward()
    reference = copy.deepcopy(model)
    _authors_smoothed_loss(reference(x), y, 0.1).backward()
    for p, q in zip(trained.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_smoothed_cross_entropy_keeps_one_minus_s_on_the_true_class():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], requires_grad=True)
    y = torch.tensor([2])
    loss = smoothed_cross_entropy(logits, y, 0.3)
    # d loss / d logits = softmax - target, target = [0.1, 0.1, 0.7, 0.1].
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(grad, logits.detach().softmax(1) - torch.tensor([[0.1, 0.1, 0.7, 0.1]]), atol=1e-6)
    # PyTorch's label_smoothing at s K / (K - 1) is the same target, so the same loss.
    assert torch.allclose(loss, F.cross_entropy(logits, y, label_smoothing=0.3 * 4 / 3))
    assert torch.allclose(smoothed_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))
    # Soft labels are smoothed alike: a one-hot distribution gives the loss of its index.
    assert torch.allclose(smoothed_cross_entropy(logits, F.one_hot(y, 4).float(), 0.3), loss)


@pytest.mark.parametrize("grid, settings", [
    ("fidelity-cifar10", {"epochs": 100, "batch_size": 256, "rho": 2.0, "label_smoothing": 0.1}),
    ("fidelity-gtsrb", {"epochs": 50, "batch_size": 256, "rho": 8.0, "label_smoothing": 0.0})])
def test_fidelity_grids_run_ftsam_at_the_authors_settings_for_their_data_set(grid, settings):
    # BackdoorBench's config/defense/ft-sam/{cifar10,gtsrb}.yaml: GTSRB has its own rho, smoothing and length.
    defense = grid_defense(grid, "ftsam")
    assert {key: getattr(defense, key) for key in settings} == settings
    assert defense.adaptive and defense.lr == 0.01 and defense.weight_decay == 5e-4
