"""Neural Cleanse (NC) on tiny poisoned and benign digits models (target class 0)."""

import pytest
import torch
from torch import nn

from bdbench.defenses import DefenseKind
from bdbench.defenses.mmbd import max_margins
from bdbench.defenses.nc import reverse_engineer_triggers


@pytest.fixture(scope="module")
def nc_badnets(badnets):
    return badnets.defend("nc")


def test_nc_flags_the_badnets_target(nc_badnets, effect):
    defense, outcome = nc_badnets
    assert defense.kind is DefenseKind.MODEL_DETECTION
    # The target is flagged; with two torch threads a second small-norm label (5) is flagged too.
    assert outcome.detected and 0 in outcome.suspected_targets
    effect.check("anomaly index", outcome.anomaly_index, ">", 2)
    assert len(outcome.suspected_targets) <= 2


def test_nc_unlearning_removes_the_backdoor_and_keeps_accuracy(badnets, nc_badnets, effect):
    clean_before, asr_before = badnets.scores(badnets.model)
    clean_after, asr_after = badnets.scores(nc_badnets[1].model)
    effect.check("ASR before", asr_before, ">", 0.95)
    effect.check("ASR after", asr_after, "<", 0.3)
    effect.check("clean accuracy drop", clean_before - clean_after, "<", 0.03)


def test_nc_leaves_a_benign_model_alone(benign, nc_badnets, effect):
    _, outcome = benign.defend("nc")
    assert not outcome.detected and outcome.suspected_targets == () and outcome.model is None
    effect.check("anomaly index, backdoored less benign", nc_badnets[1].anomaly_index - outcome.anomaly_index, ">", 0)


def test_label_groups_give_the_same_optimisation_as_one_batch(badnets):
    # Many labels per pass or a few: the same summed gradient, so the same triggers and margins.
    context = badnets.context(sees_training_set=False)
    norms = [reverse_engineer_triggers(context.model, context.clean_x, 10, torch.Generator().manual_seed(0),
                                       epochs=2, images_per_pass=images).norms for images in (2048, 70)]
    assert torch.allclose(norms[0], norms[1])
    margins = [max_margins(context.model, 10, (1, 8, 8), torch.Generator().manual_seed(0), restarts=4, steps=5,
                           images_per_pass=images) for images in (2048, 9)]
    assert torch.allclose(margins[0], margins[1])


class _VoteByPassSize(nn.Module):
    """Predicts class 0 for every image of a pass of at least `large` images, class 1 otherwise (the input enters
    the logits with weight zero, so that the trigger still has a gradient)."""

    def __init__(self, large: int) -> None:
        super().__init__()
        self.large = large
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vote = torch.tensor([1.0, 0.0] if len(x) >= self.large else [0.0, 1.0])
        return x.flatten(1).sum(1, keepdim=True) * 0 + vote


def test_an_epochs_attack_success_is_the_share_of_its_images():
    # 33 images in batches of 32 and 1, both labels in one pass: passes of 64 images vote 0, passes of 2 vote 1.
    # The reference (visualizer.py) averages the success of every image of the epoch: 32/33 for label 0, 1/33 for
    # label 1; a mean of the two batches' rates would give each 0.5 (and fail the 99% threshold for both).
    x = torch.randint(0, 256, (33, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    triggers = reverse_engineer_triggers(_VoteByPassSize(8), x, 2, torch.Generator().manual_seed(0), epochs=1,
                                         images_per_pass=2048)
    assert triggers.successes is not None
    assert torch.allclose(triggers.successes[0], torch.tensor([32 / 33, 1 / 33], dtype=torch.float64))
