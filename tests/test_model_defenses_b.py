"""Model repair by NAD, ANP, I-BAU and CLP: effect on a tiny BadNets model; every repair (parts 1 and 2) on
every architecture and through the runner.

The effect tests use a cnn-small of width 16 on 8x8 digits and a clean budget of 150 images, far
from the papers' ResNets on CIFAR with thousands of clean images; where a paper default does nothing
or too much at this scale, the test says which setting it uses and why.
"""

import copy

import pytest
import torch
from torch import nn

from bdbench import load_results, run_grid
from bdbench.defenses import DEFENSES, DefenseContext, DefenseKind
from bdbench.defenses.clp import channel_lipschitz_bounds, outlier_channels
from bdbench.defenses.ibau import fixed_point_hypergradient
from bdbench.errors import NotApplicable
from bdbench.models import MODELS, create_model, with_normalization
from bdbench.training import TrainConfig


NAMES = ("nad", "anp", "ibau", "clp")


def _repair(name, params, badnets):
    before = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    outcome = DEFENSES.build(name, params).run(badnets.context(sees_training_set=False))
    assert all(torch.equal(before[k], v) for k, v in badnets.model.state_dict().items())  # deployed model untouched
    return badnets.scores(badnets.model), badnets.scores(outcome.model)


def test_the_four_defenses_are_model_repairs():
    assert all(DEFENSES.get(name).kind is DefenseKind.MODEL_REPAIR for name in NAMES)


@pytest.mark.parametrize("name, params", [
    # The paper's beta (5000 per layer) also erases clean accuracy on 8x8 maps of a 16-channel net.
    ("nad", {"beta": 500}),
    # anp is left out: with two torch threads its masks leave the backdoor in place (ASR 0.96), with
    # one they remove it; its effect is not shown on this model (issue 5 stays open for it).
    # ibau is left out too: its ASR drop on this model ranges from 0.10 (AVX-512 kernels, two threads) to
    # 0.40 (AVX-512, one thread) across kernel sets and threads; its clean-budget back-off is tested below.
    # With 16 and 32 channels per layer, mean + 3 std (the paper's u) is almost never exceeded.
    ("clp", {"u": 2.0}),
])
def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(name, params, badnets, effect):
    (clean_before, asr_before), (clean_after, asr_after) = _repair(name, params, badnets)
    effect.check("ASR before", asr_before, ">", 0.95)
    # Measured drops across kernel sets and threads: NAD 0.27-0.49, CLP 0.76-0.84.
    effect.check("ASR drop", asr_before - asr_after, ">", 0.2)
    # The clean-accuracy cost moves with float reduction order (NAD and I-BAU lose 0.15-0.18 with two
    # threads, less with one): a 200-image budget on a 16-channel net.
    effect.check("clean accuracy drop", clean_before - clean_after, "<", 0.2)


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


@pytest.mark.parametrize("name, settings, backoffs", [
    ("nad", {"beta": 1e7, "teacher_epochs": 2, "epochs": 3}, 20),  # halves every beta
    ("ibau", {"lr": 0.05, "rounds": 1}, 12),  # halves the Adam step
])
def test_a_setting_that_wrecks_clean_budget_accuracy_is_halved(name, settings, backoffs, badnets, effect):
    context = badnets.context(sees_training_set=False)
    wrecked = DEFENSES.build(name, {**settings, "max_accuracy_drop": 0.1, "backoffs": 0}).run(context).model
    kept = DEFENSES.build(name, {**settings, "max_accuracy_drop": 0.1, "backoffs": backoffs}).run(context).model
    floor = context.budget_accuracy(badnets.model) - 0.1
    effect.check("budget accuracy without back-off, below the floor by", floor - context.budget_accuracy(wrecked), ">", 0)
    effect.check("budget accuracy with back-off, above the floor by", context.budget_accuracy(kept) - floor, ">=", 0)


def test_anp_never_prunes_past_the_clean_budget_accuracy_margin(badnets):
    context = badnets.context(sees_training_set=False)
    model = DEFENSES.build("anp", {"iterations": 50, "threshold": 0.9, "max_accuracy_drop": 0.0}).run(context).model
    assert context.budget_accuracy(model) >= context.budget_accuracy(badnets.model)


