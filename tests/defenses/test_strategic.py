"""Strategic retraining (Dhonthi et al. 2023) and its ABS analysis: the pieces on a hand-built network whose trojan
neuron is known, the retraining set it builds, what it sees, and its effect on the tiny digits BadNets model."""

from unittest import mock

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseKind, strategic
from bdbench.defenses.nc import ReversedTriggers
from bdbench.defenses.strategic import TrojanNeurons, affected_classes, reverse_engineer_masks, stimulate
from bdbench.training import predict


def planted_network() -> tuple[nn.Sequential, nn.Module]:
    """Three classes of 4x4 images read by three neurons: brightness of the left half (-> label 0), of the right
    half (-> label 1), and the bottom-right pixel (-> label 2, with a weight no image evidence can match): neuron 2 is
    the trojan neuron, the pixel its trigger. Neurons saturate at 1 (the Hardtanh), so a benign neuron stimulated
    at any strength lifts its label only as far as a well-lit image of that class does. Returns the network and
    its stimulated layer."""
    read = nn.Conv2d(1, 3, 4, bias=False)
    with torch.no_grad():
        read.weight.zero_()
        read.weight[0, 0, :, :2] = 1 / 8
        read.weight[1, 0, :, 2:] = 1 / 8
        read.weight[2, 0, 3, 3] = 1.0
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 10.0]]))
    layer = nn.ReLU()
    return nn.Sequential(read, layer, nn.Hardtanh(0, 1), nn.Flatten(), head).eval(), layer


