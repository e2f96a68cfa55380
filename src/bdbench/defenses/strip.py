"""STRIP (Gao, Xu, Wang, Chen, Ranasinghe and Nepal, "STRIP: A Defence Against Trojan Attacks on
Deep Neural Networks", ACSAC 2019).

A trigger keeps forcing the target class whatever is blended into the input, so a triggered
input's predictions under strong perturbation have low entropy. For each input, `overlays` (N,
100 in the paper's Sec. 5.2) clean images are drawn at random from the defender's budget, afresh
for every input (Algorithm 1, lines 3-6); each is superimposed on the input, and the score is the
normalised entropy H = (1/N) sum_n H_n, H_n = -sum_i y_i log2 y_i over the M classes (Eqs. 2-4).
The detector's score is -H, so higher means more suspicious.

Superimposition: the pixel-wise sum of the two images, not clipped to the image range (pixel
values up to twice the maximum reach the model). The paper names cv2.addWeighted with both
weights 1; its authors' released script (github:garrisongys/STRIP, the CIFAR-10 notebook's
`superimpose`) applies it to float images in [0, 1], where OpenCV does not saturate, and
BackdoorBench's `detection_infer/strip.py` adds the normalised tensors likewise.
`superimposition="clipped_sum"` saturates at the image maximum instead (cv2.addWeighted on
uint8 images); on the 8x8 digits test model this alone moved the AUROC on Blended from 0.34 to
0.75, so it is a different detector, kept as an option and not the default. A quantised
deployment may clip its inputs to the range it was calibrated on, whatever is chosen here.

Threshold (Sec. 5.3): the defender fits a normal distribution to the entropies of clean inputs
and takes its `false_rejection` (1%) percentile, mu + sigma * Phi^-1(FRR), as the detection
boundary; an input whose entropy falls below it is flagged. This is the authors' notebook
(`scipy.stats.norm.fit`, maximum-likelihood sigma, then `norm.ppf(0.01)`) and ART's STRIP. Where
the clean entropies pile up near zero the boundary can fall below 0 and nothing is flagged: the
paper's Table 3 footnote reports exactly this. `boundary="quantile"` takes the empirical
`false_rejection` quantile of the clean entropies instead (BackdoorBench's choice), which holds
the budget's false rejection rate at the nominal value whatever the shape. Measured on GTSRB's Blended
victim (docs/fidelity.md): the normal boundary flags none of 1,000 triggered inputs, the quantile boundary
99.9% at FPR 0.009, with the same entropies; the clipped sum with the normal boundary flags none either.
Each budget image's clean entropy is measured against N overlays drawn from the rest of the
budget (never itself), the same procedure as for a test input.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Literal

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.scoring import ThresholdDetector, clean_threshold
from bdbench.errors import ConfigError
from bdbench.params import OpenRate, PositiveInt
from bdbench.training import predict_logits

Superimposition = Literal["sum", "clipped_sum"]
Boundary = Literal["normal", "quantile"]


def superimposed_entropy(model: torch.nn.Module, x: torch.Tensor, pool: torch.Tensor, overlays: int,
                         generator: torch.Generator, superimposition: Superimposition = "sum",
                         pool_index: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """STRIP's normalised entropy (in bits) of each uint8 image in `x`: the mean prediction entropy over
    `overlays` images drawn from `pool` without replacement, afresh for each image, and superimposed on it.

    `pool_index[i]`, where given, is the position of `x[i]` in `pool`, which is then never drawn for it."""
    entropies = []
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk]
        draw = torch.rand(len(xb), len(pool), generator=generator)
        if pool_index is not None:
            draw[torch.arange(len(xb)), pool_index[start:start + chunk]] = 2.0  # sorts after every other image
        picks = draw.argsort(1)[:, :overlays]
        blended = xb[:, None].to(torch.int16) + pool[picks].to(torch.int16)  # (n, overlays, C, H, W), up to 510
        if superimposition == "clipped_sum":
            blended = blended.clamp(0, 255)
        probs = predict_logits(model, blended.flatten(0, 1), batch_size=1024).softmax(1)
        entropy = -(probs * probs.clamp_min(1e-12).log2()).sum(1)
        entropies.append(entropy.view(len(xb), overlays).mean(1))
    return torch.cat(entropies)


def entropy_boundary(clean_entropies: torch.Tensor, false_rejection: float, boundary: Boundary = "normal") -> float:
    """The detection boundary on STRIP's entropy (inputs below it are flagged) that rejects `false_rejection` of clean
    inputs: the percentile of a normal fitted to `clean_entropies` (the paper's rule) or their empirical quantile."""
    values = clean_entropies.double().flatten()
    if boundary == "quantile":
        return -clean_threshold(-values, false_rejection)
    mean, sigma = float(values.mean()), float(values.std(correction=0))  # maximum likelihood, as scipy's norm.fit
    if sigma == 0.0:
        return mean
    return NormalDist(mean, sigma).inv_cdf(false_rejection)


@DEFENSES.register("strip")
class Strip(Defense):
    """STRIP (Gao et al. 2019): flag inputs whose predictions stay confident under superimposed clean images."""

    kind = DefenseKind.INPUT_DETECTION
    needs_internals = False  # only queries predictions
    citation = "Gao et al. STRIP: A Defence Against Trojan Attacks on Deep Neural Networks. ACSAC 2019."

    def __init__(self, overlays: PositiveInt = 100, false_rejection: OpenRate = 0.01,
                 superimposition: Superimposition = "sum", boundary: Boundary = "normal") -> None:
        self.overlays = overlays
        self.false_rejection = float(false_rejection)
        self.superimposition: Superimposition = superimposition
        self.boundary: Boundary = boundary

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model, budget = context.model, context.clean_x
        if len(budget) < 2:
            raise ConfigError(f"strip needs at least 2 clean budget images (one to score, one to superimpose), not "
                              f"{len(budget)}: raise clean_budget.per_class or clean_budget.fraction")
        generator = context.generator("strip")
        count = min(self.overlays, len(budget) - 1)  # the calibration leaves each image out of its own overlays
        clean = superimposed_entropy(model, budget, budget, count, generator, self.superimposition,
                                     pool_index=torch.arange(len(budget)))
        threshold = -entropy_boundary(clean, self.false_rejection, self.boundary)

        def score(x: torch.Tensor) -> torch.Tensor:
            return -superimposed_entropy(model, x, budget, count, generator, self.superimposition)

        return DefenseOutcome(input_detector=ThresholdDetector(score, threshold), threshold=threshold)
