"""SCALE-UP (Guo, Li, Chen, Guo, Sun and Liu, "SCALE-UP: An Efficient Black-box Input-level Backdoor
Detection via Analyzing Scaled Prediction Consistency", ICLR 2023).

Multiplying a triggered image's pixel values (then clipping) keeps the backdoor's prediction,
while clean images drift to other classes. The scaled prediction consistency SPC(x) is the
share of amplified copies (factors 3, 5, 7, 9, 11) predicted as x itself is. As in the paper's
data-limited setting, SPC is standardised with the mean and standard deviation of the clean
budget's SPC for the predicted class, so that classes that are naturally scale-stable do not
raise alarms. Threshold: the clean budget's standardised SPC at a `false_rejection` rate of 5%.

Beside the authors' two implementations:
- BackdoorBox's `core/defenses/SCALE_UP.py` (maintained by the second author) uses the same
  factors and clipping but standardises with one mean and standard deviation over all of its
  benign samples (their SPC taken against their true labels), and flags a standardised SPC at or
  above a fixed T = 0.5. Ours keeps per-class statistics and sets the threshold on the budget.
- The paper's repository (github:JunfengGo/SCALE-UP, `torch_model_wrapper.py`, `test.py`) adds
  uniform noise of amplitude 0.02 to every input, scales by every integer 1..11 and reports AUROC
  of the unstandardised share agreeing with the factor-1 prediction; we use neither the noise nor
  the even factors.
"""

from __future__ import annotations

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.scoring import ThresholdDetector, clean_threshold
from bdbench.params import OpenRate
from bdbench.training import predict

_FACTORS = (3, 5, 7, 9, 11)


def scaled_consistency(model: torch.nn.Module, x: torch.Tensor, factors: tuple[int, ...] = _FACTORS
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(SPC, predicted class) of uint8 images: the share of amplified copies keeping the prediction."""
    base = predict(model, x)
    same = torch.zeros(len(x))
    for factor in factors:
        scaled = (x.int() * factor).clamp(0, 255).to(torch.uint8)
        same += (predict(model, scaled) == base).float()
    return same / len(factors), base


@DEFENSES.register("scaleup")
class ScaleUp(Defense):
    """SCALE-UP (Guo et al. 2023): flag inputs whose prediction survives pixel-value amplification."""

    kind = DefenseKind.INPUT_DETECTION
    needs_internals = False  # only queries predictions
    citation = ("Guo, Li, Chen, Guo, Sun, Liu. SCALE-UP: An Efficient Black-box Input-level Backdoor Detection "
                "via Analyzing Scaled Prediction Consistency. ICLR 2023.")

    def __init__(self, false_rejection: OpenRate = 0.05) -> None:
        self.false_rejection = float(false_rejection)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = context.model
        spc, predicted = scaled_consistency(model, context.clean_x)
        mean = torch.full((context.num_classes,), float(spc.mean()))
        std = torch.full((context.num_classes,), float(spc.std()) if len(spc) > 1 else 1.0)
        for label in predicted.unique():
            members = spc[predicted == label]
            mean[label] = members.mean()
            if len(members) > 1:
                std[label] = members.std()
        std = std.clamp_min(0.05)  # SPC is a share of 5 copies; a class where all agree has std 0

        def score(x: torch.Tensor) -> torch.Tensor:
            values, classes = scaled_consistency(model, x)
            return (values - mean[classes]) / std[classes]

        threshold = clean_threshold((spc - mean[predicted]) / std[predicted], self.false_rejection)
        return DefenseOutcome(input_detector=ThresholdDetector(score, threshold), threshold=threshold)
