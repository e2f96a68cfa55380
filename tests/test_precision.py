"""Deployed precisions: agreement with FP32, what each one quantizes, the gradient check and the
straight-through twin, and the runner's handling of both orders and of models it cannot defend."""

import pandas as pd
import pytest
import torch
from torch import nn

from bdbench import run_grid
from bdbench.models import create_model, with_normalization
from bdbench.precision import PRECISIONS, Deployed, Precision, passes_input_gradient
from bdbench.training import TrainConfig, predict, train

AGREEMENT = {"fp32": 1.0, "int8-dynamic": 0.97, "int8-static": 0.95, "int8-sim": 0.97, "int4-sim": 0.8,
             "int4-sim-tensor": 0.6}


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = with_normalization(create_model("cnn-small", 10, 1, 8, width=16), digits.mean, digits.std)
    return train(model, digits.x_train, digits.y_train, TrainConfig(epochs=8, batch_size=64), seed=0, crop_padding=1)


def _deploy(name, model, digits) -> Deployed:
    return PRECISIONS.get(name).deploy(model, digits.x_train[:200])


@pytest.mark.parametrize("name", sorted(AGREEMENT))
def test_each_precision_agrees_with_fp32_on_clean_data(name, trained, digits, effect):
    deployed = _deploy(name, trained, digits)
    reference = predict(trained, digits.x_test)
    agreement = (predict(deployed.model, digits.x_test) == reference).float().mean().item()
    effect.check("agreement with fp32", agreement, ">=", AGREEMENT[name])
    assert (deployed.quantized_layers == "none") == (name == "fp32")
    # The trained model itself is never changed.
    assert torch.equal(predict(trained, digits.x_test), reference)


def test_int8_dynamic_quantizes_only_linear_layers_and_blocks_input_gradients(trained, digits, effect):
    deployed = _deploy("int8-dynamic", trained, digits)
    assert deployed.quantized_layers == "Linear x2"
    assert any(type(m) is nn.Conv2d for m in deployed.model.modules())  # convolutions stay FP32
    x = digits.x_test[:8].float() / 255
    assert passes_input_gradient(trained, x)
    assert not passes_input_gradient(deployed.model, x)
    twin = deployed.twin
    assert passes_input_gradient(twin, x)
    served = dict(deployed.model.named_modules())
    for name, layer in twin.named_modules():
        if isinstance(layer, nn.Linear):
            assert torch.equal(layer.weight, served[name].weight().dequantize())
    twin_agreement = (predict(twin, digits.x_test) == predict(deployed.model, digits.x_test)).float().mean()
    effect.check("agreement with the twin", twin_agreement, ">=", 0.97)


def test_int8_static_quantizes_convolutions_and_its_twin_passes_gradients(trained, digits, effect):
    deployed = _deploy("int8-static", trained, digits)
    assert "Conv" in deployed.quantized_layers and "Linear" in deployed.quantized_layers
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in deployed.model.modules())
    x = digits.x_test[:8].float() / 255
    assert not passes_input_gradient(deployed.model, x)
    assert passes_input_gradient(deployed.twin, x)
    twin_agreement = (predict(deployed.twin, digits.x_test) == predict(deployed.model, digits.x_test)).float().mean()
    effect.check("agreement with the twin", twin_agreement, ">=", 0.95)


