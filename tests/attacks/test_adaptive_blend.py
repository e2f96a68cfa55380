"""Adaptive-Blend: payload and cover samples with a random half of the pattern's pieces, the full pattern at
test time, and its effect on a tiny model."""

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.base import to_uint8
from bdbench.errors import ConfigError
from bdbench.training import predict

from attack_fixtures import check_poisoning_is_deterministic_per_seed, implanted, poison, prepared


def _cells(x: torch.Tensor) -> torch.Tensor:
    """(N, C, 8, 8) -> (N, 16, C * 4): the 2x2 cells of a 4x4 grid on 8x8 images, row by row."""
    return x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def test_payload_rows_take_the_target_and_cover_rows_keep_their_label_both_with_half_the_pieces(digits):
    attack = prepared("adaptive_blend", digits)
    poisoned = poison(attack, digits)
    y0, mask = digits.y_train, poisoned.poison_mask
    payload, covers = mask & (poisoned.y != y0), mask & (poisoned.y == y0)
    assert int(payload.sum()) == round(0.1 * len(y0)) == int(covers.sum())  # cover_ratio 1
    assert torch.equal(poisoned.cover_mask, covers) and torch.equal(poisoned.payload_mask, payload)  # for scoring
    assert (poisoned.y[payload] == 0).all() and (y0[mask] != 0).all()  # both drawn from non-target classes
    assert torch.equal(poisoned.x[~mask], digits.x_train[~mask]) and torch.equal(poisoned.y[~mask], y0[~mask])

    clean = digits.x_train[mask]
    full = to_uint8(clean.float() / 255 + 0.15 * (attack.pattern - clean.float() / 255))  # every piece at alpha
    got, clean_cells, full_cells = _cells(poisoned.x[mask]), _cells(clean), _cells(full)
    blended = (got == full_cells).all(2) & (got != clean_cells).any(2)
    untouched = (got == clean_cells).all(2)
    assert (blended | untouched).all()  # each piece is either blended at the training alpha or left alone
    assert (blended.sum(1) == 8).all()  # 8 of the 16 pieces per image
    assert len({tuple(row.tolist()) for row in blended}) > len(blended) // 2  # drawn per image


def test_test_time_trigger_is_the_whole_pattern_at_the_higher_alpha_as_blended(digits):
    attack = prepared("adaptive_blend", digits)
    triggered = attack.triggered_test_set(digits, 0)
    x = triggered.x_clean.float() / 255
    assert torch.equal(triggered.x, to_uint8(x + 0.2 * (attack.pattern - x)))
    assert torch.equal(triggered.x, prepared("blended", digits, alpha=0.2).triggered_test_set(digits, 0).x)
    assert (triggered.y_true != 0).all() and (triggered.y_target == 0).all()


def test_poisoning_is_deterministic_per_seed(digits):
    check_poisoning_is_deterministic_per_seed(prepared("adaptive_blend", digits), digits)


@pytest.mark.parametrize("params, message", [
    ({"pieces": 15}, "adaptive_blend pieces 15 is not a square number; use a grid's cell count such as 9 or 16"),
    ({"piece_share": 0.01}, "adaptive_blend piece_share 0.01 of 16 pieces keeps none"),
    ({"alpha": 1.5}, "parameter 'alpha' is 1.5: input should be less than or equal to 1"),
    ({"cover_ratio": -1}, "parameter 'cover_ratio' is -1: input should be greater than or equal to 0"),
    ({"label_mode": "all2all"}, "AdaptiveBlend supports label_mode all2one only"),
])
def test_bad_parameters_are_one_line_config_errors(params, message):
    with pytest.raises(ConfigError, match=message) as raised:
        ATTACKS.build("adaptive_blend", params)
    assert "\n" not in str(raised.value)


def test_a_grid_finer_than_the_image_is_refused(digits):
    with pytest.raises(ConfigError, match="pieces 100 make a 10x10 grid finer than the 8x8 images; use at most 64"):
        prepared("adaptive_blend", digits, pieces=100)


def test_the_full_pattern_fires_the_backdoor_and_the_training_pieces_mostly_do_not(digits, effect):
    attack = prepared("adaptive_blend", digits)
    model, asr, clean = implanted(attack, digits, poison(attack, digits))
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.9)
    # The cover samples teach the model that half the pieces at the training alpha are no trigger: on
    # non-target test images, such a partial trigger sends 0.36-0.40 to the target (seeds 0-2; 0.87 without
    # cover samples, cover_ratio 0).
    others = digits.x_test[digits.y_test != 0]
    partial = to_uint8(attack.training_trigger(others.float() / 255, torch.Generator().manual_seed(1)))
    effect.check("partial-trigger ASR", (predict(model, partial) == 0).float().mean().item(), "<", 0.6)
