"""Anti-Backdoor Learning (ABL), robust training on a tiny poisoned digits set."""

from bdbench import metrics
from bdbench.defenses import DEFENSES
from bdbench.training import predict

from defense_fixtures import poisoned_digits


def test_abl_isolates_its_share_of_low_loss_samples_and_keeps_clean_accuracy(digits, effect):
    # ABL's premise is that poisons are learned first, so that the 1% of lowest-loss samples after the
    # flooded isolation stage is mostly poison. On this tiny model it does not hold steadily: after 5
    # isolation epochs the 14 isolated samples are 57% poison on AVX-512 kernels and 29% on AVX2 (0% on
    # both after the paper's 20), and the unlearning's ASR drop ranges from 0.05 to 0.63 across kernel
    # sets and threads (0.10 to 0.63 with 40 unlearning epochs). Removal is therefore not asserted here.
    badnets = poisoned_digits(digits, "badnets", {"patch_size": 2}, 0.1)
    defense = DEFENSES.build("abl", {"isolation_epochs": 5, "tuning_epochs": 5, "unlearning_epochs": 20})
    context = badnets.context(sees_training_set=True)
    _, isolated = defense.isolate(context)
    assert int(isolated.sum()) == round(0.01 * len(isolated))
    model = defense.run(context).model
    assert model is not badnets.model
    clean_acc = metrics.accuracy(predict(model, badnets.dataset.x_test), badnets.dataset.y_test)
    effect.check("clean accuracy after", clean_acc, ">", 0.5)  # measured 0.52 (seed 1) to 0.91
