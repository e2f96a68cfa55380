"""The defense interface: what a defender's context holds and what it cannot reach, and what every defense declares."""

import dataclasses
from typing import ClassVar

import torch

from bdbench.defenses import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome


def test_defense_context_holds_no_test_data_poison_mask_or_asr():
    names = {f.name for f in dataclasses.fields(DefenseContext)}
    forbidden = {"x_test", "y_test", "poison_mask", "asr", "attack", "target_label", "triggered"}
    assert not names & forbidden
    assert {"model", "clean_x", "clean_y", "train_x", "train_y"} <= names


def test_every_defense_declares_a_kind_and_description():
    for entry in DEFENSES:
        assert isinstance(entry.obj.kind, DefenseKind)
        assert entry.description


class _Spy(Defense):
    """Records the context it is handed."""

    seen: ClassVar[list] = []

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
