"""The contract of every registered attack and defense, read from the registries (so a new method, or a plugin's,
is covered without editing this file): it builds with its defaults, runs on a tiny model and data (sklearn's 8x8
digits, the session's cnn-small BadNets model), and returns what its kind promises.

Each method's own behaviour and effect are tested in tests/attacks/test_<name>.py and tests/defenses/test_<name>.py;
this file checks only the shapes, types and ranges that the runner relies on.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.attacks.public_data import PublicPoolAttack, without_attacker_pool
from bdbench.defenses import DEFENSES, SEES_TRAINING_SET, DefenseKind, DefenseOutcome
from bdbench.training import predict, predict_logits

TARGET = 0
RATE = 0.1

# Smaller budgets than the defaults, only where the default takes more than about a second of CPU time on digits
# (measured on one thread: each of these took over 15 s of wall time on a loaded core). They go through
# `Registry.build` like a grid's parameters, so an override that stopped being valid fails here as a ConfigError.
# Every method not listed runs with its paper defaults.
_TINY_SURROGATE = {"width": 8, "epochs": 1}
ATTACK_BUDGETS: dict[str, dict] = {
    "advdoor": {"epochs": 1, "surrogate": _TINY_SURROGATE},
    "dfb": {"surrogate": _TINY_SURROGATE, "encoder_width": 8, "encoder_epochs": 1},
    "inputaware": {"mask_epochs": 1, "width": 8},
    "lc": {"steps": 2, "surrogate": _TINY_SURROGATE},
    "lf": {"surrogate_epochs": 1, "epochs": 1},
    "narcissus": {"pood_epochs": 1, "finetune_epochs": 1, "trigger_epochs": 50},  # RAdam's steps grow from ~0
    "ssba": {"steps": 10, "width": 8},
    "trojannn": {"steps": 5, "restarts": 1, "surrogate": _TINY_SURROGATE},
}
DEFENSE_BUDGETS: dict[str, dict] = {
    "abl": {"isolation_epochs": 1, "tuning_epochs": 1, "unlearning_epochs": 1},
    "aif": {"steps": 150},
    "anp": {"iterations": 2},
    "awm": {"rounds": 1, "inner": 1},
    "cetf": {"generations": 5, "region_generations": 3, "epochs": 1},
    "cti": {"steps": 2, "tuning": {"epochs": 1}},
    "ftc": {"steps": 150},
    "ftsam": {"epochs": 1},
    "ibau": {"rounds": 1, "fixed_point_iterations": 2},
    "mmbd": {"restarts": 2, "steps": 2},
    "nad": {"teacher_epochs": 1, "epochs": 1},
    "nc": {"epochs": 1, "unlearning_epochs": 1},
    "npd": {"epochs": 1, "warm_epochs": 1, "steps": 1},
    "pt": {"epochs": 1},
    "sau": {"epochs": 1, "pgd_steps": 1},
    "strategic": {"iterations": 1, "mask_steps": 20, "epochs": 1},
    "vif": {"steps": 150},
}


def test_the_budget_tables_hold_registered_methods_and_valid_parameters():
    for registry, budgets in ((ATTACKS, ATTACK_BUDGETS), (DEFENSES, DEFENSE_BUDGETS)):
        for name, params in budgets.items():
            registry.check(name, params)  # an unknown name or parameter, or a value out of range, raises


def _hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices, also from soft label distributions (N, K), whose rows must be distributions."""
    if y.dtype.is_floating_point:
        assert y.ndim == 2 and (y >= 0).all() and torch.allclose(y.sum(1), torch.ones(len(y)))
        return y.argmax(1)
    assert y.dtype == torch.int64 and y.ndim == 1
    return y


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_poisons_the_training_set_and_triggers_test_images_as_promised(name, digits):
    attack = ATTACKS.build(name, ATTACK_BUDGETS.get(name, {}))
    attack.prepare(digits, TARGET, AttackWorkshop(seed=0))
    poisoned = attack.after_training(attack.poison(digits, RATE, TARGET, torch.Generator().manual_seed(0)))
    # What the victim trains on: the training set, less the attacker pool for attacks that learn from it.
    victim = without_attacker_pool(digits) if isinstance(attack, PublicPoolAttack) else digits
    clean_x, clean_y = victim.x_train, victim.y_train

    # The poisoned training set: uint8 images of the clean set's shape, labels per row, a boolean mask.
    assert poisoned.x.dtype == torch.uint8 and poisoned.x.shape == clean_x.shape
    assert poisoned.poison_mask.dtype == torch.bool and poisoned.poison_mask.shape == clean_y.shape
    labels = _hard_labels(poisoned.y)
    assert labels.shape == clean_y.shape and labels.min() >= 0 and labels.max() < digits.num_classes
    mask = poisoned.poison_mask
    assert torch.equal(poisoned.x[~mask], clean_x[~mask]) and torch.equal(labels[~mask], clean_y[~mask])
    if type(attack).reference:
        assert not mask.any()
        return
    assert mask.any() and (poisoned.x[mask] != clean_x[mask]).any()
    changed = mask & (labels != clean_y)
    assert (labels[changed] == TARGET).all()  # all-to-one: a changed label is the target
    if not changed.any():  # a clean-label attack: it poisons target-class images under their own label
        assert (clean_y[mask] == TARGET).all()

    # The triggered test set: non-target test images with the trigger, their true and target labels.
    triggered = attack.triggered_test_set(digits, TARGET)
    n = len(triggered.x)
    assert n > 0 and triggered.x.dtype == torch.uint8 and triggered.x.shape[1:] == digits.x_test.shape[1:]
    assert triggered.y_true.shape == triggered.y_target.shape == (n,)
    assert (triggered.y_target == TARGET).all() and (triggered.y_true != TARGET).all()
    if triggered.x_clean is not None:
        assert triggered.x_clean.shape == triggered.x.shape and (triggered.x != triggered.x_clean).any()

    # An attack that controls training hands the trainer a hook that keeps a batch's shape and range.
    hook = attack.training_hook()
    if hook is not None:
        index = torch.arange(32)
        x = poisoned.x[index].float() / 255
        hx, hy = hook(x, poisoned.y[index], torch.Generator().manual_seed(0), index)
        assert hx.shape[1:] == x.shape[1:] and len(hx) == len(hy) and hx.min() >= 0 and hx.max() <= 1


