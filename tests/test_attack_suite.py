"""The attacks beyond BadNets/Blended: each test checks what the attack writes (mask, labels,
trigger) and, where a tiny model can show it in seconds, that a short training run obeys the
trigger. One tiny clean surrogate (width 8, 4 epochs) is trained once and shared through the cache."""

import math

import pytest
import torch

from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.attacks.source_specific import salient_target_patch
from bdbench.errors import ConfigError
from bdbench.models import create_model, with_normalization
from bdbench.store import ArtifactCache
from bdbench.training import TrainConfig, predict, predict_logits, train

from effects import test_seed

SURROGATE = {"width": 8, "epochs": 4, "batch_size": 64}


@pytest.fixture(scope="module")
def workshop(tmp_path_factory):
    return AttackWorkshop(seed=0, cache=ArtifactCache(tmp_path_factory.mktemp("cache")), dataset_key="digits")


def _prepared(name, dataset, workshop, **params):
    attack = ATTACKS.build(name, params)
    attack.prepare(dataset, target_label=0, workshop=workshop)
    return attack


def _victim(poisoned, dataset):
    torch.manual_seed(test_seed())
    model = with_normalization(create_model("cnn-small", 10, 1, 8, width=16), dataset.mean, dataset.std)
    return train(model, poisoned.x, poisoned.y, TrainConfig(epochs=15, batch_size=64), seed=test_seed())


def _asr_and_accuracy(attack, dataset, poisoned):
    model = _victim(poisoned, dataset)
    triggered = attack.triggered_test_set(dataset, 0)
    asr = (predict(model, triggered.x) == triggered.y_target).float().mean()
    clean = (predict(model, dataset.x_test) == dataset.y_test).float().mean()
    return model, asr, clean


def _poison(attack, dataset, rate=0.1):
    return attack.poison(dataset, rate, 0, torch.Generator().manual_seed(test_seed()))


def _assert_clean_label(poisoned, dataset):
    mask = poisoned.poison_mask
    assert mask.any() and (dataset.y_train[mask] == 0).all()  # target-class images only
    assert torch.equal(poisoned.y, dataset.y_train)  # no label changed
    assert torch.equal(poisoned.x[~mask], dataset.x_train[~mask])


# ---------------------------------------------------------------- sig

def test_sig_adds_the_papers_sinusoid_to_target_class_images_only(digits, workshop):
    attack = _prepared("sig", digits, workshop, delta=20, frequency=6, delta_test=40)
    poisoned = _poison(attack, digits)
    _assert_clean_label(poisoned, digits)
    assert int(poisoned.poison_mask.sum()) == min(int((digits.y_train == 0).sum()), round(0.1 * len(digits.y_train)))
    grey = torch.full((1, 1, 8, 8), 0.5)
    signal = torch.tensor([20 / 255 * math.sin(2 * math.pi * j * 6 / 8) for j in range(8)])
    assert torch.allclose(attack.poison_images((grey * 255).to(torch.uint8), torch.tensor([0])).float() / 255,
                          (127 / 255 + signal).expand(1, 1, 8, 8), atol=1 / 255)
    assert torch.allclose(attack.add_trigger(grey), (0.5 + 2 * signal).expand(1, 1, 8, 8))  # delta_test = 2 delta
    assert torch.allclose(_prepared("sig", digits, workshop, signal="ramp", delta=80).add_trigger(torch.zeros(1, 1, 8, 8))[0, 0, 3],
                          torch.arange(8) / 8 * 80 / 255)
    triggered = attack.triggered_test_set(digits, 0)
    assert (triggered.y_target == 0).all() and (triggered.y_true != 0).all()


def test_clean_label_attacks_refuse_all_to_all():
    for name in ("sig", "lc"):
        with pytest.raises(ConfigError, match="all2one only.*clean-label"):
            ATTACKS.build(name, {"label_mode": "all2all"})
    with pytest.raises(ConfigError, match="all2one only"):
        ATTACKS.build("advdoor", {"label_mode": "all2all"})


# ---------------------------------------------------------------- lc

