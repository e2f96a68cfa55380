"""STRIP (Gao, Xu, Wang, Chen, Ranasinghe and Nepal, "STRIP: A Defence Against Trojan Attacks on
Deep Neural Networks", ACSAC 2019).

Superimpose each input with `overlays` (100, the paper's N) clean images drawn from the defender's
budget and average the entropy of the model's predictions over them. A trigger keeps forcing
the target class whatever is blended in, so triggered inputs have low entropy. The
superimposition is the paper's pixel-wise sum, clipped to the image range. Threshold: the paper's
rule, the entropy that rejects `false_rejection` (1%) of the clean budget (each budget image is
scored against overlays drawn from the budget, itself excluded where the budget allows).
The score is the negative entropy, so higher means more suspicious.
"""

from __future__ import annotations

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.scoring import ThresholdDetector, clean_threshold
from bdbench.params import OpenRate, PositiveInt
from bdbench.training import predict_logits


def superimposed_entropy(model: torch.nn.Module, x: torch.Tensor, overlays: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Mean prediction entropy of each uint8 image in `x` summed with each uint8 image of `overlays`."""
    entropies = []
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk].int()
        blended = (xb[:, None] + overlays[None].int()).clamp(0, 255).to(torch.uint8)
        probs = predict_logits(model, blended.flatten(0, 1), batch_size=1024).softmax(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        entropies.append(entropy.view(len(xb), len(overlays)).mean(1))
    return torch.cat(entropies)


@DEFENSES.register("strip")
class Strip(Defense):
    """STRIP (Gao et al. 2019): flag inputs whose predictions stay confident under superimposed clean images."""

    kind = DefenseKind.INPUT_DETECTION
    needs_internals = False  # only queries predictions
    citation = "Gao et al. STRIP: A Defence Against Trojan Attacks on Deep Neural Networks. ACSAC 2019."

    def __init__(self, overlays: PositiveInt = 100, false_rejection: OpenRate = 0.01) -> None:
        self.overlays = overlays
        self.false_rejection = float(false_rejection)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model, budget = context.model, context.clean_x
        generator = context.generator("strip")
        count = min(self.overlays, len(budget))
        overlays = budget[torch.randperm(len(budget), generator=generator)[:count]]
        # Calibrate on the budget: half supplies the overlays, the other half is scored, and back.
        halves = torch.rand(len(budget), generator=generator) < 0.5
        clean_scores = []
        for half in (halves, ~halves):
            pool = budget[~half][torch.randperm(int((~half).sum()), generator=generator)[:count]]
            clean_scores.append(-superimposed_entropy(model, budget[half], pool))
        threshold = clean_threshold(torch.cat(clean_scores), self.false_rejection)

        def score(x: torch.Tensor) -> torch.Tensor:
            return -superimposed_entropy(model, x, overlays)

        return DefenseOutcome(input_detector=ThresholdDetector(score, threshold), threshold=threshold)
