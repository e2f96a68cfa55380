"""The VAE filter that VIF, AIF and FtC share (Do et al., ECCV 2022; `defenses/filtering.py`): shapes and
range, its loss terms, and the filtered model at every deployed precision."""

import math

import pytest
import torch

from bdbench.defenses.filtering import Filtered, VariationalFilter, vae_terms
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
