"""Calibrated Trigger Inversion (CTI, Lukas and Kerschbaum 2023): its objective, its calibration, its threat model,
and its verdicts on the tiny digits models.

The calibration is what CTI adds to trigger inversion, so its effect test gives the inversion a reference model
without the backdoor (the same network trained on clean digits): the backdoor's target then stands out, and a
model calibrated against itself has nothing to find. The full detector calibrates against Pivotal Tuning's repair,
which on the tiny BadNets model keeps the backdoor (ASR 0.98, see test_pt.py), so there CTI has no gap to find
(measured largest statistic 0.31, not the target), and on the benign one its largest statistic falls either side of
the threshold with the CPU's kernels: the full detector's test checks that its verdict follows its statistics.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.cti import calibrated_loss, invert_calibrated_triggers, stamp, success_gaps
from bdbench.errors import ConfigError, NotApplicable


def test_cti_is_a_model_detector_and_checks_its_tuning_parameters_when_built():
    assert DEFENSES.get("cti").kind is DefenseKind.MODEL_DETECTION
    with pytest.raises(ConfigError, match="'epochs'"):
        DEFENSES.build("cti", {"tuning": {"epochs": 0}})


def test_calibrated_loss_pushes_other_classes_to_the_label_and_keeps_the_repair_on_the_truth():
    torch.manual_seed(0)
    deployed, repaired = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    triggers = torch.rand(2, 1, 2, 2) * 0.3
    labels = torch.tensor([1, 2])
    stamped = stamp(x, triggers)
    assert stamped.shape == (2, 4, 1, 2, 2) and stamped.max() <= 1
    loss = calibrated_loss(deployed, repaired, stamped, y, labels, calibration=0.5)
    expected = 0.0
    for row, label in enumerate(labels):
        others = y != label  # an image of the label itself says nothing about a trigger towards it
        towards = F.cross_entropy(deployed(stamped[row][others]), torch.full((int(others.sum()),), int(label)))
        truth = F.cross_entropy(repaired(stamped[row][others]), y[others])
        expected += towards + 0.5 * truth
    assert torch.isclose(loss, torch.as_tensor(expected))


def test_calibration_exposes_the_backdoor_target_and_finds_nothing_against_the_model_itself(badnets, benign, effect):
    context = badnets.context(sees_training_set=False)

    def gaps(reference: nn.Module) -> torch.Tensor:
        triggers = invert_calibrated_triggers(badnets.model, reference, context.clean_x, context.clean_y, 10,
                                              torch.Generator().manual_seed(0), steps=50, lr=0.01, batch_size=64,
                                              calibration=0.5, hflip=False)
        return success_gaps(badnets.model, reference, triggers, context.clean_x, context.clean_y)

    against_clean = gaps(benign.model)
    # Measured: 0.98 for the target, at most 0.50 for the other labels.
    effect.check("target's gap against a backdoor-free reference", against_clean[0], ">", 0.8)
    effect.check("target's gap less the next label's", against_clean[0] - against_clean[1:].max(), ">", 0.25)
    assert torch.equal(gaps(badnets.model), torch.zeros(10, dtype=torch.float64))


def test_cti_sees_only_the_clean_budget(badnets):
    params = {"steps": 3, "tuning": {"epochs": 1}}
    alone = DEFENSES.build("cti", params).detect(badnets.context(sees_training_set=False))
    with_training_set = DEFENSES.build("cti", params).detect(badnets.context(sees_training_set=True))
    assert torch.equal(alone.class_statistics, with_training_set.class_statistics)


def test_cti_verdict_follows_its_statistics_on_the_benign_model(benign):
    """The full detector, Pivotal Tuning's repair included, on the benign digits model. Its largest statistic there
    sits near the threshold and moves with the CPU's kernels (measured 0.28 on AVX-512, 0.61 on AVX2: a false
    alarm, like the one on `model-defenses`' clean victim), so no verdict is asserted; the verdict, the suspect and
    the handed-over repair must follow the statistics the detector reports."""
    _, outcome = benign.defend("cti")
    gaps = outcome.class_statistics
    assert gaps.shape == (10,) and outcome.threshold == 0.5 and gaps.min() >= -1 and gaps.max() <= 1
    assert outcome.anomaly_index == gaps.max()
    assert outcome.detected == bool(gaps.max() > 0.5)
    assert outcome.suspected_targets == ((int(gaps.argmax()),) if outcome.detected else ())
    assert (outcome.model is not None) == outcome.detected


def test_cti_without_a_reference_within_pivotal_tunings_budget_is_not_applicable(badnets):
    # At lr 10 with no halving Pivotal Tuning wrecks the model, declines, and CTI has nothing to calibrate against.
    cti = DEFENSES.build("cti", {"steps": 3, "tuning": {"epochs": 1, "lr": 10.0, "backoffs": 0}})
    with pytest.raises(NotApplicable, match="no reference to calibrate against"):
        cti.run(badnets.context(sees_training_set=False))
