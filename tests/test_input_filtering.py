"""Input filtering (Do et al., ECCV 2022): the VAE filter and its loss, FtC's rule on a hand case, and the
effect of VIF, AIF and FtC on the tiny digits BadNets model."""

import math

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.filtering import Filtered, VariationalFilter, vae_terms
from bdbench.defenses.ftc import PredictionContrast
from bdbench.errors import ConfigError
from bdbench.models import create_model
from bdbench.precision import PRECISIONS
from bdbench.training import predict


@pytest.mark.parametrize("channels, side, latent_side", [(1, 8, 4), (1, 28, 4), (3, 32, 4), (3, 5, 3)])
def test_the_filter_reconstructs_images_of_any_side_in_the_unit_range(channels, side, latent_side):
    image_filter = VariationalFilter(channels, side, latent_dim=8, width=4)
    x = torch.rand(5, channels, side, side)
    reconstruction, mean, log_var = image_filter(x)
    assert reconstruction.shape == x.shape and mean.shape == log_var.shape == (5, 8)
    assert float(reconstruction.detach().min()) >= 0 and float(reconstruction.detach().max()) <= 1
    assert image_filter.sides[-1] == latent_side
    # At run time the filter decodes the mean code: the same image is always filtered the same way.
    assert torch.equal(image_filter.purify(x), image_filter.purify(x))
    assert not torch.equal(image_filter(x)[0], image_filter(x)[0])  # training samples the code


def test_vae_terms_are_the_summed_squared_error_and_the_gaussian_kl():
    x = torch.zeros(2, 1, 2, 2)
    reconstruction = torch.full((2, 1, 2, 2), 0.5)
    zeros = torch.zeros(2, 3)
    error, kl = vae_terms(x, reconstruction, zeros, zeros)
    assert error.item() == pytest.approx(4 * 0.25) and kl.item() == pytest.approx(0.0)
    # KL(N(mu, s^2) || N(0, 1)) per dimension = (mu^2 + s^2 - 1 - log s^2) / 2.
    mean, log_var = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, math.log(4.0), 0.0]])
    _, kl = vae_terms(x[:1], reconstruction[:1], mean, log_var)
    assert kl.item() == pytest.approx(0.5 + (4 - 1 - math.log(4)) / 2 + 2.0)


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic", "int8-static", "int8-sim", "int4-sim-tensor"])
def test_the_filtered_model_deploys_at_every_precision_filter_included(precision):
    # The runner deploys a repaired model at the grid's precision; int8-static traces it with torch.fx.
    filtered = Filtered(VariationalFilter(1, 8, latent_dim=4, width=4), create_model("cnn-small", 10, 1, 8, width=4))
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    deployed = PRECISIONS.get(precision).deploy(filtered, images)
    assert predict(deployed.model, images).shape == (6,)
    if precision != "fp32":
        assert "Linear" in deployed.quantized_layers


class _Brighter(nn.Module):
    """A two-class 'classifier' on 1x1x2 images: the brighter pixel is the class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20 * x.flatten(1)


class _DropFirstPixel(nn.Module):
    """A stand-in filter that blanks the first pixel."""

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)


def test_ftc_flags_exactly_the_inputs_whose_prediction_the_filter_changes():
    images = torch.tensor([[200, 10], [10, 200], [150, 60]], dtype=torch.uint8).view(3, 1, 1, 2)
    filtered = Filtered(_DropFirstPixel(), _Brighter())  # type: ignore[arg-type]
    scores, flags = PredictionContrast(_Brighter(), filtered, torch.device("cpu"))(images)
    # Class 0, 1, 0 unfiltered; 1, 1, 1 filtered: the first and the last change, the second does not.
    assert flags.tolist() == [True, False, True]
    assert scores[1] < 0.5 < min(scores[0], scores[2])


def test_kinds_and_bad_settings():
    assert DEFENSES.get("vif").kind is DEFENSES.get("aif").kind is DefenseKind.MODEL_REPAIR
    assert DEFENSES.get("ftc").kind is DefenseKind.INPUT_DETECTION
    for name, params in [("vif", {"steps": 0}), ("vif", {"kl_weight": -1}), ("aif", {"mask_bound": 0}),
                         ("ftc", {"filter": "pca"}), ("aif", {"batch_size": 1})]:
        with pytest.raises(ConfigError, match=name):
            DEFENSES.build(name, params)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, steps", [("vif", 450), ("aif", 300)])
def test_the_filtered_model_loses_the_backdoor_and_keeps_clean_accuracy(name, steps, badnets, effect):
    before = _state(badnets.model)
    outcome = DEFENSES.build(name, {"steps": steps}).run(badnets.context(sees_training_set=False))
    assert all(torch.equal(before[k], v) for k, v in badnets.model.state_dict().items())
    (clean_before, asr_before), (clean_after, asr_after) = badnets.scores(badnets.model), badnets.scores(outcome.model)
    effect.check("ASR before", asr_before, ">", 0.95)
    effect.check("ASR after", asr_after, "<", 0.1)
    # Measured drops from 0.983: 0.028 (VIF, 450 steps) and 0.011 (AIF, 300 steps); AIF at 250 steps dropped
    # 0.053. An 8x8 digit rebuilt through a VAE trained on 150 images loses strokes: the cost FtC avoids.
    effect.check("clean accuracy drop", clean_before - clean_after, "<", 0.08)
    assert isinstance(outcome.model, Filtered) and not outcome.model.training


def test_ftc_flags_triggered_inputs_and_keeps_the_deployed_model(badnets, effect):
    outcome = DEFENSES.build("ftc", {"steps": 300}).run(badnets.context(sees_training_set=False))
    assert outcome.model is None and outcome.threshold is None  # predictions stay the deployed model's
    _, clean_flags = outcome.input_detector(badnets.dataset.x_test)
    _, triggered_flags = outcome.input_detector(badnets.triggered.x)
    # Measured at 300 steps: TPR 0.99, FPR 0.06 (the clean images whose filtered prediction flips).
    effect.check("TPR", triggered_flags.float().mean(), ">=", 0.9)
    effect.check("FPR", clean_flags.float().mean(), "<=", 0.12)
