"""LF (low-frequency trigger): its trigger and its effect on a tiny model."""

import torch

from bdbench.attacks import AttackWorkshop
from bdbench.attacks.lf import low_pass

from attack_fixtures import check_dirty_label_effect, prepared


def test_lf_trigger_is_low_frequency_bounded_and_cached(tmp_path, digits):
    from bdbench.store import ArtifactCache

    workshop = AttackWorkshop(seed=0, cache=ArtifactCache(tmp_path), dataset_key="digits")
    attack = prepared("lf", digits, workshop, surrogate_epochs=4, epochs=3)
    v = attack.perturbation
    assert torch.allclose(low_pass(v, attack.cutoff), v, atol=1e-5)  # nothing above the cut-off
    spectrum = torch.fft.fft2(v).abs()
    assert spectrum[..., 3:6, :].max() < 1e-4 and spectrum[..., :, 3:6].max() < 1e-4
    assert v.abs().max() < 1.5 * attack.eps and v.abs().max() > 0.3 * attack.eps
    again = prepared("lf", digits, workshop, surrogate_epochs=4, epochs=3)
    assert torch.equal(again.perturbation, v)
    assert len(list((tmp_path / "attacks").glob("*.safetensors"))) == 2  # the surrogate and the trigger


def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect):
    check_dirty_label_effect("lf", digits, effect, {"surrogate_epochs": 4, "epochs": 3}, 10)
