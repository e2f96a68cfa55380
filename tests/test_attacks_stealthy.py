"""WaNet, BPP, LF, input-aware, SSBA, Narcissus and DFB: each one's trigger, poison mask and labels, its
training hook where it has one, and its effect on a tiny model trained for seconds on `digits`."""

import dataclasses

import pytest
import torch

from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.attacks.bpp import dither_squeeze
from bdbench.attacks.lf import low_pass
from bdbench.attacks.public_data import without_attacker_pool
from bdbench.data import load_dataset
from bdbench.errors import ConfigError
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, predict, train

from conftest import SHARED_DATA
from effects import test_seed


def _prepared(name, dataset, workshop=None, **params):
    attack = ATTACKS.build(name, params)
    attack.prepare(dataset, target_label=0, workshop=workshop or AttackWorkshop(seed=0))
    return attack


def _victim(dataset, poisoned, attack, epochs):
    torch.manual_seed(test_seed())
    model = with_normalization(create_model("cnn-small", 10, 1, 8, width=16), dataset.mean, dataset.std)
    return train(model, poisoned.x, poisoned.y, TrainConfig(epochs=epochs, batch_size=64), seed=test_seed(),
                 crop_padding=dataset.crop_padding, hook=attack.training_hook())


def _rates(model, dataset, attack):
    triggered = attack.triggered_test_set(dataset, 0)
    asr = (predict(model, triggered.x) == triggered.y_target).float().mean().item()
    clean = (predict(model, dataset.x_test) == dataset.y_test).float().mean().item()
    return asr, clean


def _clean_model_asr(dataset, attack, epochs):
    """The ASR of the same trigger on a model trained on clean data: what the attack must beat."""
    model = _victim(dataset, ATTACKS.build("none", {}).poison(dataset, 0, 0, torch.Generator()),
                    ATTACKS.build("none", {}), epochs)
    return _rates(model, dataset, attack)[0]


def _record_hook_batches(attack, dataset, poisoned, batches=3):
    """Run the attack's hook on a few plain batches of the poisoned set, as the trainer would."""
    hook = attack.training_hook()
    generator = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, 64 * batches, 64):
        index = torch.arange(start, start + 64)
        x = poisoned.x[index].float() / 255
        y = poisoned.y[index]
        hx, hy = hook(x, y, generator, index)
        out.append((index, x, y, hx.detach(), hy))
    return out


# --- WaNet -------------------------------------------------------------------------------------
def test_wanet_warps_with_one_fixed_smooth_field_and_poisons_a_fixed_subset(digits):
    attack = _prepared("wanet", digits)
    again = _prepared("wanet", digits)
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
    attack = _prepared("wanet", digits)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    for index, x, y, hx, hy in _record_hook_batches(attack, digits, poisoned):
        assert torch.equal(hy, y)
        changed = (hx != x).flatten(1).any(1)
        rows_poisoned = poisoned.poison_mask[index]
        assert not (changed & rows_poisoned).any()  # the poisoned rows are already warped in the data
        assert int(changed.sum()) <= 2 * int(rows_poisoned.sum())
        assert int(changed.sum()) >= 2 * int(rows_poisoned.sum()) - 2  # a blank row may not change
        noisy = hx[changed]
        assert not torch.allclose(noisy, attack.add_trigger(x[changed]), atol=1e-3)  # noise, not the trigger


# --- BPP ---------------------------------------------------------------------------------------
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
    attack = _prepared("bpp", digits)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    mask = poisoned.poison_mask
    assert torch.equal(poisoned.x[mask], attack.trigger(digits.x_train[mask])) and (poisoned.y[mask] == 0).all()
    for index, x, y, hx, hy in _record_hook_batches(attack, digits, poisoned):
        assert torch.equal(hy, y)
        changed = (hx != x).flatten(1).any(1)
        assert not (changed & poisoned.poison_mask[index]).any()
        assert 0.1 * 64 <= int(changed.sum()) <= int(0.2 * 64)
        residual = hx[changed] - x[changed]
        own = attack.add_trigger(x[changed]) - x[changed]
        assert not torch.allclose(residual, own, atol=1e-3)  # someone else's residual