@pytest.mark.parametrize("name, bits", [("int8-sim", 8), ("int4-sim", 4)])
def test_sim_precisions_fold_batchnorm_and_round_each_output_channel(name, bits, trained, digits):
    deployed = _deploy(name, trained, digits)
    assert deployed.twin is None and passes_input_gradient(deployed.model, digits.x_test[:4].float() / 255)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.model.modules())  # conv -> BN: folded
    layers = [m for m in deployed.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert deployed.quantized_layers == f"Conv2d x{sum(isinstance(m, nn.Conv2d) for m in layers)}, Linear x2"
    for layer in layers:
        for channel in layer.weight.detach().flatten(1):
            assert len(channel.unique()) <= 2 ** bits


def test_sim_precision_keeps_batchnorm_that_follows_no_convolution(digits):
    # Pre-activation blocks put BatchNorm before the convolution: nothing to fold it into.
    model = with_normalization(create_model("preact-resnet18", 10, 1, 8, width=0.125), digits.mean, digits.std).eval()
    deployed = _deploy("int8-sim", model, digits)
    kept = sum(isinstance(m, nn.BatchNorm2d) for m in deployed.model.modules())
    assert 0 < kept < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_int4_sim_tensor_rounds_every_weight_tensor_to_16_levels_and_keeps_biases(trained, digits):
    deployed = _deploy("int4-sim-tensor", trained, digits)
    convs = sum(isinstance(m, nn.Conv2d) for m in trained.modules())
    assert deployed.quantized_layers == f"BatchNorm2d x{convs}, Conv2d x{convs}, Linear x2"
    original = dict(trained.named_parameters())
    for name, parameter in deployed.model.named_parameters():
        if name.endswith("weight"):
            assert len(parameter.unique()) <= 16
            assert not torch.equal(parameter, original[name])
        else:
            assert torch.equal(parameter, original[name])  # biases untouched


def _blocked(model, calibration_x):
    """A precision whose model passes no input gradient and has no twin (like a compiled binary)."""
    class Detached(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.detach()).detach()

    return Deployed(Detached(PRECISIONS.get("fp32").deploy(model, calibration_x).model), "test")


@pytest.fixture
def blocked_precision():
    PRECISIONS.register("blocked-test", "no gradient, no twin")(Precision("no gradient, no twin", _blocked))
    yield
    PRECISIONS.unregister("blocked-test")


def test_runner_hands_the_twin_to_gradient_defenses_and_the_deployed_model_to_black_box_ones(
        tmp_path, tiny_grid, blocked_precision, effect):
    tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}],
                     defenses=[{"name": "ft", "epochs": 2}, "strip"],
                     precisions=["fp32", "int8-dynamic", "blocked-test"])
    rows = run_grid(tiny_grid, out=tmp_path, progress=False).set_index(["defense", "precision"])
    fp32, dynamic = rows.loc[("ft", "fp32")], rows.loc[("ft", "int8-dynamic")]
    assert fp32.status == dynamic.status == "ok"
    assert pd.isna(fp32.proxy) and dynamic.proxy == "ste" and dynamic.quantized_layers == "Linear x2"
    effect.check("ASR before", dynamic.asr_before, ">", 0.9)
    effect.check("ASR drop, measured as deployed", dynamic.asr_before - dynamic.asr, ">", 0)
    assert pd.isna(rows.loc[("strip", "int8-dynamic")].proxy)  # only queries predictions
    assert rows.loc[("strip", "int8-dynamic")].status == "ok"
    blocked = rows.loc[("ft", "blocked-test")]
    assert blocked.status == "not_applicable" and "input gradients" in blocked.error
    assert rows.loc[("strip", "blocked-test")].status == "ok"


def test_defend_then_quantize_repairs_in_fp32_and_measures_the_deployed_model(tmp_path, tiny_grid, effect):
    tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}], defenses=[{"name": "ft", "epochs": 2}],
                     precisions=["fp32", "int8-static"], precision_order="defend_then_quantize")
    rows = run_grid(tiny_grid, out=tmp_path, progress=False).set_index("precision")
    assert set(rows.status) == {"ok"}
    static = rows.loc["int8-static"]
    assert static.precision_order == "defend_then_quantize" and pd.isna(static.proxy)
    assert rows.loc["fp32"].precision_order == "quantize_then_defend"  # the same experiment at fp32
    # measured on the int8 model
    effect.check("clean accuracy, int8 against fp32", abs(static.clean_acc - rows.loc["fp32"].clean_acc), "<", 0.05)
