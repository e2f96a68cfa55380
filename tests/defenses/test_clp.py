"""Channel Lipschitzness-based Pruning (CLP): its effect on a tiny BadNets model and its bounds."""

import pytest
import torch
from torch import nn

from bdbench.defenses import DEFENSES, DefenseContext, DefenseKind
from bdbench.defenses.clp import channel_lipschitz_bounds, outlier_channels
from bdbench.models import create_model

from defense_fixtures import toy_context


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


def test_citation_names_the_papers_authors():
    # arXiv:2208.03111 and the authors' README: Runkai Zheng, Rongjun Tang, Jianze Li, Li Liu.
    assert DEFENSES.get("clp").citation.startswith("Zheng, Tang, Li, Liu.")


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(2, 8), lambda: nn.BatchNorm2d(8, affine=False)],
                         ids=["groupnorm", "batchnorm-without-affine"])
def test_a_pruned_channel_read_by_a_normaliser_is_silenced_and_its_neighbours_are_untouched(norm):
    torch.manual_seed(0)
    conv, layer = nn.Conv2d(1, 8, 3, padding=1), norm()
    model = nn.Sequential(conv, layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        conv.weight[3] *= 50.0  # the one outlying bound: with 8 channels a z-score up to 7 / sqrt(8) = 2.47
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    x = torch.rand(4, 1, 8, 8)
    context = toy_context(model, (x * 255).to(torch.uint8), torch.tensor([0, 1, 2, 0]))
    repaired = DEFENSES.build("clp", {"u": 2.0}).run(context).model
    with torch.no_grad():
        before, after = model[:2](x), repaired[:2](x)
    assert after[:, 3].abs().max() == 0  # zeroing the convolution's channel left -gamma mu / sigma + beta here
    keep = [c for c in range(8) if c != 3]
    assert torch.allclose(after[:, keep], before[:, keep])  # and moved GroupNorm's statistics for the others


def _authors_rule(model: nn.Module, u: float) -> dict[str, list[int]]:
    """The released rule, written out for comparison: every BatchNorm2d folded with the Conv2d registered last
    before it, the largest singular value of each channel's (in, kernel-area) matrix, mean + u x sample std."""
    pruned, conv = {}, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, nn.BatchNorm2d):
            assert conv is not None
            scale = (module.weight / (module.running_var + module.eps).sqrt()).abs()
            lips = torch.stack([torch.linalg.svdvals(conv.weight[k].reshape(conv.weight.shape[1], -1)).max() * scale[k]
                                for k in range(len(scale))])
            pruned[name] = torch.where(lips > lips.mean() + u * lips.std())[0].tolist()
    return pruned


def test_on_a_resnet_it_prunes_exactly_the_channels_the_authors_rule_prunes():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 3, 16, width=0.25).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.1, 3.0)
    with torch.no_grad():
        expected = _authors_rule(model, 1.5)
    assert sum(map(len, expected.values())) >= 5  # the comparison is not between two empty sets
    x = torch.rand(2, 3, 16, 16)
    repaired = DEFENSES.build("clp", {"u": 1.5}).run(toy_context(model, (x * 255).to(torch.uint8),
                                                                  torch.tensor([0, 9]))).model
    found = {name: torch.where((m.weight == 0) & (m.bias == 0))[0].tolist()
             for name, m in repaired.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert found == expected
    affine = {f"{name}.{p}" for name in found for p in ("weight", "bias")}
    after = repaired.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in model.state_dict().items() if key not in affine)
