import dataclasses

import torch

from bdbench.defenses import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, predict, train


def _context(ds, model, **extra):
    return DefenseContext(
        model=model, clean_x=ds.x_train[:200], clean_y=ds.y_train[:200], num_classes=10, in_channels=1,
        image_size=ds.image_size, crop_padding=1, allow_hflip=False, train_config=TrainConfig(),
        seed=0, device=torch.device("cpu"), new_model=lambda: None, **extra)


def test_defense_context_holds_no_test_data_poison_mask_or_asr():
    names = {f.name for f in dataclasses.fields(DefenseContext)}
    forbidden = {"x_test", "y_test", "poison_mask", "asr", "attack", "target_label", "triggered"}
    assert not names & forbidden
    assert {"model", "clean_x", "clean_y", "train_x", "train_y"} <= names


def test_every_defense_declares_a_kind_and_description():
    for entry in DEFENSES:
        assert isinstance(entry.obj.kind, DefenseKind)
        assert entry.description


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

    outcome = DEFENSES.build("ft", {}).run(_context(digits, model))  # the defaults
    effect.check("ones read as 0 after", (predict(outcome.model, ones) == 0).float().mean(), "<", 0.2)
    # A small clean budget costs some accuracy on the other classes, not much.
    accuracy_after = (predict(outcome.model, digits.x_test[others]) == digits.y_test[others]).float().mean()
    effect.check("accuracy drop on the other classes", accuracy_before - accuracy_after, "<", 0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Spy(Defense):
    """Records the context it is handed."""

    seen: list = []

    def run(self, context):
        _Spy.seen.append((self.kind, context))
        return DefenseOutcome()


def test_a_defense_can_reach_no_test_image_and_no_poison_mask(tmp_path, tiny_grid, digits):
    from bdbench import run_grid

    class DataSpy(_Spy):
        kind = DefenseKind.DATA_DETECTION

    class InputSpy(_Spy):
        kind = DefenseKind.INPUT_DETECTION

    DEFENSES.register("data-spy")(DataSpy)
    DEFENSES.register("input-spy")(InputSpy)
    try:
        tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}], defenses=["data-spy", "input-spy"])
        run_grid(tiny_grid, out=tmp_path, progress=False)
    finally:
        DEFENSES.unregister("data-spy")
        DEFENSES.unregister("input-spy")
    seen = dict(_Spy.seen)
    data_context, input_context = seen[DefenseKind.DATA_DETECTION], seen[DefenseKind.INPUT_DETECTION]
    train_rows = {bytes(row.numpy()) for row in digits.x_train}
    test_only = {bytes(row.numpy()) for row in digits.x_test} - train_rows
    for context in (data_context, input_context):
        tensors = {f.name: getattr(context, f.name) for f in dataclasses.fields(context)
                   if isinstance(getattr(context, f.name), torch.Tensor)}
        # Nothing shaped like a per-sample mask of the training set, and no test image anywhere.
        assert not any(t.dtype == torch.bool for t in tensors.values())
        for name, tensor in tensors.items():
            if tensor.ndim == 4:
                assert not {bytes(row.numpy()) for row in tensor} & test_only, name
        assert {bytes(row.numpy()) for row in context.clean_x} <= train_rows
    assert input_context.train_x is None and input_context.train_y is None
    assert len(data_context.train_x) == len(digits.x_train)
    # The labels a data defense sees are the attacker's: some were flipped to the target, none marked.
    assert (data_context.train_y != digits.y_train).any()
