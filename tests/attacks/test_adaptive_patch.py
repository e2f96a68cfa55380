"""Adaptive-Patch: payload and cover samples with one of four half-transparent patches, a combination of
them opaque at test time, and its effect on a tiny model."""

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.adaptive import patch_triggers
from bdbench.attacks.base import to_uint8
from bdbench.errors import ConfigError
from bdbench.training import predict

from attack_fixtures import check_poisoning_is_deterministic_per_seed, implanted, poison, prepared


def _windows(masks: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(first row, last row, first column, last column) of each mask's pixels."""
    out = []
    for mask in masks[:, 0]:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        out.append((int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())))
    return out


def test_the_patches_sit_where_the_authors_put_theirs_and_scale_with_the_image():
    marks, masks = patch_triggers(3, 32, 0)
    assert marks.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
    assert _windows(masks) == [(27, 31, 27, 31), (1, 13, 18, 30), (0, 31, 0, 31), (21, 28, 21, 28)]
    assert masks.flatten(1).sum(1).tolist() == [25, 169, 36, 64]  # the third: a 3x3 checker in each corner
    assert torch.equal(marks[2, :, :3, :3], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]).expand(3, 3, 3))
    marks28, masks28 = patch_triggers(1, 28, 0)
    assert masks28.flatten(1).sum(1).tolist() == [16, 121, 36, 49]  # sides 4, 11, 3 and 7 on 28x28 digits
    assert torch.equal(patch_triggers(1, 28, 0)[0], marks28) and not torch.equal(patch_triggers(1, 28, 1)[0], marks28)


def test_each_payload_and_cover_row_carries_one_patch_at_its_training_opacity(digits):
    attack = prepared("adaptive_patch", digits)
    poisoned = poison(attack, digits)
    y0, mask = digits.y_train, poisoned.poison_mask
    payload, covers = mask & (poisoned.y != y0), mask & (poisoned.y == y0)
    assert 2 * int(payload.sum()) == 2 * round(0.1 * len(y0)) == int(covers.sum())  # cover_ratio 2
    assert torch.equal(poisoned.cover_mask, covers) and torch.equal(poisoned.payload_mask, payload)  # for scoring
    assert (poisoned.y[payload] == 0).all() and (y0[mask] != 0).all()
    assert torch.equal(poisoned.x[~mask], digits.x_train[~mask])

    clean = digits.x_train[mask].float() / 255
    matches = torch.stack([
        (poisoned.x[mask] == to_uint8(clean + alpha * attack.masks[k] * (attack.marks[k] - clean))).flatten(1).all(1)
        for k, alpha in enumerate((0.5, 0.2, 0.5, 0.3))])  # (4, rows): row equals patch k stamped at its alpha
    stamped = matches.any(0)
    assert stamped.all()
    counts = matches.float().argmax(0).bincount(minlength=4)
    assert counts.max() - counts.min() <= 1  # the rows are split evenly among the four patches


def test_the_test_time_trigger_stamps_the_chosen_patches_opaque(digits):
    attack = prepared("adaptive_patch", digits)
    triggered = attack.triggered_test_set(digits, 0)
    x, out = triggered.x_clean, triggered.x
    on = (attack.masks[0] + attack.masks[2]).bool().expand_as(x)
    assert torch.equal(out[~on], x[~on])  # nothing outside patches 0 and 2
    # On 8x8 images patch 0 is the one pixel (7, 7), which the corner checker, stamped after it, covers (on
    # 32x32 images the checker covers 9 of its 25 pixels, as the authors' badnet_patch4 covers their phoenix).
    assert (out[:, :, [0, 0, 7, 7], [0, 7, 0, 7]] == 255).all()  # the checker's one white pixel per corner
    every = prepared("adaptive_patch", digits, test_patches=[3, 1], test_alpha=0.5).trigger(x[:5]).float() / 255
    for k in (1, 3):
        inside = attack.masks[k].bool().expand(5, 1, 8, 8)
        expected = 0.5 * x[:5].float() / 255 + 0.5 * attack.marks[k]
        assert torch.allclose(every[inside], expected[inside], atol=0.5 / 255 + 1e-6)


def test_poisoning_is_deterministic_per_seed(digits):
    check_poisoning_is_deterministic_per_seed(prepared("adaptive_patch", digits), digits)


@pytest.mark.parametrize("params, message", [
    ({"test_patches": [4]}, r"adaptive_patch test_patches \[4\] must name distinct patches among 0..3"),
    ({"test_patches": [0, 0]}, r"adaptive_patch test_patches \[0, 0\] must name distinct patches among 0..3"),
    ({"test_patches": []}, "parameter 'test_patches' is"),
    ({"alphas": [0.5, 0.5]}, "parameter 'alphas' is"),
    ({"alphas": [0.5, 0.5, 0.5, 2]}, "parameter 'alphas' is"),
    ({"label_mode": "all2all"}, "AdaptivePatch supports label_mode all2one only"),
])
def test_bad_parameters_are_one_line_config_errors(params, message):
    with pytest.raises(ConfigError, match=message) as raised:
        ATTACKS.build("adaptive_patch", params)
    assert "\n" not in str(raised.value)


def test_opaque_patches_fire_the_backdoor_and_a_single_training_patch_mostly_does_not(digits, effect):
    attack = prepared("adaptive_patch", digits)
    model, asr, clean = implanted(attack, digits, poison(attack, digits))
    effect.check("clean accuracy", clean, ">", 0.85)
    # On 8x8 digits the patches shrink to one to three pixels a side: the default test trigger (patches 0 and 2)
    # reaches 0.34-0.52 over seeds 0-2, all four 0.75-0.86; a model trained on clean digits, 0.
    effect.check("ASR", asr, ">", 0.2)
    every = prepared("adaptive_patch", digits, test_patches=[0, 1, 2, 3])
    effect.check("ASR of all four patches", (predict(model, every.triggered_test_set(digits, 0).x) == 0)
                 .float().mean().item(), ">", 0.6)
    # One patch at its training opacity, as the payload and cover samples carry it: 0.09-0.13 (0.42 without
    # cover samples).
    others = digits.x_test[digits.y_test != 0]
    partial = to_uint8(attack.training_trigger(others.float() / 255, torch.Generator().manual_seed(1)))
    effect.check("training-trigger ASR", (predict(model, partial) == 0).float().mean().item(), "<", 0.25)
