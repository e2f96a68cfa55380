"""CETF (Zhou et al. 2024): its Differential Evolution, its parameters, the patch and region it finds on the tiny
digits BadNets model, its two unlearning repairs, its determinism and its verdict on the benign model."""

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.defenses.cetf import Patch, differential_evolution, focus_box, pull_towards
from bdbench.defenses.layers import norm_layers
from bdbench.errors import ConfigError

from defense_fixtures import toy_context

# The planted trigger of the shared BadNets model: a 2x2 white square in the bottom-right corner of 8x8 digits.
TRIGGER_ROWS = TRIGGER_COLS = range(6, 8)


@pytest.mark.parametrize("params", [{"population": 3}, {"patch_size": 0}, {"flip_threshold": 1.5},
                                    {"repair": "bn_cleaning"}, {"unlearning_fraction": 1}, {"search_images": 1}])
def test_bad_parameters_are_one_line_config_errors(params):
    with pytest.raises(ConfigError, match="cetf") as error:
        DEFENSES.build("cetf", params)
    assert "\n" not in str(error.value).strip()


def test_bn_unlearning_on_a_model_without_normalisation_layers_says_to_use_unlearning():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).eval()
    context = toy_context(model, torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.arange(2).repeat(4))
    with pytest.raises(ConfigError, match="repair: unlearning"):
        DEFENSES.build("cetf", {}).run(context)


def test_differential_evolution_finds_the_maximum_of_a_smooth_function():
    centre = torch.tensor([0.2, 0.7, 0.5])
    genome, value = differential_evolution(lambda g: -((g - centre) ** 2).sum(1), 3, 12, 60, 0.5, 0.9,
                                           torch.Generator().manual_seed(0))
    assert torch.allclose(genome, centre, atol=0.02) and value > -1e-3


def test_differential_evolution_stops_once_the_population_has_converged_and_only_with_a_tolerance():
    calls = []

    def plateau(genomes):  # every genome equally fit: converged from the start
        calls.append(len(genomes))
        return torch.ones(len(genomes))

    differential_evolution(plateau, 3, 8, 30, 0.5, 0.9, torch.Generator().manual_seed(0), tol=0.01)
    assert len(calls) == 1  # the initial population only
    calls.clear()
    differential_evolution(plateau, 3, 8, 30, 0.5, 0.9, torch.Generator().manual_seed(0))
    assert len(calls) == 31  # tol 0: every generation
    calls.clear()
    centre = torch.tensor([0.2, 0.7, 0.5])

    def bowl(genomes):  # a spread that narrows as the population closes on the peak at 1
        calls.append(len(genomes))
        return 1 - ((genomes - centre) ** 2).sum(1)

    _, value = differential_evolution(bowl, 3, 12, 200, 0.5, 0.9, torch.Generator().manual_seed(0), tol=0.01)
    assert 1 < len(calls) < 201 and value > 0.99


def test_pull_and_patch_and_focus_helpers():
    # Two images of labels 0 and 1; one candidate that gives label 1 probability 0.9 on the image of label 0.
    probabilities = torch.tensor([[[0.1, 0.9], [0.2, 0.8]]])
    assert torch.allclose(pull_towards(probabilities, torch.tensor([0, 1])), torch.tensor([[0.2, 0.9]]))
    genome = torch.cat([torch.tensor([1.0, 0.0]), torch.full((4,), 0.5)])
    patch = Patch.from_genome(genome, 1, 2, 8)
    assert (patch.row, patch.col) == (6, 0)
    trigger = patch.trigger(1, 8, region=(7, 0, 8, 8))  # the region keeps the patch's bottom row only
    assert torch.nonzero(trigger.masks[0, 0]).tolist() == [[7, 0], [7, 1]] and trigger.norms.item() == 2
    cam = torch.zeros(2, 8, 8)
    cam[:, 2:4, 5] = 1.0
    cam[0, 0, 0] = 0.6  # one image's stray peak, halved by the mean: below 0.5 of the mean's peak
    assert focus_box(cam, 0.5) == (2, 5, 4, 6)


@pytest.fixture(scope="module")
def found(badnets):
    """The default search, verdict and repair on the shared BadNets model, with a patch of half the side (4x4),
    so that the region search has to find the 2x2 trigger inside it."""
    defense = DEFENSES.build("cetf", {"patch_size": 0.5})
    context = badnets.context(sees_training_set=False)
    outcome, search = defense._inspect(context)
    return outcome, search


def test_the_search_finds_the_planted_patch_its_region_and_its_target(found, effect):
    outcome, search = found
    assert outcome.detected and outcome.suspected_targets == (0,)
    effect.check("flip rate of the found patch towards the target", outcome.anomaly_index, ">", 0.9)
    assert outcome.class_statistics[1:].max() < 0.1  # no other label is reached
    top, left, bottom, right = search.region
    side = search.patch.pixels.shape[-1]
    # The region lies inside the found 4x4 patch, is smaller than it, and mostly on the planted trigger's pixels
    # (measured: row 7, columns 5-7, two of its three pixels on the trigger).
    assert search.patch.row <= top and search.patch.col <= left
    assert bottom <= search.patch.row + side and right <= search.patch.col + side
    area = (bottom - top) * (right - left)
    on_trigger = len(set(range(top, bottom)) & set(TRIGGER_ROWS)) * len(set(range(left, right)) & set(TRIGGER_COLS))
    assert area < side * side and on_trigger >= area / 2
    assert outcome.pictures["trigger"].shape == (1, 8, 8)


def test_unlearning_with_the_found_trigger_removes_the_backdoor_and_keeps_clean_accuracy(badnets, effect):
    # Measured on one thread: ASR 1.000 -> 0.173, clean accuracy 0.986 -> 0.981 (Naive Unlearning).
    badnets.check_repair(badnets.repair("cetf", {"repair": "unlearning"}), effect, 0.6, 0.03)


def test_bn_unlearning_trains_only_the_normalisation_layers(badnets):
    repaired = badnets.repair("cetf", {"epochs": 2})
    norm_names = {name for name, module in repaired.named_modules() if module in norm_layers(repaired)}
    deployed = dict(badnets.model.named_parameters())
    changed = {name.rsplit(".", 1)[0] for name, p in repaired.named_parameters() if not torch.equal(p, deployed[name])}
    assert changed and changed <= norm_names
    assert all(p.requires_grad for p in repaired.parameters())  # handed back trainable, as the deployed model was


def test_the_same_seed_gives_the_same_search_and_repair(badnets):
    settings = {"generations": 5, "region_generations": 3, "epochs": 1}
    first, second = (DEFENSES.build("cetf", settings).run(badnets.context(sees_training_set=False)) for _ in range(2))
    assert torch.equal(first.class_statistics, second.class_statistics)
    assert torch.equal(first.pictures["trigger"], second.pictures["trigger"])
    assert first.model is not None and second.model is not None
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))


def test_a_benign_model_is_not_judged_backdoored_and_is_left_alone(benign, effect):
    defense, outcome = benign.defend("cetf")
    assert defense.kind is DefenseKind.MODEL_REPAIR
    # Measured: the best patch the search finds sends 0.29 of the budget to one label (8).
    effect.check("flip rate of the best patch on the benign model", outcome.anomaly_index, "<", 0.8)
    assert not outcome.detected and outcome.suspected_targets == ()
    deployed = benign.model.state_dict()
    assert all(torch.equal(deployed[k], v) for k, v in outcome.model.state_dict().items())
