"""Neural Polarizer (NPD): its effect on a tiny BadNets model and its polarizer on hand-made cases."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bdbench.defenses import DEFENSES, DefenseKind, npd
from bdbench.defenses.adversarial import log_one_minus_softmax
from bdbench.defenses.npd import (
    PolarizedOutput,
    Polarizer,
    insert_polarizer,
    strongest_other_class,
    targeted_sign_attack,
)
from bdbench.errors import ConfigError
from bdbench.precision import PRECISIONS
from bdbench.training import predict, predict_logits


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    assert DEFENSES.get("npd").kind is DefenseKind.MODEL_REPAIR
    # The paper's batch of 128 gives one step per epoch on a 150-image budget (50 steps at lr 0.01
    # barely move the polarizer): batch 32 and lr 0.1 for 20 epochs, with the code's 2-step L2 adversary.
    repaired = badnets.repair("npd", {"batch_size": 32, "lr": 0.1, "epochs": 20})
    # Measured: 0.22 / 0.41 ASR (one / two threads); clean accuracy within 0.04.
    badnets.check_repair(repaired, effect, 0.3, 0.15)
    assert not repaired.training and all(p.dtype == torch.float32 for p in repaired.parameters())


def test_npd_trains_only_an_identity_initialised_polarizer_that_survives_copying_and_quantization(badnets, effect):
    context = badnets.context(sees_training_set=False)
    images = context.clean_x[:64].float() / 255
    polarized = copy.deepcopy(badnets.model)
    polarizer = insert_polarizer(polarized, images[:2])
    assert sum(isinstance(m, PolarizedOutput) for m in polarized.modules()) == 1
    assert torch.allclose(polarized.eval()(images), badnets.model.eval()(images), atol=1e-4)  # the identity at first

    repaired = DEFENSES.build("npd", {"epochs": 2, "batch_size": 32, "steps": 1}).run(context).model
    # Every weight and BatchNorm statistic of the deployed model is kept (the host module moved under `.inner`);
    # only the polarizer was trained.
    kept = {k.replace(".inner.", "."): v for k, v in repaired.state_dict().items() if ".polarizer." not in k}
    assert kept.keys() == badnets.model.state_dict().keys()
    assert all(torch.equal(v, badnets.model.state_dict()[k]) for k, v in kept.items())
    trained = next(m for m in repaired.modules() if isinstance(m, Polarizer))
    assert not torch.equal(trained.conv.weight, polarizer.conv.weight)

    # A real submodule: deep copies, state dicts and FX quantization keep it.
    twin = copy.deepcopy(badnets.model)
    insert_polarizer(twin, images[:2])
    twin.load_state_dict(copy.deepcopy(repaired).state_dict())
    assert torch.equal(predict_logits(twin, context.clean_x), predict_logits(repaired, context.clean_x))
    int8 = PRECISIONS.get("int8-static").deploy(repaired, context.clean_x).model
    agreement = (predict(int8, context.clean_x) == predict(repaired, context.clean_x)).float().mean()
    effect.check("agreement", agreement, ">", 0.9)


def test_npd_polarizer_on_tokens_acts_on_their_channels():
    polarizer = Polarizer(4, tokens=True)
    with torch.no_grad():
        polarizer.conv.weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])).view(4, 4, 1, 1))
    tokens = torch.randn(2, 5, 4)
    out = polarizer.eval()(tokens)
    assert out.shape == tokens.shape
    assert torch.allclose(out, tokens * torch.tensor([1.0, 2.0, 3.0, 4.0]) / (1 + 1e-5) ** 0.5, atol=1e-6)


def test_npd_target_estimate_and_log_one_minus_probability_on_a_hand_made_case():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 5.0], [100.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    # The estimated target: the highest logit other than the true label.
    assert strongest_other_class(logits, labels).tolist() == [1, 1, 1]
    classes = torch.tensor([0, 2, 0])
    naive = torch.log(1 - F.softmax(logits, 1).gather(1, classes.view(-1, 1)).squeeze(1))
    exact = log_one_minus_softmax(logits, classes)
    assert torch.allclose(exact[:2], naive[:2], atol=1e-6)
    # Where p is 1 in float32 the naive form is -inf; the exact one is log(2 e^0) - 100 (up to e^-100).
    assert naive[2] == float("-inf") and torch.isclose(exact[2], torch.log(torch.tensor(2.0)) - 100.0)


@pytest.mark.parametrize("params", [{"eps": 0.0}, {"bce_weight": -1}])
def test_bad_parameters_raise_a_config_error(params):
    with pytest.raises(ConfigError, match="npd"):
        DEFENSES.build("npd", params)


class _Counted(torch.nn.Module):
    """Two classes on 48 pixels: logit 0 = sum(x), logit 1 = 47.9 - sum(x); counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        total = x.flatten(1).sum(1)
        return torch.stack([total, 47.9 - total], 1)