def test_lc_perturbs_target_images_within_eps_adds_corner_triggers_and_implants(digits, workshop, effect):
    eps = 16 / 255
    attack = _prepared("lc", digits, workshop, eps=eps, steps=20, surrogate=SURROGATE)
    poisoned = _poison(attack, digits)
    _assert_clean_label(poisoned, digits)
    mask = poisoned.poison_mask
    x0, x1 = digits.x_train[mask].float(), poisoned.x[mask].float()
    corners = attack.mask.bool()
    # Outside the four 3x3 corners only the PGD perturbation, within eps; inside, the pattern.
    assert (x1 - x0)[:, :, ~corners].abs().max() <= 16 + 1
    assert (x1 - x0)[:, :, ~corners].abs().max() >= 8  # PGD used its budget
    pattern = (attack.sign > 0).float() * 255
    assert torch.equal(x1[:, :, corners], pattern[corners].expand_as(x1[:, :, corners]))
    # The perturbation works against the surrogate: it misclassifies the perturbed images more.
    surrogate = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    idx = torch.nonzero(mask).flatten()
    adv = torch.stack([attack.x_adv[int(i)] for i in idx])
    effect.check("surrogate's accuracy on the images, unperturbed less perturbed",
                 (predict(surrogate, digits.x_train[idx]) == 0).float().mean() - (predict(surrogate, adv) == 0).float().mean(),
                 ">", 0)
    _, asr, clean = _asr_and_accuracy(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.8)


# ---------------------------------------------------------------- trojannn

def test_trojannn_trigger_sits_in_its_mask_excites_its_neurons_and_implants(digits, workshop, effect):
    attack = _prepared("trojannn", digits, workshop, area=0.07, steps=100, surrogate=SURROGATE)
    side = round(math.sqrt(0.07) * 8)
    assert int(attack.mask.sum()) == side * side and attack.mask[0, -side:, -side:].all()
    assert (attack.pattern[:, ~attack.mask[0].bool()] == 0).all()
    surrogate = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    from bdbench.attacks.trojannn import feature_layer

    layer, _ = feature_layer(surrogate)
    seen = []
    handle = layer.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0][:, attack.neurons]))
    with torch.no_grad():
        surrogate(attack.pattern[None])
        surrogate(torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * attack.mask)
    handle.remove()
    # The optimised trigger fires the chosen neurons harder than any of 20 random fillings of its mask.
    effect.check("neuron excitation, trigger less the best random filling", seen[0].sum() - seen[1].sum(1).max(), ">", 0)
    poisoned = _poison(attack, digits)
    assert (poisoned.y[poisoned.poison_mask] == 0).all()
    _, asr, clean = _asr_and_accuracy(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)


# ---------------------------------------------------------------- advdoor

def test_advdoor_trigger_is_a_targeted_universal_perturbation_within_eps(digits, workshop, effect):
    eps = 16 / 255
    attack = _prepared("advdoor", digits, workshop, eps=eps, surrogate=SURROGATE)
    assert attack.delta.abs().max() <= eps + 1e-6
    surrogate = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    others = digits.x_test[digits.y_test != 0]
    effect.check("surrogate's target share, triggered less clean",
                 (predict(surrogate, attack.trigger(others)) == 0).float().mean() - (predict(surrogate, others) == 0).float().mean(),
                 ">", 0)
    poisoned = _poison(attack, digits)
    _, asr, clean = _asr_and_accuracy(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)


# ---------------------------------------------------------------- source_specific

