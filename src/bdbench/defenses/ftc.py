"""Filtering-then-Contrasting, FtC (Do, Harikumar, Le, Nguyen, Tran, Rana, Nguyen, Susilo and Venkatesh,
"Towards Effective and Robust Neural Trojan Defenses via Input Filtering", ECCV 2022).

Filtering every input costs clean accuracy wherever the filter blurs what the classifier needs.
FtC keeps the deployed model's own prediction and uses the filter only as a witness: an input whose
prediction changes once filtered (argmax C(F(x)) != argmax C(x)) is flagged as triggered, any other
is answered with C(x), so clean accuracy is the deployed model's. It is an input detector, scored
like STRIP by its flag rates on clean and triggered test images.

The flag is the paper's rule, so there is no threshold to set. For a ranking (AUROC) each input
also gets a score: one minus the probability the filtered classifier gives to the unfiltered
prediction (ours; it is above 1/2 wherever the filtered prediction differs with a clear margin).
The filter is VIF's (`filter: vif`, the default) or AIF's (`filter: aif`), trained with the
settings given here; AIF's own extra settings keep their defaults.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from bdbench.defenses.aif import AdversarialInputFiltering
from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.vif import CITATION, VariationalInputFiltering
from bdbench.params import BatchSize, NonNegativeFloat, PositiveFloat, PositiveInt
from bdbench.training import predict_logits


class PredictionContrast:
    """The FtC input detector: flags images whose predicted class under `filtered` differs from `model`'s."""

    def __init__(self, model: nn.Module, filtered: nn.Module, device: torch.device) -> None:
        self.model, self.filtered, self.device = model, filtered, device

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plain = predict_logits(self.model, x, device=self.device).argmax(1)
        filtered = predict_logits(self.filtered, x, device=self.device).softmax(1)
        scores = 1 - filtered.gather(1, plain[:, None]).squeeze(1)
        return scores.double(), filtered.argmax(1) != plain


@DEFENSES.register("ftc")
class FilteringThenContrasting(Defense):
    """FtC (Do et al. 2022): flag an input when filtering it changes the deployed model's prediction."""

    kind = DefenseKind.INPUT_DETECTION
    citation = CITATION

    def __init__(self, filter: Literal["vif", "aif"] = "vif", steps: PositiveInt = 2000, batch_size: BatchSize = 64,
                 lr: PositiveFloat = 1e-3, latent_dim: PositiveInt = 64, width: PositiveInt = 32,
                 kl_weight: NonNegativeFloat = 0.1, ce_weight: NonNegativeFloat = 1.0) -> None:
        family = VariationalInputFiltering if filter == "vif" else AdversarialInputFiltering
        self.filter = family(steps=steps, batch_size=batch_size, lr=lr, latent_dim=latent_dim, width=width,
                             kl_weight=kl_weight, ce_weight=ce_weight)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        filtered = self.filter.fit_filter(context)
        return DefenseOutcome(input_detector=PredictionContrast(context.model, filtered, context.device))
