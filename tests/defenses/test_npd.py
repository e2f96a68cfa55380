"""Neural Polarizer (NPD): its effect on a tiny BadNets model and its polarizer on hand-made cases."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.adversarial import log_one_minus_softmax
from bdbench.defenses.npd import PolarizedOutput, Polarizer, insert_polarizer, strongest_other_class
from bdbench.errors import ConfigError
from bdbench.precision import PRECISIONS
from bdbench.training import predict, predict_logits


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    assert DEFENSES.get("npd").kind is DefenseKind.MODEL_REPAIR
    # The paper's batch of 128 gives one step per epoch on a 150-image budget (50 steps at lr 0.01
    # leave ASR near 0.6): batch 32 and lr 0.1 for 20 epochs, with 3 PGD steps instead of 10 to keep
    # the test fast (each step already lands on a corner of the eps ball).
    repaired = badnets.repair("npd", {"batch_size": 32, "lr": 0.1, "epochs": 20, "steps": 3})
    # Measured: 0.32 / 0.25 ASR (one / two threads); clean accuracy within 0.04.
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
