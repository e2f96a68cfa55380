"""FtC, filtering-then-contrasting (Do et al., ECCV 2022): an input detector that flags inputs whose prediction
the filter changes, on a hand case and on the tiny digits BadNets model."""

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.filtering import Filtered
from bdbench.defenses.ftc import PredictionContrast
from bdbench.errors import ConfigError


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


def test_ftc_is_an_input_detector_and_rejects_an_unknown_filter():
    assert DEFENSES.get("ftc").kind is DefenseKind.INPUT_DETECTION
    with pytest.raises(ConfigError, match="ftc"):
        DEFENSES.build("ftc", {"filter": "pca"})


def test_ftc_flags_triggered_inputs_and_keeps_the_deployed_model(badnets, effect):
    outcome = DEFENSES.build("ftc", {"steps": 300}).run(badnets.context(sees_training_set=False))
    assert outcome.model is None and outcome.threshold is None  # predictions stay the deployed model's
    _, clean_flags = outcome.input_detector(badnets.dataset.x_test)
    _, triggered_flags = outcome.input_detector(badnets.triggered.x)
    # Measured at 300 steps: TPR 0.99, FPR 0.06 (the clean images whose filtered prediction flips).
    effect.check("TPR", triggered_flags.float().mean(), ">=", 0.9)
    effect.check("FPR", clean_flags.float().mean(), "<=", 0.12)