def test_source_specific_flips_sources_only_and_covers_keep_labels(digits, workshop, effect):
    attack = _prepared("source_specific", digits, workshop, source_classes=[1, 2, 3])
    poisoned = _poison(attack, digits)
    mask, y0 = poisoned.poison_mask, digits.y_train
    flipped = mask & (poisoned.y != y0)
    covers = mask & (poisoned.y == y0)
    assert torch.isin(y0[flipped], torch.tensor([1, 2, 3])).all() and (poisoned.y[flipped] == 0).all()
    assert int(flipped.sum()) == round(0.1 * len(y0)) == int(covers.sum())  # cover_ratio 1
    assert not torch.isin(y0[covers], torch.tensor([0, 1, 2, 3])).any()
    assert (poisoned.x[mask][:, :, -3:, -3:] == 255).all()
    triggered = attack.triggered_test_set(digits, 0)
    assert torch.isin(triggered.y_true, torch.tensor([1, 2, 3])).all()
    assert len(triggered.y_true) == int(torch.isin(digits.y_test, torch.tensor([1, 2, 3])).sum())
    model, asr, clean = _asr_and_accuracy(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)
    # The same trigger on other classes leaves most of them alone: the backdoor is source-specific.
    others = ~torch.isin(digits.y_test, torch.tensor([0, 1, 2, 3]))
    kept = (predict(model, attack.trigger(digits.x_test[others])) == digits.y_test[others]).float().mean()
    effect.check("triggered other classes that keep their label", kept, ">", 0.7)


def test_cassock_variants_transparency_and_target_content(digits, workshop):
    trans = _prepared("source_specific", digits, workshop, variant="trans")
    poisoned = _poison(trans, digits, 0.05)
    covers = poisoned.poison_mask & (poisoned.y == digits.y_train)
    x0, x1 = digits.x_train[covers][:, :, -3:, -3:].float(), poisoned.x[covers][:, :, -3:, -3:].float()
    assert torch.allclose(x1, (0.5 * x0 + 0.5 * 255), atol=0.51)  # covers: half-transparent trigger
    flipped = poisoned.poison_mask & (poisoned.y != digits.y_train)
    assert (poisoned.x[flipped][:, :, -3:, -3:] == 255).all()  # poisoned: opaque trigger
    cont = _prepared("source_specific", digits, workshop, variant="cont", surrogate=SURROGATE)
    mean_target = digits.x_train[digits.y_train == 0].float().mean(0) / 255
    windows = mean_target.unfold(1, 3, 1).unfold(2, 3, 1)  # (C, 6, 6, 3, 3): every 3x3 window
    assert any(torch.allclose(cont.patch, windows[:, i, j], atol=1e-5) for i in range(6) for j in range(6))
    with pytest.raises(ConfigError, match="other than the target"):
        _prepared("source_specific", digits, workshop, source_classes=[0])
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


# ---------------------------------------------------------------- lsp

def test_lsp_smooths_only_the_poisoned_labels_and_keeps_the_backdoor(digits, workshop, effect):
    attack = _prepared("lsp", digits, workshop, attack="badnets", attack_params={"patch_size": 2}, smoothing=0.5)
    poisoned = _poison(attack, digits)
    hard = _poison(_prepared("badnets", digits, workshop, patch_size=2), digits)
    assert torch.equal(poisoned.poison_mask, hard.poison_mask) and torch.equal(poisoned.x, hard.x)
    mask = poisoned.poison_mask
    assert poisoned.y.shape == (len(mask), 10) and torch.allclose(poisoned.y.sum(1), torch.ones(len(mask)))
    assert torch.equal(poisoned.y[~mask].argmax(1), digits.y_train[~mask]) and (poisoned.y[~mask].max(1).values == 1).all()
    assert torch.allclose(poisoned.y[mask][:, 0], torch.full((int(mask.sum()),), 0.55))
    assert torch.allclose(poisoned.y[mask][:, 1:], torch.full((int(mask.sum()), 9), 0.05))
    model, asr, clean = _asr_and_accuracy(attack, digits, poisoned)
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.85)
    # Lower confidence on triggered inputs than a hard-label backdoor: the point of the attack.
    triggered = attack.triggered_test_set(digits, 0)
    soft_conf = torch.softmax(predict_logits(model, triggered.x), 1)[:, 0].mean()
    hard_conf = torch.softmax(predict_logits(_victim(hard, digits), triggered.x), 1)[:, 0].mean()
    effect.check("target confidence, hard-label less soft-label", hard_conf - soft_conf, ">", 0.1)
    with pytest.raises(ConfigError, match="wraps a trigger attack"):
        ATTACKS.build("lsp", {"attack": "none"})