def _check_classifier(model: nn.Module | None, deployed: nn.Module, digits) -> None:
    """A model that a defense returns: a new module (not the deployed one) that classifies the test images."""
    assert isinstance(model, nn.Module) and model is not deployed
    logits = predict_logits(model, digits.x_test[:64])
    assert logits.shape == (64, digits.num_classes) and torch.isfinite(logits).all()
    accuracy = float((predict(model, digits.x_test) == digits.y_test).double().mean())
    assert accuracy > 2 / digits.num_classes, accuracy  # still a classifier, far from chance


def _check_verdict(outcome: DefenseOutcome, num_classes: int) -> None:
    assert isinstance(outcome.detected, bool)
    assert outcome.anomaly_index is not None and math.isfinite(outcome.anomaly_index)
    targets = outcome.suspected_targets
    assert isinstance(targets, tuple) and all(isinstance(t, int) and 0 <= t < num_classes for t in targets)
    assert not outcome.detected or targets  # a positive verdict names its suspects
    if outcome.class_statistics is not None:
        assert outcome.class_statistics.shape == (num_classes,)


def _check_sample_verdicts(outcome: DefenseOutcome, size: int) -> None:
    assert outcome.flagged is not None and outcome.flagged.dtype == torch.bool and outcome.flagged.shape == (size,)
    assert outcome.sample_scores is not None and outcome.sample_scores.shape == (size,)
    assert torch.isfinite(outcome.sample_scores).all()
    assert not outcome.flagged.all()  # some samples are kept to retrain on


def _check_input_detector(outcome: DefenseOutcome, images: dict[str, torch.Tensor]) -> None:
    assert callable(outcome.input_detector)
    for what, x in images.items():
        scores, flags = outcome.input_detector(x)
        assert scores.shape == (len(x),) and torch.isfinite(scores.float()).all(), what
        assert flags.dtype == torch.bool and flags.shape == (len(x),), what


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_returns_what_its_kind_promises(name, badnets, digits):
    defense = DEFENSES.build(name, DEFENSE_BUDGETS.get(name, {}))
    kind = type(defense).kind
    context = badnets.context(sees_training_set=kind in SEES_TRAINING_SET)
    before = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    outcome = defense.run(context)
    assert isinstance(outcome, DefenseOutcome)
    assert all(torch.equal(before[k], v) for k, v in badnets.model.state_dict().items())  # deployed model untouched

    if kind is DefenseKind.NONE:
        assert outcome == DefenseOutcome()
    elif kind in (DefenseKind.MODEL_REPAIR, DefenseKind.ROBUST_TRAINING):
        _check_classifier(outcome.model, badnets.model, digits)
    elif kind is DefenseKind.MODEL_DETECTION:
        _check_verdict(outcome, digits.num_classes)
        if outcome.model is not None:  # a detector that also repairs (Neural Cleanse's unlearning)
            _check_classifier(outcome.model, badnets.model, digits)
    elif kind is DefenseKind.DATA_DETECTION:
        _check_sample_verdicts(outcome, len(badnets.poisoned.y))
    elif kind is DefenseKind.INPUT_DETECTION:
        _check_input_detector(outcome, {"clean": digits.x_test[:64], "triggered": badnets.triggered.x[:64]})
    else:
        pytest.fail(f"defense kind {kind} has no contract here: add one")
