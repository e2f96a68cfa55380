"""What every attack shares (the base class and the workshop), shown on BadNets: which samples are
poisoned and how they are labelled, the triggered test set, and learned artefacts cached once (under a key
that does not depend on the order a data set's parameters were written in)."""

import pytest
import torch

from bdbench.attacks import ATTACKS, AttackWorkshop, PoisonedTrainingSet
from bdbench.attacks.workshop import dataset_key
from bdbench.errors import ConfigError
from bdbench.grid import Component
from bdbench.store import ArtifactCache
from bdbench.training import TrainConfig, predict

from attack_fixtures import prepared


def test_poison_mask_counts_and_labels_all_to_one(digits):
    attack = prepared("badnets", digits, patch_size=2)
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
    assert poisoned.cover_mask is None and poisoned.payload_mask is poisoned.poison_mask  # no cover samples


def test_a_cover_mask_must_mark_poisoned_samples(digits):
    """Cover samples are poisoned samples that keep their label: a cover mask outside the poison mask, or of another
    shape, is refused where the poisoned set is made."""
    n = len(digits.y_train)
    poison_mask, cover = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    poison_mask[:10], cover[5:15] = True, True
    with pytest.raises(ValueError, match="cover_mask must mark a subset of poison_mask"):
        PoisonedTrainingSet(digits.x_train, digits.y_train, poison_mask, cover_mask=cover)
    with pytest.raises(ValueError, match="cover_mask must mark a subset of poison_mask"):
        PoisonedTrainingSet(digits.x_train, digits.y_train, poison_mask, cover_mask=cover[:-1])
    cover[10:] = False
    kept = PoisonedTrainingSet(digits.x_train, digits.y_train, poison_mask, cover_mask=cover)
    assert kept.payload_mask.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_all_to_all_labels(digits):
    attack = prepared("badnets", digits, patch_size=2, label_mode="all2all")
    poisoned = attack.poison(digits, 0.2, 0, torch.Generator().manual_seed(0))
    mask = poisoned.poison_mask
    assert torch.equal(poisoned.y[mask], (digits.y_train[mask] + 1) % 10)
    triggered = attack.triggered_test_set(digits, 0)
    assert len(triggered.y_true) == len(digits.y_test)  # every image changes label under all-to-all
    assert torch.equal(triggered.y_target, (triggered.y_true + 1) % 10)


def test_triggered_test_set_leaves_out_the_target_class(digits):
    attack = prepared("blended", digits)
    triggered = attack.triggered_test_set(digits, 0)
    assert (triggered.y_true != 0).all() and (triggered.y_target == 0).all()
    assert len(triggered.y_true) == int((digits.y_test != 0).sum())


def test_workshop_learns_once_and_reuses_from_the_cache(tmp_path, digits, effect):

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


def test_one_data_set_written_in_two_orders_shares_its_artefacts_and_finds_those_of_earlier_keys(tmp_path):
    as_grid = Component(name="npz", params={"path": "data.npz", "allow_hflip": True})
    reordered = Component(name="npz", params={"allow_hflip": True, "path": "data.npz"})
    assert dataset_key(as_grid) == dataset_key(reordered) and as_grid.model_dump_json() != reordered.model_dump_json()
    plain = Component(name="npz", params={"path": "data.npz"})  # already in sorted order: the key earlier code made
    assert dataset_key(plain) == plain.model_dump_json()

    cache = ArtifactCache(tmp_path)
    # What earlier code cached, under the spec as the grid wrote it.
    AttackWorkshop(seed=3, cache=cache, dataset_key=as_grid.model_dump_json()).learned(
        "trigger", {"eps": 0.1}, lambda: {"t": torch.arange(4.0)})
    # The grid's own order finds it (and stores it under the sorted key); then any order does.
    for component in (as_grid, reordered):
        found = AttackWorkshop.for_dataset(3, component, cache=cache).learned(
            "trigger", {"eps": 0.1}, lambda: pytest.fail("learned again though cached under the grid's order"))
        assert torch.equal(found["t"], torch.arange(4.0))
    assert len(list((tmp_path / "attacks").glob("*.safetensors"))) == 2
    # Something new is cached under the sorted key only, and found whichever order asks for it.
    AttackWorkshop.for_dataset(3, as_grid, cache=cache).learned("trigger", {"eps": 0.2}, lambda: {"t": torch.ones(2)})
    again = AttackWorkshop.for_dataset(3, reordered, cache=cache).learned(
        "trigger", {"eps": 0.2}, lambda: pytest.fail("the sorted key was not shared"))
    assert torch.equal(again["t"], torch.ones(2)) and len(list((tmp_path / "attacks").glob("*.safetensors"))) == 3
    # Another seed is another artefact.
    other = AttackWorkshop.for_dataset(4, as_grid, cache=cache).learned("trigger", {"eps": 0.2}, lambda: {"t": torch.zeros(2)})
    assert torch.equal(other["t"], torch.zeros(2))


def test_clean_label_attacks_refuse_all_to_all():
    for name in ("sig", "lc"):
        with pytest.raises(ConfigError, match="all2one only.*clean-label"):
            ATTACKS.build(name, {"label_mode": "all2all"})
    with pytest.raises(ConfigError, match="all2one only"):
        ATTACKS.build("advdoor", {"label_mode": "all2all"})
