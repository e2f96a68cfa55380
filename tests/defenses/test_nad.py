"""Neural Attention Distillation (NAD): its effect on a tiny BadNets model and its clean-budget back-off.

The effect tests use a cnn-small of width 16 on 8x8 digits and a clean budget of 150 images, far from the paper's
ResNets on CIFAR with thousands of clean images; where a paper default does nothing or too much at this scale, the
test says which setting it uses and why.
"""

import pytest
import torch
import torch.nn.functional as F

from bdbench.defenses import DEFENSES, DefenseKind, nad
from bdbench.defenses.layers import stage_outputs
from bdbench.defenses.nad import attention_map, map_positions
from bdbench.models import create_model


def test_nad_is_a_model_repair():
    assert DEFENSES.get("nad").kind is DefenseKind.MODEL_REPAIR


def test_scaling_beta_by_the_maps_positions_gives_the_same_loss_on_a_map_twice_as_fine():
    # The same two attention patterns on a 4x4 map and, nearest-upsampled, on the paper's 8x8: the mean squared
    # difference of the normalised maps is 4x larger on 4x4, so beta x positions / 64 weighs both alike.
    student, teacher = torch.rand(2, 3, 8, 4, 4).unbind(0)
    coarse = F.mse_loss(attention_map(student, 2.0), attention_map(teacher, 2.0))
    fine = F.mse_loss(attention_map(F.interpolate(student, scale_factor=2.0), 2.0),
                      attention_map(F.interpolate(teacher, scale_factor=2.0), 2.0))
    assert torch.allclose(5000 * 16 / 64 * coarse, 5000 * 64 / 64 * fine)
    assert not torch.allclose(coarse, fine)


def test_map_positions_of_a_preact_resnets_stages_and_no_statistics_change():
    net = create_model("preact-resnet18", 10, 3, 32, width=0.125).train()
    x = torch.rand(2, 3, 32, 32)
    before = {name: buffer.clone() for name, buffer in net.named_buffers()}
    assert map_positions(net, stage_outputs(net, x, 3), x) == [256, 64, 16]  # layer2..4: 16x16, 8x8, 4x4
    assert net.training and all(torch.equal(before[name], buffer) for name, buffer in net.named_buffers())


@pytest.mark.parametrize("reference, expected", [(64, [0.0, 0.0, 312.5]), (None, [0.0, 0.0, 5000.0])])
def test_nad_distils_with_each_beta_scaled_by_its_maps_positions(badnets, monkeypatch, reference, expected):
    # cnn-small on 8x8 digits: stage maps of 8x8, 4x4 and 2x2; the authors' [0, 0, 5000] at 2x2 is 5000 x 4 / 64.
    distilled_with = []
    real = nad.distillation_loss

    def recording(teacher, layers, betas, power):
        distilled_with.append(betas)
        return real(teacher, layers, betas, power)

    monkeypatch.setattr(nad, "distillation_loss", recording)
    badnets.repair("nad", {"teacher_epochs": 1, "epochs": 1, "backoffs": 0, "reference_positions": reference})
    assert distilled_with == [expected]


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    # The paper's beta at this net's 2x2 deepest map (5000 x 4 / 64 = 312.5).
    repaired = badnets.repair("nad", {})
    # Measured over seeds 0-3 and one or two threads (AVX2): ASR drop 0.29-0.46, clean-accuracy drop 0.003-0.033
    # (at the old, unscaled beta 500: 0.15-0.18 of clean accuracy lost with two threads).
    badnets.check_repair(repaired, effect, 0.2, 0.1)


def test_a_setting_that_wrecks_clean_budget_accuracy_is_halved(badnets, effect):
    badnets.check_backoff("nad", {"beta": 1e7, "teacher_epochs": 2, "epochs": 3}, 20, effect)  # halves every beta