# --- LF ----------------------------------------------------------------------------------------
def test_lf_trigger_is_low_frequency_bounded_and_cached(tmp_path, digits):
    from bdbench.store import ArtifactCache

    workshop = AttackWorkshop(seed=0, cache=ArtifactCache(tmp_path), dataset_key="digits")
    attack = _prepared("lf", digits, workshop, surrogate_epochs=4, epochs=3)
    v = attack.perturbation
    assert torch.allclose(low_pass(v, attack.cutoff), v, atol=1e-5)  # nothing above the cut-off
    spectrum = torch.fft.fft2(v).abs()
    assert spectrum[..., 3:6, :].max() < 1e-4 and spectrum[..., :, 3:6].max() < 1e-4
    assert v.abs().max() < 1.5 * attack.eps and v.abs().max() > 0.3 * attack.eps
    again = _prepared("lf", digits, workshop, surrogate_epochs=4, epochs=3)
    assert torch.equal(again.perturbation, v)
    assert len(list((tmp_path / "attacks").glob("*.safetensors"))) == 2  # the surrogate and the trigger


# --- Input-aware -------------------------------------------------------------------------------
def test_inputaware_masks_are_sparse_and_triggers_depend_on_the_input(digits):
    attack = _prepared("inputaware", digits, mask_epochs=3)
    x = digits.x_test[:64].float() / 255
    with torch.no_grad():
        masks = attack.masks(x)
        triggered = attack.add_trigger(x)
    assert masks.mean() < 0.1  # pretrained towards the paper's density of 0.032
    assert masks.mean((1, 2, 3)).std() > 0 or (masks[0] != masks[1]).any()
    residuals = triggered - x
    assert (residuals[0] != residuals[1]).any()  # input-aware: each image its own trigger


def test_inputaware_hook_trains_the_generator_with_the_victim(digits):
    attack = _prepared("inputaware", digits, mask_epochs=3)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    mask = poisoned.poison_mask
    assert torch.equal(poisoned.x, digits.x_train) and (poisoned.y[mask] == 0).all()  # clean until trained
    before = {k: v.clone() for k, v in attack.pattern_net.state_dict().items()}
    batches = _record_hook_batches(attack, digits, poisoned)
    for index, x, y, hx, hy in batches:
        assert torch.equal(hy, y)
        changed = (hx != x).flatten(1).any(1)
        rows_poisoned = mask[index]
        assert changed[rows_poisoned].all()  # every poisoned row carries its generated trigger
        cross = changed & ~rows_poisoned
        assert 1 <= int(cross.sum()) <= round(0.1 * 64)  # cross-trigger rows, labels kept
    after = attack.pattern_net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # G took optimiser steps
    final = attack.after_training(poisoned)
    assert torch.equal(final.x[mask], attack.trigger(digits.x_train[mask]))
    assert torch.equal(final.x[~mask], digits.x_train[~mask])


def test_inputaware_cached_victim_comes_back_with_its_generator(tmp_path, tiny_grid):
    import sqlite3

    from bdbench.runner import run_grid

    tiny_grid.update(attacks=[{"name": "inputaware", "mask_epochs": 2}], defenses=["none"],
                     training={"epochs": 4, "batch_size": 64, "lr": 0.05})
    first = run_grid(tiny_grid, out=tmp_path, progress=False).iloc[0]
    assert first["status"] == "ok", first["error"]
    assert not first["victim_cached"]
    assert len(list((tmp_path / "cache" / "victims").glob("*.attack.safetensors"))) == 1
    with sqlite3.connect(tmp_path / "results.sqlite") as db:  # forget the row, keep the cached victim
        db.execute("DELETE FROM experiments")
    again = run_grid(tiny_grid, out=tmp_path, progress=False).iloc[0]
    # Without its saved generator the cached victim would be tested with a fresh, untrained one.
    assert again["victim_cached"] and again["asr"] == first["asr"], (first["asr"], again["asr"])


# --- SSBA --------------------------------------------------------------------------------------
def test_ssba_residuals_are_small_and_sample_specific(digits):
    attack = _prepared("ssba", digits, steps=600)
    x = digits.x_test[:64]
    residual = attack.trigger(x).float() - x.float()
    assert residual.abs().max() <= 255 * attack.max_residual + 1
    assert residual.abs().mean() > 0.5  # the secret is really written into the image
    assert (residual[0] != residual[1]).any()  # each image its own residual


