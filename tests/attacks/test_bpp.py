"""BPP (image quantisation and dithering): its trigger, its negative samples, and its effect on a tiny model."""

import torch

from bdbench.attacks.bpp import dither_squeeze

from attack_fixtures import check_dirty_label_effect, prepared, record_hook_batches


def test_bpp_dithering_uses_few_levels_and_keeps_local_brightness():
    x = torch.linspace(0, 1, 64).view(1, 1, 8, 8).repeat(2, 3, 1, 1)
    out = dither_squeeze(x, 8)
    levels = out * 7
    assert torch.allclose(levels, levels.round(), atol=1e-5)  # only the 8 levels of 3 bits
    plain = torch.round(x * 7) / 7
    assert not torch.equal(out, plain)  # the error diffusion changes the plain quantisation
    assert abs(out.mean() - x.mean()) < abs(plain.mean() - x.mean()) + 0.01  # dithering keeps the mean
    assert (out - x).abs().max() <= 1.5 / 7  # at most about one level off


def test_bpp_negative_samples_carry_other_images_residuals_with_true_labels(digits):
    attack = prepared("bpp", digits)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    mask = poisoned.poison_mask
    assert torch.equal(poisoned.x[mask], attack.trigger(digits.x_train[mask])) and (poisoned.y[mask] == 0).all()
    for index, x, y, hx, hy in record_hook_batches(attack, poisoned):
        assert torch.equal(hy, y)
        changed = (hx != x).flatten(1).any(1)
        assert not (changed & poisoned.poison_mask[index]).any()
        assert 0.1 * 64 <= int(changed.sum()) <= int(0.2 * 64)
        residual = hx[changed] - x[changed]
        own = attack.add_trigger(x[changed]) - x[changed]
        assert not torch.allclose(residual, own, atol=1e-3)  # someone else's residual


def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect):
    # 2 levels instead of 8 (negative samples on): 8x8 digits have 17 grey levels, and 3-bit
    # dithering changes them too little for seconds of training; mnist5k runs the paper's 8.
    check_dirty_label_effect("bpp", digits, effect, {"squeeze_num": 2}, 15)
