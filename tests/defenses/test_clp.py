"""Channel Lipschitzness-based Pruning (CLP): its effect on a tiny BadNets model and its bounds."""

import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseContext, DefenseKind
from bdbench.defenses.clp import channel_lipschitz_bounds, outlier_channels


def test_clp_is_a_model_repair():
    assert DEFENSES.get("clp").kind is DefenseKind.MODEL_REPAIR


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    # With 16 and 32 channels per layer, mean + 3 std (the paper's u) is almost never exceeded.
    repaired = badnets.repair("clp", {"u": 2.0})
    badnets.check_repair(repaired, effect, 0.2, 0.2)  # measured drops across kernel sets and threads: 0.76-0.84


def test_clp_is_data_free_and_prunes_the_channel_with_an_outlying_lipschitz_bound(badnets):
    context = badnets.context(sees_training_set=False)
    noise = torch.randint(0, 256, context.clean_x.shape, dtype=torch.uint8)
    other = DefenseContext(**{**{f: getattr(context, f) for f in context.__dataclass_fields__},
                              "clean_x": noise, "clean_y": torch.randint(0, 10, context.clean_y.shape)})
    clp = DEFENSES.build("clp", {"u": 2.0})
    first, second = clp.run(context).model, clp.run(other).model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    conv, norm = nn.Conv2d(2, 8, 3, bias=False), nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        conv.weight.fill_(0.1)
        norm.weight.fill_(1.0)
        norm.weight[5] = 20.0  # the BatchNorm scale folds into channel 5's bound
    bounds = channel_lipschitz_bounds(conv, norm)
    assert bounds.argmax() == 5 and torch.allclose(bounds[0], torch.tensor(0.1 * 3 * 2 ** 0.5) / (1 + 1e-5) ** 0.5)
    assert outlier_channels(bounds, 2.0).nonzero().flatten().tolist() == [5]
