"""MM-BD (maximum-margin backdoor detection) on tiny poisoned and benign digits models."""

import numpy as np
import torch
from torch import nn

from bdbench.defenses import DefenseKind
from bdbench.defenses.mmbd import max_margins, max_statistic_p_value


def test_mmbd_finds_the_target_of_a_backdoored_model_and_ranks_a_benign_one_far_below(badnets, benign, effect):
    defense, backdoored = badnets.defend("mmbd")
    _, clean = benign.defend("mmbd")
    assert defense.kind is DefenseKind.MODEL_DETECTION
    assert backdoored.detected and backdoored.suspected_targets == (0,)
    effect.check("-log10 p of the backdoored model", backdoored.anomaly_index, ">", backdoored.threshold)
    # The benign model is flagged too (class 8, p 2.5e-4 on AVX2 with one thread; 0.004 before the ascent
    # followed univ_bd.py), a false positive of MM-BD on this tiny model (the benign rates on model-defenses
    # measure how often). Nor are the p-values ordered: the gamma fit to nine statistics with shape, location
    # and scale free (univ_bd.py's scipy call) drives the location to the smallest statistic when the fitted
    # shape is below 1, where the likelihood has no maximum, so p moves by orders of magnitude with the
    # statistics' second digit (the backdoored model's p went from 1.8e-6 to 5.6e-4 when the statistics moved
    # by 0.2 at most). What separates the models is the statistic: the target's margin stands about 4 times
    # above the others' median, the benign model's largest under 2 times.
    def spread(outcome):
        statistics = outcome.class_statistics.numpy()
        return statistics.max() / np.median(np.delete(statistics, statistics.argmax()))

    effect.check("largest margin over the others' median, backdoored / benign", spread(backdoored) / spread(clean),
                 ">", 1.5)


def test_mmbd_p_value_of_the_largest_statistic():
    rng = np.random.default_rng(0)
    null = rng.gamma(5.0, 4.0, size=9)
    assert max_statistic_p_value(np.append(null, 200.0)) < 1e-6
    assert max_statistic_p_value(np.append(null, null.max() * 0.99)) > 0.05
    assert max_statistic_p_value(np.array([3.0, 3.0, 3.0, 9.0])) == 0.0


class _Linear(nn.Module):
    """Two logits linear in the image: the margin's gradient is the same everywhere."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_each_step_is_plain_gradient_ascent_at_the_learning_rate():
    # univ_bd.py builds a new SGD(momentum=0.2) at every step, so its momentum buffer starts at the gradient
    # each time and every step moves the images by lr x gradient. On a linear model the margin then grows by
    # lr |d|^2 a step (d: the margin's gradient); the statistic is read at the last of `steps` forward passes,
    # after steps - 1 moves. A momentum carried over would have moved 3.44 lr d in three steps, not 3 lr d.
    weight = torch.tensor([[0.5, -0.5, 0.5, -0.5], [-0.5, 0.5, -0.5, 0.5]])
    restarts, steps, lr = 3, 4, 0.01
    start = torch.rand(2, restarts, 1, 2, 2, generator=torch.Generator().manual_seed(43))
    assert start.min() > 0.05 and start.max() < 0.95  # the images stay inside [0, 1]: no clamping here
    d = weight[0] - weight[1]
    initial = start.flatten(2) @ d
    expected = torch.stack([initial[0].max(), (-initial[1]).max()]) + (steps - 1) * lr * d.square().sum()
    margins = max_margins(_Linear(weight), 2, (1, 2, 2), torch.Generator().manual_seed(43), restarts=restarts,
                          steps=steps, lr=lr)
    assert torch.allclose(margins.float(), expected, atol=1e-5)


class _Bowl(nn.Module):
    """Class 0's logit -scale * sum (x - centre)^2, class 1's 0: class 0's margin peaks at the centre."""

    def __init__(self, scale: float, centre: float) -> None:
        super().__init__()
        self.scale, self.centre = scale, centre
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bowl = -self.scale * (x.flatten(1) - self.centre).square().sum(1)
        return torch.stack([bowl, torch.zeros_like(bowl)], 1)


def test_the_model_sees_the_images_clamped_and_a_pixel_past_a_bound_stays_there():
    # univ_bd.py optimises unconstrained images and feeds the model torch.clamp(images, 0, 1): a pixel that
    # a step carries past 1 is seen as 1 and gets no gradient from then on, so (each step being plain) it
    # stays there. Here the bowl peaks at 0.9 and a step overshoots it by half the way back: every pixel that
    # starts below 0.7 lands beyond 1 after the first step and is held at 1, costing class 0's margin
    # 75 x 0.1^2 = 0.75; those that start above 0.7 settle at 0.9. With 9 pixels, each restart holds some at 1
    # (all 9 above 0.7 has chance 2e-5). Projecting each step onto [0, 1] instead lets the held pixels back:
    # every pixel settles at 0.9 and the margin reaches 0.
    margins = max_margins(_Bowl(75.0, 0.9), 2, (1, 3, 3), torch.Generator().manual_seed(0), restarts=4, steps=60,
                          lr=0.01)
    assert margins[0] < -0.7


def test_the_statistic_is_the_largest_margin_among_the_restarts_at_the_last_step():
    # univ_bd.py reads its statistic from the outputs of the last forward pass it ran, not the best seen on the
    # way. Here every step overshoots the bowl's peak (0.5) by half again, so class 0's margin falls at each
    # step until the pixels are carried past 0 or 1 and held at the bound, each then costing 125 x 0.5^2:
    # about -281 for 9 pixels at the last step, where the best margin on the way is the first (for the best of
    # four uniform restarts, -107 to -25 in 98% of 100,000 draws, and below -140 in none).
    margins = max_margins(_Bowl(125.0, 0.5), 2, (1, 3, 3), torch.Generator().manual_seed(0), restarts=4, steps=60,
                          lr=0.01)
    assert margins[0] < -200


class _Constant(nn.Module):
    """Logits (value, 0) for every image, whatever the image; records the number of images in each pass."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.unused = nn.Parameter(torch.zeros(1))
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(len(x))
        return x.flatten(1).sum(1, keepdim=True) * 0 + torch.tensor([self.value, 0.0])


def test_a_class_stops_as_the_reference_does_from_its_first_step():
    # univ_bd.py stops a class once its loss (minus the summed margin) changes by less than a relative 1e-5 in a
    # step, starting from a previous loss of 1000: a class whose restarts' margins sum to -1000 stops after its
    # first step, one whose margins sum to +1000 after its second (its loss is then unchanged).
    model = _Constant(-250.0)
    max_margins(model, 2, (1, 2, 2), torch.Generator().manual_seed(0), restarts=4, steps=10)
    assert model.passes == [8, 4]
