"""STRIP, a run-time input detector: its superimposition, entropy and boundary as the paper and its authors'
script define them, and its effect on a tiny BadNets model."""

from statistics import NormalDist

import pytest
import torch
from torch import nn

from bdbench.defenses import strip
from bdbench.defenses.strip import Strip
from bdbench.errors import ConfigError

from defense_fixtures import toy_context


class Brightness(nn.Module):
    """Two-class logits (mean pixel value, 0) of float images; remembers the brightest pixel it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.brightest = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.brightest = max(self.brightest, float(x.max()))
        return torch.stack([x.mean((1, 2, 3)), torch.zeros(len(x))], 1)


def bits(p: float) -> float:
    return -sum(q * torch.tensor(q).log2().item() for q in (p, 1 - p))


def test_strip_sums_images_without_clipping_and_measures_entropy_in_bits():
    # The authors' script adds float images in [0, 1] with cv2.addWeighted(x, 1, overlay, 1, 0), which does not
    # saturate floats: 200 + 200 reaches the model as 400 / 255. Eq. 2 takes the entropy in bits.
    model = Brightness()
    budget = torch.full((4, 1, 4, 4), 200, dtype=torch.uint8)
    outcome = Strip(overlays=3).run(toy_context(model, budget, torch.zeros(4, dtype=torch.long), num_classes=2))
    scores, _ = outcome.input_detector(torch.full((2, 1, 4, 4), 200, dtype=torch.uint8))
    assert model.brightest == pytest.approx(400 / 255)
    expected = bits(torch.tensor([400 / 255, 0.0]).softmax(0)[0].item())
    assert scores.tolist() == pytest.approx([-expected, -expected], rel=1e-5)


def test_strip_clipped_sum_saturates_at_the_image_maximum():
    model = Brightness()
    budget = torch.full((4, 1, 4, 4), 200, dtype=torch.uint8)
    outcome = Strip(overlays=3, superimposition="clipped_sum").run(
        toy_context(model, budget, torch.zeros(4, dtype=torch.long), num_classes=2))
    scores, _ = outcome.input_detector(torch.full((1, 1, 4, 4), 200, dtype=torch.uint8))
    assert model.brightest == pytest.approx(1.0)
    assert scores.item() == pytest.approx(-bits(torch.tensor([1.0, 0.0]).softmax(0)[0].item()), rel=1e-5)


def test_strip_draws_fresh_overlays_for_every_input():
    # Algorithm 1 draws the N overlays for each incoming input; one fixed set would give copies one score.
    budget = torch.arange(40, dtype=torch.uint8).mul(6).view(40, 1, 1, 1).expand(40, 1, 4, 4).contiguous()
    outcome = Strip(overlays=5).run(toy_context(Brightness(), budget, torch.zeros(40, dtype=torch.long),
                                                num_classes=2))
    scores, _ = outcome.input_detector(torch.full((10, 1, 4, 4), 30, dtype=torch.uint8))
    assert len(set(scores.tolist())) > 1


def test_strip_boundary_is_the_normal_percentile_of_clean_entropies(monkeypatch):
    # Sec. 5.3: fit a normal to the clean entropies and take its 1% percentile (the authors' norm.fit, norm.ppf).
    # The stand-in entropy is each image's first pixel / 100, skewed so that the empirical 1% quantile differs.
    values = torch.tensor([0] * 3 + [150] * 40 + [160] * 40 + [250] * 17, dtype=torch.uint8)
    budget = values.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    monkeypatch.setattr(strip, "superimposed_entropy", lambda model, x, *args, **kwargs: x[:, 0, 0, 0].double() / 100)
    context = toy_context(Brightness(), budget, torch.zeros(len(values), dtype=torch.long), num_classes=2)
    entropies = values.double() / 100
    normal = NormalDist(float(entropies.mean()), float(entropies.std(correction=0))).inv_cdf(0.01)
    assert Strip().run(context).threshold == pytest.approx(-normal)
    assert Strip(boundary="quantile").run(context).threshold == pytest.approx(
        -float(torch.quantile(entropies, 0.01)))


def test_strip_refuses_a_single_image_budget_naming_the_setting_to_raise():
    budget = torch.zeros((1, 1, 4, 4), dtype=torch.uint8)
    with pytest.raises(ConfigError, match="at least 2 clean budget images.*clean_budget.per_class"):
        Strip().run(toy_context(Brightness(), budget, torch.zeros(1, dtype=torch.long), num_classes=2))


def test_strip_normal_boundary_can_fall_below_zero():
    # The paper's Table 3 footnote: with clean entropies piled up near 0 the boundary is negative and rejects nothing.
    assert strip.entropy_boundary(torch.tensor([0.0, 0.0, 0.01, 0.5]), 0.01) < 0


def test_strip_separates_triggered_inputs_at_its_clean_false_rejection_rate(badnets, effect):
    # On this 8x8 digits model the unclipped sum pushes clean entropies towards 0 (budget mean 0.21 bits, sd 0.15):
    # the paper's normal boundary falls below 0 and flags nothing, while the ranking still separates (AUROC 1.000).
    _, fpr, tpr, auroc = badnets.screen_inputs("strip", overlays=30)
    effect.check("AUROC", auroc, ">=", 0.95)
    effect.check("FPR", fpr, "<=", 0.1)
    # At the budget's empirical 1% quantile (the second-lowest of 150 entropies) the separation shows in the flags.
    _, fpr, tpr, _ = badnets.screen_inputs("strip", overlays=30, boundary="quantile")
    effect.check("TPR at the quantile boundary", tpr, ">=", 0.9)
    effect.check("FPR at the quantile boundary", fpr, "<=", 0.1)