def halves(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 4x4 images: class 0 lit on the left, class 1 on the right, the trigger pixel dark."""
    x = torch.zeros(2 * count, 1, 4, 4, dtype=torch.uint8)
    x[:count, :, :, :2] = 200
    x[count:, :, :, 2:] = 200
    x[count:, :, 3, 3] = 0
    return x, torch.arange(2).repeat_interleave(count)


def test_stimulation_finds_the_planted_neuron_and_its_label():
    model, layer = planted_network()
    x, y = halves(4)
    assert torch.equal(predict(model, x), y)  # a working classifier before any stimulation
    found = stimulate(model, layer, x, y, 3, torch.linspace(0.5, 3, 6))
    assert found.candidates(1).tolist() == [2] and found.labels[2] == 2
    # Neuron 2 lifts label 2 over every other logit on every image by 10 - 4 x 200/255 = 6.86; a benign neuron,
    # saturated at 1, lifts its label over an image of the other class by 4 less that image's own evidence
    # (4 x 200/255 on the left, 4 x 7/8 x 200/255 on the right, whose trigger pixel is dark): 0.86 and 1.25.
    assert found.elevations[2] > 6.8 and torch.allclose(found.elevations[:2], torch.tensor([1.2549, 0.8627]), atol=1e-3)


def test_masks_of_the_planted_neuron_cover_its_trigger_pixel_and_carry_images_to_its_label():
    model, layer = planted_network()
    x, _ = halves(16)
    triggers = reverse_engineer_masks(model, layer, torch.tensor([2]), x, 1.0, torch.Generator().manual_seed(0),
                                      steps=150, batch_size=8, lr=0.1, max_size=1 / 16, other_weight=0.5,
                                      size_weight=50)
    assert triggers.masks.shape == (1, 1, 4, 4) and triggers.patterns.shape == (1, 1, 4, 4)
    assert int(triggers.masks[0, 0].flatten().argmax()) == 15  # the bottom-right pixel
    assert triggers.masks[0].mean() <= 1 / 16 + 0.02  # within ABS's bound on the trigger
    assert (predict(model, triggers.stamp(x, torch.zeros(len(x), dtype=torch.long))) == 2).all()  # REASR 1


def test_affected_classes_are_those_the_mask_moves_most_and_at_all():
    model, _ = planted_network()
    x, y = halves(4)
    x, y = torch.cat([x, x[:2]]), torch.cat([y, torch.tensor([2, 2])])  # two images labelled 2: never moved
    stamped = x.clone()
    stamped[:, :, 3, 3] = 255
    stamped[4] = x[4]  # one image of class 1 stays unstamped, so class 1 moves less than class 0
    assert affected_classes(model, stamped, y, 3, 3, torch.device("cpu")).tolist() == [0, 1]
    assert affected_classes(model, stamped, y, 3, 1, torch.device("cpu")).tolist() == [0]


def test_retraining_samples_are_the_affected_classes_stamped_under_their_true_labels():
    x = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(3).repeat(4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, 0, 0], mask[1, :, 3, 3] = 1, 1
    found = TrojanNeurons(torch.tensor([5, 7]), torch.tensor([0, 0]),
                          ReversedTriggers(mask, torch.ones(2, 1, 4, 4), mask.flatten(1).sum(1)),
                          torch.ones(2), [torch.tensor([1]), torch.tensor([2, 1])])
    stamped, labels = found.retraining_samples(x, y)
    second = (y == 1) | (y == 2)  # the second neuron's classes, in budget order
    assert torch.equal(labels, torch.cat([y[y == 1], y[second]]))  # true labels, never the lifted 0
    sources = torch.cat([x[y == 1], x[second]])
    assert (stamped[:4, :, 0, 0] == 255).all() and (stamped[4:, :, 3, 3] == 255).all()
    changed = stamped != sources
    assert not changed[:4, :, 1:].any() and not changed[4:, :, :3].any()  # nothing but each mask's pixel


@pytest.fixture(scope="module")
def repaired(badnets):
    """The defaults on the shared BadNets model, with every fine-tuning set recorded."""
    calls = []
    real = strategic.fine_tune

    def recording(context, model, x, y, **settings):
        calls.append((x.clone(), y.clone(), settings))
        return real(context, model, x, y, **settings)

    with mock.patch.object(strategic, "fine_tune", recording):
        model = badnets.repair("strategic")
    return model, calls


def test_it_retrains_only_on_the_clean_budget_and_stamped_copies_of_it(badnets, repaired):
    assert DEFENSES.get("strategic").kind is DefenseKind.MODEL_REPAIR  # its context holds no training set
    context = badnets.context(sees_training_set=False)
    budget_x, budget_y = context.clean_x, context.clean_y
    _, calls = repaired
    assert calls  # the backdoor was found, so there was retraining
    for x, y, _ in calls:
        n = len(budget_x)
        assert torch.equal(x[:n], budget_x) and torch.equal(y[:n], budget_y)
        extra_x, extra_y = x[n:], y[n:]
        assert len(extra_x) and not (extra_y == 0).any()  # BadNets' target is lifted, never taught
        # Each stamped image is a budget image of its label blended with a mask of mean at most about 0.06 (ABS's
        # bound): within 0.06 x 255 per pixel on average of that image, where two budget images differ by far more.
        for image, label in zip(extra_x, extra_y):
            same_class = budget_x[budget_y == label].float()
            assert float((same_class - image.float()).abs().flatten(1).mean(1).min()) <= 0.07 * 255
        assert len(extra_y.unique()) <= 3  # the top_p most affected classes of each trojan neuron


def test_repair_removes_the_badnets_backdoor_where_fine_tuning_alone_does_not(badnets, repaired, effect):
    model, calls = repaired
    # Measured on one thread: ASR 1.0 -> 0.07 in one round, clean accuracy 0.983 -> 0.978.
    badnets.check_repair(model, effect, 0.6, 0.03)
    # The same fine-tuning on the budget without the stamped copies leaves most of the backdoor (ASR 0.91).
    epochs = sum(settings["epochs"] for _, _, settings in calls)
    asr_ft = badnets.scores(badnets.repair("ft", {"epochs": epochs, "batch_size": 32}))[1]
    effect.check("ASR left by fine-tuning alone, above the repair's by", asr_ft - badnets.scores(model)[1], ">", 0.4)


def test_a_benign_model_has_no_trojan_neuron_and_is_returned_unchanged(benign):
    model = benign.repair("strategic")
    deployed = benign.model.state_dict()
    assert all(torch.equal(deployed[k], v) for k, v in model.state_dict().items())
