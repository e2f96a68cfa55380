"""Neural Cleanse (NC) on tiny poisoned and benign digits models (target class 0)."""

import math

import pytest
import torch
from torch import nn

from bdbench.defenses import DefenseKind
from bdbench.defenses import nc as nc_module
from bdbench.defenses.mmbd import max_margins
from bdbench.defenses.nc import NeuralCleanse, ReversedTriggers, _Schedule, reverse_engineer_triggers


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


def _reference_schedule(successes: list[bool], best_norms: list[float], init_cost: float, patience: int = 5,
                        multiplier: float = 2.0, early_stop_patience: int = 25) -> tuple[list[float], int | None]:
    """One label's cost schedule and early stop as bolunwang/backdoor's visualizer.py runs them (our transcription,
    at its example's settings: cost reset to 0 at the start, EARLY_STOP_THRESHOLD 1.0): the cost of each epoch, and
    the epoch at whose end the label stops (None if it does not)."""
    cost, set_count, up, down, stale = 0.0, 0, 0, 0, 0
    raised = lowered = False
    best_seen = math.inf
    costs = []
    for epoch, (success, best) in enumerate(zip(successes, best_norms)):
        costs.append(cost)
        if best < math.inf:  # the early stop: checked before this epoch moves the cost
            stale = stale + 1 if best >= best_seen else 0
        best_seen = min(best_seen, best)
        if raised and lowered and stale >= early_stop_patience:
            return costs, epoch
        if cost == 0 and success:
            set_count += 1
            if set_count >= patience:  # the cost is set from 0 to its initial value, counters and flags reset
                cost, up, down, raised, lowered = init_cost, 0, 0, False, False
        else:
            set_count = 0
        up, down = (up + 1, 0) if success else (0, down + 1)
        if up >= patience:
            up, cost, raised = 0, cost * multiplier, True
        elif down >= patience:
            down, cost, lowered = 0, cost / multiplier ** 1.5, True
    return costs, None


def _run_schedule(successes: torch.Tensor, best_norms: torch.Tensor, init_cost: float = 1e-3):
    """Our schedule on (epochs, labels) sequences: the cost of each epoch and the first epoch each label stops at."""
    schedule = _Schedule.start(successes.shape[1], init_cost)
    costs, stopped = [], [None] * successes.shape[1]
    for epoch, (success, best) in enumerate(zip(successes, best_norms)):
        costs.append(schedule.cost.clone())
        schedule.update(success, best, 5, 2.0)
        for label in torch.nonzero(schedule.finished(25)).flatten().tolist():
            stopped[label] = epoch if stopped[label] is None else stopped[label]
    return torch.stack(costs), stopped


def test_the_cost_schedule_and_early_stop_follow_the_reference_on_random_runs():
    generator = torch.Generator().manual_seed(0)
    epochs, labels = 72, 64
    # Successes and failures in runs of four with random flips; each epoch a random mask norm, the best the
    # smallest of the successful epochs' so far (improvements grow rare, so that labels stop).
    successes = (torch.rand(epochs // 4, labels, generator=generator) < 0.6).repeat_interleave(4, 0)
    successes ^= torch.rand(epochs, labels, generator=generator) < 0.1
    norms = torch.rand(epochs, labels, generator=generator, dtype=torch.float64) * 100
    best_norms = torch.where(successes, norms, math.inf).cummin(0).values
    costs, stopped = _run_schedule(successes, best_norms)
    stops = 0
    for label in range(labels):
        expected_costs, expected_stop = _reference_schedule(successes[:, label].tolist(), best_norms[:, label].tolist(),
                                                            1e-3)
        assert stopped[label] == expected_stop, label
        assert torch.allclose(costs[:len(expected_costs), label], torch.tensor(expected_costs, dtype=torch.float64))
        stops += expected_stop is not None
    assert 10 <= stops <= labels - 10  # both outcomes are exercised


def test_the_early_stop_reads_the_flags_of_the_epochs_before():
    # The cost set from 0 (5 successes) and raised (4 more), then 20 epochs without the 5 failures in a row that
    # lower it, the best norm stuck since epoch 0; 5 failures lower it at the end of epoch 33. The reference checks
    # the early stop before it moves the cost: the label stops at the end of epoch 34, not 33.
    pattern = [True] * 9 + ([False] * 4 + [True]) * 4 + [False] * 7
    successes = torch.tensor(pattern)[:, None]
    best_norms = torch.full((len(pattern), 1), 10.0, dtype=torch.float64)
    assert _reference_schedule(pattern, [10.0] * len(pattern), 1e-3)[1] == 34
    assert _run_schedule(successes, best_norms)[1] == [34]


def test_the_cost_starts_at_zero_and_is_set_after_patience_successful_epochs():
    # A linear model any trigger colour reaches at once: the reference optimises the first epochs without the size
    # term (RESET_COST_TO_ZERO), sets the cost to init_cost after 5 successful epochs and raises it 4 epochs later.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    triggers = reverse_engineer_triggers(model, x, 3, torch.Generator().manual_seed(0), epochs=12)
    assert triggers.costs is not None and triggers.successes is not None
    label = 1  # this model's easy label: successful from the first epoch
    assert bool((triggers.successes[:, label] >= 0.99).all())
    assert triggers.costs[:, label].tolist() == [0.0] * 5 + [1e-3] * 4 + [2e-3] * 3
    # cost_from_zero=False starts at init_cost, as BackdoorBench's port does (its Recorder never holds 0).
    later = reverse_engineer_triggers(model, x, 3, torch.Generator().manual_seed(0), epochs=5, cost_from_zero=False)
    assert later.costs is not None and later.costs[0].tolist() == [1e-3] * 3


def test_unlearning_stamps_a_fifth_of_the_budget_in_place_under_true_labels(badnets, monkeypatch):
    # The paper's unlearning set: the clean sample with the reversed trigger added to 20% of its images, labels
    # unchanged (BackdoorBench: the same 20% of its 5% budget stamped, the rest clean); no clean twin of a stamped image.
    context = badnets.context(sees_training_set=False)
    seen = {}

    def capture(context, model, x, y, **settings):
        seen.update(x=x, y=y, **settings)
        return model

    monkeypatch.setattr(nc_module, "fine_tune", capture)
    grey = ReversedTriggers(torch.ones(10, 1, 8, 8), torch.full((10, 1, 8, 8), 0.5), torch.full((10,), 64.0))
    NeuralCleanse().unlearn(context, grey, torch.tensor([0]))
    x, y = context.clean_x, context.clean_y
    assert seen["x"].shape == x.shape and torch.equal(seen["y"], y)
    stamped = (seen["x"] != x).flatten(1).any(1)
    assert int(stamped.sum()) == round(0.2 * len(x))
    assert bool((seen["x"][stamped] == 128).all()) and torch.equal(seen["x"][~stamped], x[~stamped])