def test_ssba_trains_on_the_stored_8_bit_image_with_the_rounding_passed_straight_through():
    from bdbench.attacks.ssba import stored_as_uint8

    x = torch.tensor([0.0, 0.3 / 255, 0.7 / 255, 0.5], requires_grad=True)
    stored = stored_as_uint8(x)
    assert torch.allclose(stored, torch.tensor([0.0, 0.0, 1 / 255, 128 / 255]))  # what a uint8 file holds
    stored.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))  # a residual below half a grey level still gets a gradient


# --- Every dirty-label attack: a short training run learns the backdoor ------------------------
@pytest.mark.parametrize("name, params, epochs", [
    # s=2 and no noise mode: on 8x8 images the paper's warp moves pixels by a fifth of a pixel and
    # its noise mode by as much, more than seconds of training resolve; mnist5k runs the defaults.
    ("wanet", {"s": 2.0, "cross_ratio": 0}, 15),
    # 2 levels instead of 8 (negative samples on): 8x8 digits have 17 grey levels, and 3-bit
    # dithering changes them too little for seconds of training; mnist5k runs the paper's 8.
    ("bpp", {"squeeze_num": 2}, 15),
    ("lf", {"surrogate_epochs": 4, "epochs": 3}, 10),
    # The generator learns with the victim, so it needs more epochs than the fixed triggers.
    ("inputaware", {"mask_epochs": 3}, 20),
    ("ssba", {"steps": 1500}, 20),
])
def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect, name, params, epochs):
    attack = _prepared(name, digits, **params)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(test_seed()))
    assert (poisoned.y[poisoned.poison_mask] == 0).all()
    model = _victim(digits, poisoned, attack, epochs)
    asr, clean = _rates(model, digits, attack)
    effect.check("clean accuracy", clean, ">", 0.9)
    # The input-aware generator learns with the victim: its ASR lands at 0.73-0.79 on one thread or AVX2
    # kernels (0.90 with 30 epochs on AVX-512, still 0.78 on AVX2), the fixed triggers' at 0.96-1.0.
    effect.check("ASR", asr, ">", 0.6 if name == "inputaware" else 0.8)


# --- Narcissus ---------------------------------------------------------------------------------
def _narcissus(digits):
    return _prepared("narcissus", digits, pood_epochs=3, finetune_epochs=2, trigger_epochs=20)


def test_narcissus_poisons_target_class_images_only_and_keeps_their_labels(digits):
    attack = _narcissus(digits)
    assert attack.delta.abs().max() <= attack.eps + 1e-6 and attack.delta.abs().max() > 0
    poisoned = attack.poison(digits, 0.0005, 0, torch.Generator().manual_seed(0))
    victim = without_attacker_pool(digits)  # the victim never trains on the attacker's target-class examples
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 1  # 0.05% of the victim's 1,293 images, at least one
    assert (victim.y_train[mask] == 0).all() and torch.equal(poisoned.y, victim.y_train)  # clean label
    assert torch.equal(poisoned.x[mask], attack.trigger(victim.x_train[mask]))
    triggered = attack.triggered_test_set(digits, 0)
    x = digits.x_test[digits.y_test != 0]
    expected = (x.float() / 255 + 3 * attack.delta).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(triggered.x, expected)  # magnified three times at test time
    assert torch.equal(triggered.x_clean, x)  # what PSNR/SSIM and the triggers picture compare against
    with pytest.raises(Exception, match="clean-label"):
        ATTACKS.build("narcissus", {"label_mode": "all2all"})


@pytest.mark.xfail(strict=True, reason=(
    "no class-disjoint public data ships offline: the POOD set for digits is mnist5k's other ten "
    "digits, so the surrogate separates the two scanners, not the target class, and the trigger "
    "does not transfer (measured ASR 0.0 on digits at eps 16, 32 and 48/255); strict, so a working POOD shows up here"))
def test_narcissus_trigger_turns_predictions_towards_the_target(digits):
    attack = _narcissus(digits)
    poisoned = attack.poison(digits, 0.05, 0, torch.Generator().manual_seed(0))
    asr, clean = _rates(_victim(digits, poisoned, attack, 10), digits, attack)
    baseline = _clean_model_asr(digits, attack, 10)
    assert clean > 0.9 and asr > baseline + 0.3, (asr, baseline, clean)