def test_fixed_point_hypergradient_matches_the_implicit_derivative():
    # Inner problem: delta*(theta) = A theta minimises 0.5 |delta - A theta|^2; outer loss |delta|^2 + sum(theta).
    # d/dtheta = 2 A^T A theta + 1; the fixed-point series converges geometrically at rate 1 - inner_lr.
    torch.manual_seed(0)
    theta = torch.randn(3, requires_grad=True)
    a = torch.randn(4, 3)
    exact = 2 * a.T @ a @ theta.detach() + 1
    delta = (a @ theta).detach()
    grads = fixed_point_hypergradient(lambda d: d.pow(2).sum() + theta.sum(),
                                      lambda d: 0.5 * (d - a @ theta).pow(2).sum(), delta, [theta],
                                      inner_lr=0.5, iterations=40)
    assert torch.allclose(grads[0], exact, atol=1e-5)
    first_order = fixed_point_hypergradient(lambda d: d.pow(2).sum() + theta.sum(),
                                            lambda d: 0.5 * (d - a @ theta).pow(2).sum(), delta, [theta],
                                            inner_lr=0.5, iterations=1)
    assert not torch.allclose(first_order[0], exact, atol=1e-2)  # one term is not the implicit derivative


CHEAP = {"nad": {"teacher_epochs": 1, "epochs": 1, "batch_size": 8},
         "anp": {"iterations": 2, "batch_size": 8},
         "ibau": {"rounds": 1, "fixed_point_iterations": 2, "batch_size": 8},
         "clp": {},
         # Part 2 (their effect tests are in tests/test_repair_*.py).
         "bnp": {},
         "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1, "batch_size": 8},
         "awm": {"rounds": 1, "inner": 1, "batch_size": 8},
         "sau": {"epochs": 1, "batch_size": 8, "pgd_steps": 1},
         "fst": {"epochs": 1, "batch_size": 8},
         "ftsam": {"epochs": 1, "batch_size": 8},
         "npd": {"epochs": 1, "steps": 1, "batch_size": 8},
         "pbe": {"adversarial_epochs": 1, "epochs": 1, "steps": 1, "batch_size": 8}}


@pytest.mark.parametrize("architecture", MODELS.names())
def test_every_repair_runs_on_every_architecture(architecture, digits):
    width = 8 if architecture == "cnn-small" else 0.125
    torch.manual_seed(0)
    model = with_normalization(create_model(architecture, 10, 1, 8, width=width), digits.mean, digits.std).eval()
    context = DefenseContext(
        model=model, clean_x=digits.x_train[:16], clean_y=digits.y_train[:16], num_classes=10, in_channels=1,
        image_size=8, crop_padding=1, allow_hflip=False, train_config=TrainConfig(epochs=1, batch_size=8), seed=0,
        device=torch.device("cpu"), new_model=lambda: copy.deepcopy(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, params in CHEAP.items():
        if name == "bnp" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            with pytest.raises(NotApplicable, match="no BatchNorm layer"):  # a `not_applicable` row, not an error
                DEFENSES.build(name, params).run(context)
            continue
        repaired = DEFENSES.build(name, params).run(context).model
        with torch.no_grad():
            logits = repaired.eval()(digits.x_test[:4].float() / 255)
        assert logits.shape == (4, 10) and torch.isfinite(logits).all(), name
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name


def test_the_runner_scores_the_repaired_models(tmp_path, tiny_grid):
    tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}],
                     defenses=[{"name": name, **params} for name, params in CHEAP.items()])
    run_grid(tiny_grid, out=tmp_path, progress=False)
    rows = load_results(tmp_path)
    assert sorted(rows["defense"]) == sorted(CHEAP)
    assert (rows["status"] == "ok").all(), rows[["defense", "error"]]
    assert (rows["defense_kind"] == "model_repair").all()
    for column in ("clean_acc", "asr", "robust_acc", "der", "defense_s", "peak_rss_mb", "clean_budget"):
        assert rows[column].notna().all(), column
