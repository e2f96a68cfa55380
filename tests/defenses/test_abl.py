"""Anti-Backdoor Learning (ABL), robust training on a tiny poisoned digits set."""

import pytest

from bdbench import metrics
from bdbench.defenses import DEFENSES, DefenseContext
from bdbench.defenses.abl import per_sample_loss
from bdbench.training import cross_entropy, predict

from defense_fixtures import toy_context, untrained


def test_abl_stages_train_as_the_authors_code_does(badnets, monkeypatch):
    # The authors' isolation and unlearning loaders apply no augmentation, their tuning loader crop and
    # flip (and Cutout); every stage uses weight decay 1e-4. Each stage is cut to one epoch here.
    seen = {}
    fit = DefenseContext.fit

    def recording_fit(self, model, x, y, config, purpose="fit", loss_fn=cross_entropy):
        seen[purpose] = config
        return fit(self, model, x, y, config.model_copy(update={"epochs": 1}), purpose, loss_fn)

    monkeypatch.setattr(DefenseContext, "fit", recording_fit)
    DEFENSES.build("abl").run(badnets.context(sees_training_set=True))
    isolation, tuning, unlearning = seen["abl_isolation"], seen["abl_tuning"], seen["abl_unlearning"]
    assert (isolation.epochs, tuning.epochs, unlearning.epochs) == (20, 60, 20)
    assert (isolation.lr, tuning.lr, unlearning.lr) == (0.1, 0.1, 5e-4)
    assert (isolation.crop_padding, isolation.hflip) == (0, False)
    assert (unlearning.crop_padding, unlearning.hflip) == (0, False)
    assert (tuning.crop_padding, tuning.hflip) == (None, None)  # the data set's augmentation
    assert {isolation.weight_decay, tuning.weight_decay, unlearning.weight_decay} == {1e-4}


@pytest.mark.parametrize(("n", "expected"), [(150, 1), (350, 3), (1437, 14), (50, 1)])
def test_abl_isolates_the_integer_part_of_rate_times_n(digits, monkeypatch, n, expected):
    # Both codes isolate losses_idx[:int(len * ratio)] (the authors' backdoor_isolation.py, BackdoorBench's
    # defense/abl.py): 150 and 350 samples at 1% give 1 and 3 (rounding gave 2 and 4); below 100 samples
    # ours keeps one, where theirs would isolate none. Training is skipped: the count and the choice of the
    # lowest losses are what is checked.
    monkeypatch.setattr(DefenseContext, "fit", lambda self, model, *args, **kwargs: model)
    x, y = digits.x_train[:n], digits.y_train[:n]
    model = untrained("cnn-small", digits)
    context = toy_context(model, x, y, num_classes=digits.num_classes, train_x=x, train_y=y)
    _, isolated = DEFENSES.build("abl").isolate(context)
    assert int(isolated.sum()) == expected
    losses = per_sample_loss(model, x, y)
    assert losses[isolated].max() <= losses[~isolated].min()


def test_abl_isolates_its_share_of_low_loss_samples_and_keeps_clean_accuracy(badnets, effect):
    # ABL's premise is that poisons are learned first, so that the 1% of lowest-loss samples after the
    # flooded isolation stage is mostly poison. On these 8x8 digits the poisons do reach a far lower median
    # loss than clean samples, but a tail of very easy clean digits competes for the lowest 1%. Over 12 runs
    # of this procedure (seeds 0-3, three initialisations each) the 14 isolated samples were 66% poison on
    # average (0% to 100% per run) and the ASR after ABL was below 0.2 in 10 runs, up to 0.94 where the
    # isolation failed; with the victim's augmentation in isolation and unlearning and its weight decay
    # (before they followed the authors' code) 39% and 5 runs. Removal is therefore not asserted here.
    defense = DEFENSES.build("abl", {"isolation_epochs": 20, "tuning_epochs": 5, "unlearning_epochs": 20})
    context = badnets.context(sees_training_set=True)
    _, isolated = defense.isolate(context)
    assert int(isolated.sum()) == int(0.01 * len(isolated))
    model = defense.run(context).model
    assert model is not badnets.model
    clean_acc = metrics.accuracy(predict(model, badnets.dataset.x_test), badnets.dataset.y_test)
    effect.check("clean accuracy after", clean_acc, ">", 0.5)  # measured 0.66-0.84 over those runs


@pytest.mark.parametrize("name", ["data-defenses", "fidelity-cifar10", "fidelity-gtsrb"])
def test_built_in_grids_scale_abls_stages_to_their_victims_epochs_as_the_paper_splits_100(name):
    # The paper's T = 100: 20 isolation and 60 tuning epochs; the unlearning passes over the isolated 1% stay 20.
    from bdbench.grid import load_grid

    grid = load_grid(name)
    (abl,) = [d for d in grid.defenses if d.name == "abl"]
    epochs = grid.training.epochs
    assert (abl.params["isolation_epochs"], abl.params["tuning_epochs"]) == (round(0.2 * epochs), round(0.6 * epochs))
    assert abl.params["unlearning_epochs"] == 20