def test_npd_inner_attack_takes_signed_steps_projected_on_the_l2_ball_as_the_authors_code_does():
    images, target = torch.full((2, 3, 4, 4), 0.5), torch.tensor([1, 1])
    # Towards class 1 the gradient of CE has sign +1 on every pixel: one step is delta = -0.1 (L2 norm
    # 0.1 sqrt(48) = 0.69), scaled back to the radius 0.5; the second step lands on the same point.
    model = _Counted()
    adversarial = targeted_sign_attack(model, images, target, norm="l2", eps=0.5, step_size=0.1, steps=2, stop_rate=1.0)
    delta = adversarial - images
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.tensor([0.5, 0.5]), atol=1e-5)
    assert torch.allclose(delta, torch.full_like(delta, -0.5 / 48 ** 0.5), atol=1e-6)
    assert model.calls == 2  # one forward-backward a step, no check pass when it never stops
    # Within the ball a step is not rescaled: radius 3 keeps the whole -0.1 of each of two steps.
    inside = targeted_sign_attack(_Counted(), images, target, norm="l2", eps=3.0, step_size=0.1, steps=2, stop_rate=1.0)
    assert torch.allclose(inside - images, torch.full_like(images, -0.2), atol=1e-6)
    # The L-infinity branch starts at +eps and clamps: +0.2 - 0.44 = -0.24 -> -0.2.
    linf = targeted_sign_attack(_Counted(), images, target, norm="linf", eps=0.2, step_size=0.44, steps=1,
                                stop_rate=1.0)
    assert torch.allclose(linf - images, torch.full_like(images, -0.2), atol=1e-6)


def test_npd_inner_attack_stops_once_more_than_the_stop_rate_reaches_the_target():
    images, target = torch.full((2, 3, 4, 4), 0.5), torch.tensor([1, 1])
    # At x the model says class 0 (24 > 23.9); after the first step (delta -0.072 a pixel) it says class 1.
    stopping = _Counted()
    targeted_sign_attack(stopping, images, target, norm="l2", eps=0.5, step_size=0.1, steps=5, stop_rate=0.6)
    assert stopping.calls == 2  # the first step's forward-backward and its check, then no more
    running = _Counted()
    targeted_sign_attack(running, images, target, norm="l2", eps=0.5, step_size=0.1, steps=5, stop_rate=1.0)
    assert running.calls == 5


def test_npd_warm_up_fits_the_polarizer_batchnorm_to_the_clean_features_and_the_update_keeps_them(badnets):
    context = badnets.context(sees_training_set=False)
    n = len(context.clean_x)
    # One full batch of the whole budget an epoch, and a main phase too slow to move the convolution.
    repaired = DEFENSES.build("npd", {"warm_epochs": 2, "epochs": 1, "lr": 1e-12, "steps": 1,
                                      "batch_size": n}).run(context).model
    wrapper = next(m for m in repaired.modules() if isinstance(m, PolarizedOutput))
    seen = []
    handle = wrapper.inner.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        repaired.eval()(context.clean_x.float() / 255)
    handle.remove()
    features = wrapper.polarizer.conv(seen[0])
    dims = [0, 2, 3]
    norm = wrapper.polarizer.norm
    mean, var = features.mean(dims), features.var(dims, unbiased=True)
    assert (mean - 0).abs().max() > 0.05 and (var - 1).abs().max() > 0.05  # far from the initial statistics
    assert torch.allclose(norm.running_mean, mean, rtol=1e-3, atol=1e-3)
    assert torch.allclose(norm.running_var, var, rtol=1e-3, atol=1e-3)
    assert norm.momentum == 0.1  # restored after the warm-up's cumulative average


def test_npd_trains_at_a_constant_lr_after_a_warm_up_without_momentum(badnets, monkeypatch):
    calls = []

    def record(context, model, x, y, **settings):
        calls.append(settings)
        return model

    monkeypatch.setattr(npd, "fine_tune", record)
    DEFENSES.build("npd", {}).run(badnets.context(sees_training_set=False))
    warm_up, update = calls
    # BackdoorBench's code: the polarizer's SGD has no scheduler (the config's cosine one is built for an
    # optimiser over the frozen model and never stepped); its warm-up is SGD at 1e-4 without momentum.
    assert update["schedule"] == "constant" and update["lr"] == 0.01 and update["momentum"] == 0.9
    assert warm_up["schedule"] == "constant" and warm_up["lr"] == 1e-4 and warm_up["epochs"] == 5
    assert warm_up["momentum"] == 0.0 and warm_up["weight_decay"] == 0.0
