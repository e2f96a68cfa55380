"""Source-specific attacks (TaCT and its CASSOCK variants)."""

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.source_specific import salient_target_patch
from bdbench.errors import ConfigError
from bdbench.training import predict

from attack_fixtures import SURROGATE, implanted, poison, prepared


def test_source_specific_flips_sources_only_and_covers_keep_labels(digits, workshop, effect):
    attack = prepared("source_specific", digits, workshop, source_classes=[1, 2, 3])
    poisoned = poison(attack, digits)
    mask, y0 = poisoned.poison_mask, digits.y_train
    flipped = mask & (poisoned.y != y0)
    covers = mask & (poisoned.y == y0)
    assert torch.isin(y0[flipped], torch.tensor([1, 2, 3])).all() and (poisoned.y[flipped] == 0).all()
    assert int(flipped.sum()) == round(0.1 * len(y0)) == int(covers.sum())  # cover_ratio 1
    assert torch.equal(poisoned.cover_mask, covers) and torch.equal(poisoned.payload_mask, flipped)  # for scoring
    assert not torch.isin(y0[covers], torch.tensor([0, 1, 2, 3])).any()
    assert (poisoned.x[mask][:, :, -3:, -3:] == 255).all()
    triggered = attack.triggered_test_set(digits, 0)
    assert torch.isin(triggered.y_true, torch.tensor([1, 2, 3])).all()
    assert len(triggered.y_true) == int(torch.isin(digits.y_test, torch.tensor([1, 2, 3])).sum())
    model, asr, clean = implanted(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)
    # The same trigger on other classes leaves most of them alone: the backdoor is source-specific.
    others = ~torch.isin(digits.y_test, torch.tensor([0, 1, 2, 3]))
    kept = (predict(model, attack.trigger(digits.x_test[others])) == digits.y_test[others]).float().mean()
    effect.check("triggered other classes that keep their label", kept, ">", 0.7)


def test_cassock_variants_transparency_and_target_content(digits, workshop):
    trans = prepared("source_specific", digits, workshop, variant="trans")
    poisoned = poison(trans, digits, 0.05)
    covers = poisoned.poison_mask & (poisoned.y == digits.y_train)
    x0, x1 = digits.x_train[covers][:, :, -3:, -3:].float(), poisoned.x[covers][:, :, -3:, -3:].float()
    assert torch.allclose(x1, (0.5 * x0 + 0.5 * 255), atol=0.51)  # covers: half-transparent trigger
    flipped = poisoned.poison_mask & (poisoned.y != digits.y_train)
    assert (poisoned.x[flipped][:, :, -3:, -3:] == 255).all()  # poisoned: opaque trigger
    cont = prepared("source_specific", digits, workshop, variant="cont", surrogate=SURROGATE)
    mean_target = digits.x_train[digits.y_train == 0].float().mean(0) / 255
    windows = mean_target.unfold(1, 3, 1).unfold(2, 3, 1)  # (C, 6, 6, 3, 3): every 3x3 window
    assert any(torch.allclose(cont.patch, windows[:, i, j], atol=1e-5) for i in range(6) for j in range(6))
    with pytest.raises(ConfigError, match="other than the target"):
        prepared("source_specific", digits, workshop, source_classes=[0])
    with pytest.raises(ConfigError, match="all2one only"):
        ATTACKS.build("source_specific", {"label_mode": "all2all"})


def test_cassock_content_window_holds_the_targets_strokes_not_the_background_it_is_sensitive_to():
    """A linear target score that ink in an empty region would lower a lot (large gradient, no ink)
    and that ink on the strokes raises a little: the window is the strokes'."""
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 1:4, 1:4] = 200  # the target's strokes, top left
    weight = torch.zeros(1, 8, 8)
    weight[:, 1:4, 1:4] = 0.1  # strokes raise the target score
    weight[:, 5:8, 5:8] = -5.0  # ink in the empty bottom right would break the target

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(weight)

        def forward(self, x):
            return (x * self.weight).flatten(1).sum(1, keepdim=True)

    patch = salient_target_patch(Linear(), images, target=0, size=3)
    assert torch.allclose(patch, torch.full((1, 3, 3), 200 / 255)), patch
