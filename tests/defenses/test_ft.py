"""Fine-tuning (FT) on the clean budget."""

import torch

from bdbench.defenses import DEFENSES
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, predict, train

from defense_fixtures import toy_context


def test_fine_tuning_unlearns_a_relabelled_backdoor_without_touching_the_input_model(digits, effect):
    # A model trained to map class 1 to 0 (a stand-in backdoor); fine-tuning on clean labels undoes it.
    y = digits.y_train.clone()
    y[y == 1] = 0
    torch.manual_seed(0)
    model = with_normalization(create_model("cnn-small", 10, 1, 8, width=8), digits.mean, digits.std)
    train(model, digits.x_train, y, TrainConfig(epochs=6, batch_size=64), seed=0)
    ones = digits.x_test[digits.y_test == 1]
    effect.check("ones read as 0 before", (predict(model, ones) == 0).float().mean(), ">", 0.8)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    others = digits.y_test != 1
    accuracy_before = (predict(model, digits.x_test[others]) == digits.y_test[others]).float().mean()

    budget = toy_context(model, digits.x_train[:200], digits.y_train[:200], num_classes=10, crop_padding=1)
    outcome = DEFENSES.build("ft", {}).run(budget)  # the defaults
    effect.check("ones read as 0 after", (predict(outcome.model, ones) == 0).float().mean(), "<", 0.2)
    # A small clean budget costs some accuracy on the other classes, not much.
    accuracy_after = (predict(outcome.model, digits.x_test[others]) == digits.y_test[others]).float().mean()
    effect.check("accuracy drop on the other classes", accuracy_before - accuracy_after, "<", 0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