# --- DFB ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dfb(digits):
    return _prepared("dfb", digits, surrogate={"epochs": 4, "width": 8}, encoder_epochs=20, encoder_lr=1e-3)


def test_dfb_adds_one_clipped_residual_to_target_class_images_and_keeps_their_labels(digits, dfb):
    eps = dfb.eps
    assert dfb.residual.shape == digits.x_train.shape[1:]
    assert dfb.residual.abs().max() > 6 * eps  # unclipped: the clipping bounds below are what act
    poisoned = dfb.poison(digits, 0.05, 0, torch.Generator().manual_seed(0))
    victim = without_attacker_pool(digits)  # the victim never trains on the attacker pool
    mask = poisoned.poison_mask
    assert int(mask.sum()) == round(0.05 * len(victim.y_train)) and (victim.y_train[mask] == 0).all()
    assert torch.equal(poisoned.y, victim.y_train) and torch.equal(poisoned.x[~mask], victim.x_train[~mask])
    x = victim.x_train[mask].float() / 255
    # Training images carry the residual clipped to 2 eps, test images the same residual clipped to 6 eps.
    expected = (x + dfb.residual.clamp(-2 * eps, 2 * eps)).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(poisoned.x[mask], expected)
    triggered = dfb.triggered_test_set(digits, 0)
    assert (triggered.y_true != 0).all() and (triggered.y_target == 0).all()
    change = triggered.x.float() - triggered.x_clean.float()
    assert change.abs().max() <= 6 * eps * 255 + 0.5 and change.abs().max() > 2 * eps * 255 + 0.5


@pytest.mark.skipif(not (SHARED_DATA / "cifar10.npz").is_file(), reason="../shared/data/cifar10.npz is absent")
def test_dfb_residual_erases_the_target_class_on_the_public_data_surrogate(effect):
    # The encoder's objective: public target-class images, with the residual, read as "other class". On
    # digits the attacker pool's 14 zeros are too few and too plain for an 8/255 residual; on the first
    # 5,000 CIFAR-10 images the pool holds 50 airplanes and 450 others.
    cifar10 = load_dataset("npz", path=str(SHARED_DATA / "cifar10.npz"), allow_hflip=True)
    cifar10 = dataclasses.replace(cifar10, x_train=cifar10.x_train[:5000], y_train=cifar10.y_train[:5000])
    dfb = _prepared("dfb", cifar10, surrogate={"epochs": 4, "width": 8}, encoder_epochs=60, encoder_lr=1e-3)
    effect.check("share fooled, less the clean images' share", dfb.surrogate_fooled - dfb.surrogate_fooled_clean,
                 ">", 0.1)


def test_dfb_learns_from_the_attacker_pool_on_any_data_set(digits):
    # The attacker pool stands in for public images of the task's classes, so no data set is refused.
    signs = dataclasses.replace(digits, name="signs")
    attack = _prepared("dfb", signs, surrogate={"epochs": 1, "width": 8}, encoder_epochs=1)
    assert attack.residual.shape == digits.x_train.shape[1:]
    with pytest.raises(ConfigError, match="clean-label"):
        ATTACKS.build("dfb", {"label_mode": "all2all"})


@pytest.mark.xfail(strict=True, reason=(
    "the paper's 8/255 residual makes the surrogate drop the target class on none of the attacker pool's 14 "
    "zeros of digits (the paper asks 99% before poisoning; even 64/255 fooled none): near-binary digits take "
    "far larger L-infinity budgets to fool a classifier (with the other digit set as public data: ASR 0.013 "
    "on mnist5k at the paper's 0.1%, 0.176 at 5%); strict, so an encoder that erases the class shows up here"))
def test_dfb_trigger_turns_predictions_towards_the_target(digits, dfb):
    poisoned = dfb.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))  # every target-class image
    asr, clean = _rates(_victim(digits, poisoned, dfb, 10), digits, dfb)
    baseline = _clean_model_asr(digits, dfb, 10)
    assert clean > 0.9 and asr > baseline + 0.3, (asr, baseline, clean)
