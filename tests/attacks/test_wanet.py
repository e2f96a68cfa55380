"""WaNet: its warping field, its noise mode, and its effect on a tiny model."""

import torch

from attack_fixtures import check_dirty_label_effect, prepared, record_hook_batches


def test_wanet_warps_with_one_fixed_smooth_field_and_poisons_a_fixed_subset(digits):
    attack = prepared("wanet", digits)
    again = prepared("wanet", digits)
    assert torch.equal(attack.grid, again.grid)  # the field comes from the seed
    line = torch.linspace(-1, 1, 8)
    identity = torch.stack(torch.meshgrid(line, line, indexing="xy"), -1)
    shift = (attack.grid[0] - identity).abs()
    assert 0 < shift.max() < 0.5  # a small warp, at most a fraction of the image
    x = torch.rand(3, 1, 8, 8)
    warped = attack.add_trigger(x)
    assert torch.allclose(warped, torch.nn.functional.grid_sample(x, attack.grid.expand(3, -1, -1, -1),
                                                                  align_corners=True))
    flat = torch.full((1, 1, 8, 8), 0.4)
    assert torch.allclose(attack.add_trigger(flat), flat, atol=1e-5)  # a warp moves pixels, adds nothing

    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    mask = poisoned.poison_mask
    assert int(mask.sum()) == round(0.1 * len(mask)) and (poisoned.y[mask] == 0).all()
    assert torch.equal(poisoned.x[mask], attack.trigger(digits.x_train[mask]))
    assert torch.equal(poisoned.x[~mask], digits.x_train[~mask])


def test_wanet_noise_mode_warps_twice_as_many_clean_rows_and_keeps_their_labels(digits):
    attack = prepared("wanet", digits)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    for index, x, y, hx, hy in record_hook_batches(attack, poisoned):
        assert torch.equal(hy, y)
        changed = (hx != x).flatten(1).any(1)
        rows_poisoned = poisoned.poison_mask[index]
        assert not (changed & rows_poisoned).any()  # the poisoned rows are already warped in the data
        assert int(changed.sum()) <= 2 * int(rows_poisoned.sum())
        assert int(changed.sum()) >= 2 * int(rows_poisoned.sum()) - 2  # a blank row may not change
        noisy = hx[changed]
        assert not torch.allclose(noisy, attack.add_trigger(x[changed]), atol=1e-3)  # noise, not the trigger


def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect):
    # s=2 and no noise mode: on 8x8 images the paper's warp moves pixels by a fifth of a pixel and
    # its noise mode by as much, more than seconds of training resolve; mnist5k runs the defaults.
    check_dirty_label_effect("wanet", digits, effect, {"s": 2.0, "cross_ratio": 0}, 15)
