import pytest
import torch

from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.errors import ConfigError
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, predict, train

from effects import test_seed


def _prepared(name, dataset, **params):
    attack = ATTACKS.build(name, params)
    attack.prepare(dataset, target_label=0, workshop=AttackWorkshop(seed=0))
    return attack


def test_badnets_stamps_a_white_square_bottom_right(digits):
    attack = _prepared("badnets", digits, patch_size=3)
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    out = attack.trigger(x)
    assert (out[:, :, 5:, 5:] == 255).all()
    assert out[:, :, :5].sum() == 0 and out[:, :, :, :5].sum() == 0


def test_badnets_location_pattern_and_colour(digits):
    attack = _prepared("badnets", digits, patch_size=2, location=[1, 2], pattern="checkerboard", color=100)
    out = attack.trigger(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))[0, 0]
    assert out[1:3, 2:4].tolist() == [[100, 0], [0, 100]]
    assert out.sum() == 200
    with pytest.raises(ConfigError, match="outside the 8x8 image"):
        _prepared("badnets", digits, patch_size=2, location=[7, 7])
    with pytest.raises(ConfigError, match="parameter 'location' is 'middle': input should be 'bottom-right', "):
        ATTACKS.build("badnets", {"location": "middle"})


def test_poison_mask_counts_and_labels_all_to_one(digits):
    attack = _prepared("badnets", digits, patch_size=2)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    n = len(digits.y_train)
    assert int(poisoned.poison_mask.sum()) == round(0.1 * n)
    assert (poisoned.y[poisoned.poison_mask] == 0).all()
    assert (digits.y_train[poisoned.poison_mask] != 0).all()  # chosen from non-target samples
    assert torch.equal(poisoned.y[~poisoned.poison_mask], digits.y_train[~poisoned.poison_mask])
    assert torch.equal(poisoned.x[~poisoned.poison_mask], digits.x_train[~poisoned.poison_mask])
    assert (poisoned.x[poisoned.poison_mask][:, :, 6:, 6:] == 255).all()
    again = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    assert torch.equal(again.poison_mask, poisoned.poison_mask)


def test_all_to_all_labels(digits):
    attack = _prepared("badnets", digits, patch_size=2, label_mode="all2all")
    poisoned = attack.poison(digits, 0.2, 0, torch.Generator().manual_seed(0))
    mask = poisoned.poison_mask
    assert torch.equal(poisoned.y[mask], (digits.y_train[mask] + 1) % 10)
    triggered = attack.triggered_test_set(digits, 0)
    assert len(triggered.y_true) == len(digits.y_test)  # every image changes label under all-to-all
    assert torch.equal(triggered.y_target, (triggered.y_true + 1) % 10)


def test_triggered_test_set_leaves_out_the_target_class(digits):
    attack = _prepared("blended", digits)
    triggered = attack.triggered_test_set(digits, 0)
    assert (triggered.y_true != 0).all() and (triggered.y_target == 0).all()
    assert len(triggered.y_true) == int((digits.y_test != 0).sum())


def test_blended_mixes_a_fixed_pattern_at_alpha(digits):
    a = _prepared("blended", digits, alpha=0.2)
    b = _prepared("blended", digits, alpha=0.2)
    assert torch.equal(a.pattern, b.pattern)  # fixed seed: the same pattern every time
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(a.add_trigger(x), 0.8 * x + 0.2 * a.pattern)
    with pytest.raises(ConfigError, match="parameter 'alpha' is 1.5: input should be less than or equal to 1"):
        ATTACKS.build("blended", {"alpha": 1.5})


@pytest.mark.parametrize("name, params", [("badnets", {"patch_size": 2}), ("blended", {"alpha": 0.2})])
def test_short_training_on_poisoned_digits_reaches_high_asr(digits, effect, name, params):
    attack = _prepared(name, digits, **params)
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(test_seed()))
    torch.manual_seed(test_seed())
    model = with_normalization(create_model("cnn-small", 10, 1, 8, width=16), digits.mean, digits.std)
    train(model, poisoned.x, poisoned.y, TrainConfig(epochs=15, batch_size=64), seed=test_seed())
    triggered = attack.triggered_test_set(digits, 0)
    asr = (predict(model, triggered.x) == triggered.y_target).float().mean()
    clean = (predict(model, digits.x_test) == digits.y_test).float().mean()
    effect.check("clean accuracy", clean, ">", 0.85)
    effect.check("ASR", asr, ">", 0.9)


def test_no_attack_poisons_nothing(digits):
    attack = _prepared("none", digits)
    poisoned = attack.poison(digits, 0.0, 0, torch.Generator())
    assert not poisoned.poison_mask.any() and torch.equal(poisoned.y, digits.y_train)


def test_workshop_learns_once_and_reuses_from_the_cache(tmp_path, digits, effect):
    from bdbench.store import ArtifactCache
    from bdbench.training import TrainConfig

    workshop = AttackWorkshop(seed=0, cache=ArtifactCache(tmp_path), dataset_key="digits")
    calls = []

    def build():
        calls.append(1)
        return {"uap": torch.full((1, 8, 8), 0.5)}

    first = workshop.learned("uap", {"eps": 0.1}, build)
    again = workshop.learned("uap", {"eps": 0.1}, build)
    other = workshop.learned("uap", {"eps": 0.2}, build)
    assert len(calls) == 2 and torch.equal(first["uap"], again["uap"]) and torch.equal(other["uap"], first["uap"])

    surrogate = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    effect.check("surrogate's clean accuracy", (predict(surrogate, digits.x_test) == digits.y_test).float().mean(), ">", 0.8)
    files = list((tmp_path / "attacks").glob("*.safetensors"))
    assert len(files) == 3  # two perturbations and one surrogate
    again = workshop.surrogate(digits, model="cnn-small", training=TrainConfig(epochs=4, batch_size=64), width=8)
    assert all(torch.equal(a, b) for a, b in zip(surrogate.state_dict().values(), again.state_dict().values()))


def test_an_artefact_cached_in_an_older_format_is_learned_again(tmp_path):
    from bdbench.store import ArtifactCache

    workshop = AttackWorkshop(seed=0, cache=ArtifactCache(tmp_path), dataset_key="digits")
    old = workshop.learned("gen", {"eps": 0.1}, lambda: {"weights": torch.zeros(3)})
    # The attack's code now stores a different set of tensors and says so with its format version:
    # the cached file of format 1 is not read as format 2 (no KeyError), it is learned again.
    new = workshop.learned("gen", {"eps": 0.1}, lambda: {"mask": torch.ones(2), "pattern": torch.ones(2)}, version=2)
    assert set(old) == {"weights"} and set(new) == {"mask", "pattern"}
    again = workshop.learned("gen", {"eps": 0.1}, lambda: pytest.fail("format 2 is cached now"), version=2)
    assert torch.equal(again["mask"], torch.ones(2))
    # Format 1 keeps its old key, so artefacts cached before versions existed are still found.
    assert set(workshop.learned("gen", {"eps": 0.1}, lambda: pytest.fail("format 1 is cached"))) == {"weights"}
