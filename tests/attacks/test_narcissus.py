"""Narcissus (clean-label trigger optimised towards the target class)."""

import pytest
import torch
from torch import nn

from bdbench.attacks import ATTACKS, narcissus
from bdbench.attacks.narcissus import optimise_trigger
from bdbench.attacks.public_data import attacker_pool, without_attacker_pool
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.errors import ConfigError

from attack_fixtures import clean_model_asr, hooked_victim, prepared, rates


def _narcissus(digits):
    return prepared("narcissus", digits, pood_epochs=3, finetune_epochs=2, trigger_epochs=20)


def test_narcissus_poisons_target_class_images_only_and_keeps_their_labels(digits):
    attack = _narcissus(digits)
    assert attack.delta.abs().max() <= attack.eps + 1e-6 and attack.delta.abs().max() > 0
    poisoned = attack.poison(digits, 0.0005, 0, torch.Generator().manual_seed(0))
    victim = without_attacker_pool(digits)  # the victim never trains on the attacker's target-class examples
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 1  # 0.05% of the victim's 1,293 images, at least one
    assert (victim.y_train[mask] == 0).all() and torch.equal(poisoned.y, victim.y_train)  # clean label
    assert torch.equal(poisoned.x[mask], attack.trigger(victim.x_train[mask]))
    triggered = attack.triggered_test_set(digits, 0)
    x = digits.x_test[digits.y_test != 0]
    expected = (x.float() / 255 + 3 * attack.delta).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(triggered.x, expected)  # magnified three times at test time
    assert torch.equal(triggered.x_clean, x)  # what PSNR/SSIM and the triggers picture compare against
    with pytest.raises(Exception, match="clean-label"):
        ATTACKS.build("narcissus", {"label_mode": "all2all"})


@pytest.mark.xfail(strict=True, reason=(
    "no class-disjoint public data ships offline: the POOD set for digits is mnist5k's other ten "
    "digits, so the surrogate separates the two scanners, not the target class, and the trigger "
    "does not transfer (measured ASR 0.0 on digits at eps 16, 32 and 48/255); strict, so a working POOD shows up here"))
def test_narcissus_trigger_turns_predictions_towards_the_target(digits):
    attack = _narcissus(digits)
    poisoned = attack.poison(digits, 0.05, 0, torch.Generator().manual_seed(0))
    asr, clean = rates(hooked_victim(digits, poisoned, attack, 10), digits, attack)
    baseline = clean_model_asr(digits, attack, 10)
    assert clean > 0.9 and asr > baseline + 0.3, (asr, baseline, clean)


class _Recorder(nn.Module):
    """A linear classifier over 3x4x4 images that records, per forward pass, its mode and batch size."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(48, 3)
        with torch.no_grad():
            self.linear.weight.mul_(scale)
        self.modes: list[bool] = []
        self.batches: list[int] = []

    def forward(self, x):
        self.modes.append(self.training)
        self.batches.append(len(x))
        return self.linear(x.flatten(1))


def _grey(n: int) -> torch.Tensor:
    return torch.full((n, 3, 4, 4), 128, dtype=torch.uint8)


def _optimise(net, x, epochs, eps=16 / 255):
    return optimise_trigger(net, x, 1, eps, 0.01, epochs, 0, False, torch.Generator().manual_seed(0),
                            torch.device("cpu"))


def test_trigger_synthesis_runs_the_surrogate_in_training_mode_in_batches_of_350():
    # the authors' notebook (ruoxi-jia-group/Narcissus, Narcissus.ipynb) never switches the warmed-up model
    # to eval mode, so BatchNorm normalises with each batch's statistics, and loads 350 images a batch
    net = _Recorder()
    _optimise(net, torch.randint(0, 256, (500, 3, 4, 4), dtype=torch.uint8), 2)
    assert all(net.modes) and net.batches == [350, 150, 350, 150]


def test_trigger_synthesis_steps_with_radam():
    # RAdam's first step is plain momentum (lr x gradient); Adam's would move every pixel by lr
    net = _Recorder(scale=1e-3)
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    delta = torch.zeros(3, 4, 4, requires_grad=True)
    nn.functional.cross_entropy(net(x.float() / 255 + delta), torch.ones(10, dtype=torch.long)).backward()
    assert torch.allclose(_optimise(net, x, 1), -0.01 * delta.grad, atol=1e-9)
    assert _optimise(net, x, 1).abs().max() < 1e-3


class _Reversing(nn.Module):
    """Class 1's logit rises with the brightness of every pixel but the first for the first `turn` passes,
    then falls; the first pixel's pull alternates in sign, so that its gradient never vanishes."""

    def __init__(self, turn: int) -> None:
        super().__init__()
        self.turn, self.calls = turn, 0

    def forward(self, x):
        self.calls += 1
        flat = x.flatten(1) - 0.5  # mid-grey images: no pull at first
        sign = 1.0 if self.calls <= self.turn else -1.0
        score = 10 * (sign * flat[:, 1:].mean(1) + (-1.0) ** self.calls * flat[:, 0])
        return torch.stack([torch.zeros_like(score), score], 1)


def test_trigger_pixels_that_pass_the_bound_stay_there():
    # the authors clamp the perturbation in the forward pass and optimise the unclamped variable, so a pixel
    # pushed past eps gets no gradient and stays at eps however the loss turns later (a projection after each
    # step would let it come back: here to -eps)
    eps = 16 / 255
    delta = _optimise(_Reversing(turn=150), _grey(4), 400, eps)
    assert torch.allclose(delta.flatten()[1:], torch.full((47,), eps))
    assert delta.flatten()[0].abs() < eps


class _FlatAfter(nn.Module):
    """Class 1's logit follows the images' brightness for the first `pulls` passes, then nothing moves it."""

    def __init__(self, pulls: int) -> None:
        super().__init__()
        self.pulls, self.calls = pulls, 0

    def forward(self, x):
        self.calls += 1
        score = x.flatten(1).mean(1) * (1.0 if self.calls <= self.pulls else 0.0)
        return torch.stack([torch.zeros_like(score), score, torch.zeros_like(score)], 1)


def test_trigger_synthesis_stops_once_the_gradient_vanishes():
    # as the authors' loop does (it breaks when the summed absolute gradient of an epoch's last step is 0)
    net = _FlatAfter(pulls=1)
    delta = _optimise(net, _grey(10), 50)
    assert net.calls == 2 and delta.abs().max() > 0


def test_a_surrogate_that_gives_no_gradient_at_all_is_a_one_line_error_not_a_zero_trigger():
    # measured on CIFAR-10: the poi-warm-up saturated the small surrogate (cross-entropy exactly 0 in float32)
    net = _FlatAfter(pulls=0)
    with pytest.raises(ConfigError, match="no gradient.*warmup_epochs: 0"):
        _optimise(net, _grey(10), 50)
    assert net.calls == 1


class _KeyWorkshop(AttackWorkshop):
    """Records the parameters that key the learned trigger, and learns nothing."""

    def learned(self, name, params, build, version=1):
        self.__dict__.setdefault("params", dict(params))
        return {"delta": torch.zeros(1, 8, 8)}


def test_narcissus_keys_its_cached_trigger_by_the_synthesis_version(digits):
    # a trigger cached by an older synthesis must be learned again, not reused
    workshop = _KeyWorkshop(seed=0)
    prepared("narcissus", digits, workshop)
    assert workshop.params["synthesis"] == 4
    assert (workshop.params["warmup_epochs"], workshop.params["warmup_lr"]) == (0, 0.1)  # the warm-up off by default


def test_poi_warm_up_fine_tunes_every_layer_on_the_images_with_radam():
    # the authors' poi-warm-up (Narcissus.ipynb, "Poison warm up"): RAdam at lr 0.1 on every parameter, the
    # target-class images alone; RAdam's first step is plain momentum: -lr x gradient
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    before = [p.detach().clone() for p in net.parameters()]
    nn.functional.cross_entropy(net(x.float() / 255), torch.full((10,), 2)).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    narcissus.poi_warm_up(net, x, 2, 1, 0.1, 0, False, torch.Generator().manual_seed(0), torch.device("cpu"))
    for old, grad, new in zip(before, grads, net.parameters()):
        assert torch.allclose(new.detach(), old - 0.1 * grad, atol=1e-7) and new.requires_grad


def test_narcissus_warms_the_surrogate_up_on_the_attackers_target_images_before_the_trigger(digits, monkeypatch):
    calls, real_warm_up = [], narcissus.poi_warm_up

    def warm_up(net, x, label, epochs, lr, *rest, **options):
        calls.append(("warm_up", x, label, epochs, lr))
        return real_warm_up(net, x, label, epochs, lr, *rest, **options)

    def trigger(net, x, label, *rest, **options):
        calls.append(("trigger", x, label))
        return torch.zeros(x.shape[1:])

    monkeypatch.setattr(narcissus, "poi_warm_up", warm_up)
    monkeypatch.setattr(narcissus, "optimise_trigger", trigger)
    prepared("narcissus", digits, pood_epochs=1, finetune_epochs=1, warmup_epochs=5)
    pool_x, pool_y = attacker_pool(digits)
    (step, x, label, epochs, lr), (after, trigger_x, trigger_label) = calls
    assert step == "warm_up" and after == "trigger" and torch.equal(x, pool_x[pool_y == 0])
    assert torch.equal(trigger_x, x) and label == trigger_label == 10  # mnist5k's digits 1-9, then the target
    assert (epochs, lr) == (5, 0.1)
