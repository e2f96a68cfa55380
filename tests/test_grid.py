import json
from pathlib import Path

import pytest

from bdbench.attacks import ATTACKS
from bdbench.defenses import DEFENSES
from bdbench.errors import ConfigError
from bdbench.grid import apply_overrides, expand, load_grid, read_config, settings_changes
from bdbench.models import MODELS
from bdbench.registry import REVISION


def test_builtin_demo_validates_and_expands():
    grid = load_grid("demo")
    specs = expand(grid)
    assert len(specs) == 6  # (none, badnets, blended) x (none, ft) at one rate, one seed
    assert {s.attack.name for s in specs} == {"none", "badnets", "blended"}
    assert all(s.poison_rate == 0.0 for s in specs if s.attack.name == "none")
    assert len({s.experiment_id for s in specs}) == 6
    # Defense and precision do not change the victim; attack does.
    assert len({s.victim_key for s in specs}) == 3


def test_ids_are_stable_and_depend_on_every_field(tiny_grid):
    a = expand(load_grid(tiny_grid))
    b = expand(load_grid(tiny_grid))
    assert [s.experiment_id for s in a] == [s.experiment_id for s in b]
    tiny_grid["training"]["lr"] = 0.01
    c = expand(load_grid(tiny_grid))
    assert not {s.experiment_id for s in a} & {s.experiment_id for s in c}


def test_cpu_bfloat16_is_a_new_experiment_and_leaves_default_ids_alone(tiny_grid):
    default = expand(load_grid(tiny_grid))
    # Pinned: the ids these cells had before `cpu_bfloat16` existed, so that stored results and
    # cached backdoored victims are still found (clean victims' keys dropped the target label later).
    assert (default[0].experiment_id, default[2].victim_key) == ("6f97f4b5d3bf276d", "ec041596dd8a49b9")
    tiny_grid["training"]["cpu_bfloat16"] = True
    fast = expand(load_grid(tiny_grid))
    assert not {s.experiment_id for s in default} & {s.experiment_id for s in fast}
    assert not {s.victim_key for s in default} & {s.victim_key for s in fast}


def test_clean_attack_is_trained_once_per_seed_across_rates(tiny_grid):
    tiny_grid["poison_rates"] = [0.05, 0.1]
    tiny_grid["seeds"] = [0, 1]
    specs = expand(load_grid(tiny_grid))
    # per seed: none x 2 defenses + badnets x 2 rates x 2 defenses
    assert len(specs) == 2 * (2 + 4)


@pytest.mark.parametrize("change, message", [
    ({"attack": ["badnets"]}, "unknown key 'attack' in grid spec; valid keys: name, description, dataset"),
    ({"attacks": ["badnetz"]}, "unknown attack 'badnetz'; choose one of: adaptive_blend, adaptive_patch, advdoor, badnets,"),
    ({"defenses": ["nc9"]}, "unknown defense 'nc9'; choose one of: abl, ac, aif, anp, awm, beatrix,"),
    ({"attacks": [{"name": "badnets", "size": 3}]}, "attack 'badnets' has no parameter 'size'; valid parameters:"),
    ({"poison_rates": [1.5]}, "grid spec poison_rates: poison rate 1.5 is not in"),
    ({"training": {"epochs": 0}}, "grid spec training.epochs: Input should be greater than or equal to 1"),
    ({"training": {"epoch": 3}}, "unknown key 'training.epoch' in grid spec; valid keys: epochs"),
    ({"precisions": ["int3"]}, "unknown precision 'int3'; choose one of: fp32"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
])
def test_config_errors_are_one_line_and_name_the_problem(tiny_grid, change, message):
    tiny_grid.update(change)
    with pytest.raises(ConfigError) as info:
        load_grid(tiny_grid)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no config file or built-in grid named 'demoo'; built-ins: .*demo"):
        read_config("demoo")
    with pytest.raises(ConfigError, match="no such config file"):
        read_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [mnist5k\nmodel: cnn-small\n")
    with pytest.raises(ConfigError, match="bad.yaml: line .* is not valid YAML"):
        read_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        read_config(bad)


def test_overrides_set_nested_keys_and_list_items(tiny_grid):
    data = apply_overrides(tiny_grid, ["seeds=[0,1,2]", "training.epochs=2", "attacks.1.patch_size=3",
                                       "dataset.name=mnist5k", "defenses.1=none"])
    assert data["seeds"] == [0, 1, 2]
    assert data["training"]["epochs"] == 2
    assert data["attacks"][1] == {"name": "badnets", "patch_size": 3}
    assert data["dataset"] == {"name": "mnist5k"}
    assert data["defenses"][1] == "none"
    assert tiny_grid["seeds"] == [0]  # the input is not modified
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        apply_overrides(tiny_grid, ["seeds"])
    with pytest.raises(ConfigError, match="attacks has no item 7"):
        apply_overrides(tiny_grid, ["attacks.7.alpha=0.1"])


def test_an_attack_may_carry_its_own_poison_rate(tiny_grid):
    tiny_grid["attacks"].append({"name": "sig", "poison_rate": 0.03})
    tiny_grid["poison_rates"] = [0.1, 0.2]
    specs = expand(load_grid(tiny_grid))
    rates = {(s.attack.name, s.poison_rate) for s in specs}
    assert rates == {("none", 0.0), ("badnets", 0.1), ("badnets", 0.2), ("sig", 0.03)}
    sig = next(s for s in specs if s.attack.name == "sig")
    assert "poison_rate" not in sig.attack.params  # a grid key, not an attack parameter
    tiny_grid["attacks"][-1]["poison_rate"] = 1.5
    with pytest.raises(ConfigError, match="poison_rate 1.5 is not in"):
        load_grid(tiny_grid)


def test_builtin_attacks_grid_covers_every_part_a_attack():
    specs = expand(load_grid("attacks"))
    names = {s.attack.name for s in specs}
    assert {"none", "badnets", "blended", "sig", "lc", "trojannn", "advdoor", "source_specific", "lsp"} <= names
    assert all(s.defense.name == "none" and s.dataset.name == "mnist5k" for s in specs)
    assert {s.poison_rate for s in specs if s.attack.name in ("badnets", "blended", "trojannn", "advdoor")} == {0.1}


def test_variants_name_the_non_default_parameters_and_a_label_changes_no_id(tiny_grid):
    tiny_grid["attacks"] = ["none", {"name": "badnets", "patch_size": 3}, {"name": "badnets", "patch_size": 4},
                            {"name": "blended", "alpha": 0.1, "poison_rate": 0.05}]
    tiny_grid["defenses"] = ["strip", {"name": "strip", "overlays": 10}]
    specs = expand(load_grid(tiny_grid))
    pairs = [(s.attack_variant, s.defense_variant) for s in specs]
    assert pairs == [(a, d) for a in ["none", "badnets", "badnets(patch_size=4)", "blended(alpha=0.1)"]
                     for d in ["strip", "strip(overlays=10)"]]  # patch_size 3 is badnets' default
    assert specs[2].describe() == "badnets@0.1 target 0 / strip / fp32 / seed 0"
    assert specs[5].describe() == "badnets(patch_size=4)@0.1 target 0 / strip(overlays=10) / fp32 / seed 0"
    tiny_grid["attacks"][2]["label"] = "big-patch"
    tiny_grid["defenses"][1]["label"] = "strip-10"
    labelled = expand(load_grid(tiny_grid))
    assert [s.experiment_id for s in labelled] == [s.experiment_id for s in specs]
    assert [s.victim_key for s in labelled] == [s.victim_key for s in specs]
    assert (labelled[5].attack_variant, labelled[5].defense_variant) == ("big-patch", "strip-10")
    tiny_grid["defenses"][1]["label"] = ""
    with pytest.raises(ConfigError, match="label must be a non-empty string"):
        load_grid(tiny_grid)


def test_settings_fill_in_the_code_defaults_as_plain_json(tiny_grid):
    tiny_grid["attacks"] = [{"name": "badnets", "patch_size": 2.0, "location": [1, 1]}]
    tiny_grid["defenses"] = [{"name": "strip", "overlays": 10}]
    spec = expand(load_grid(tiny_grid))[0]
    settings = spec.settings()
    assert set(settings) == {"dataset", "model", "attack", "defense"}
    assert settings["attack"] == {**ATTACKS.defaults("badnets"), "patch_size": 2, "location": [1, 1]}
    assert settings["defense"]["overlays"] == 10 and set(settings["defense"]) == set(DEFENSES.defaults("strip"))
    assert settings["model"] == {**MODELS.defaults("cnn-small"), "width": 8}
    assert json.loads(json.dumps(settings)) == settings  # stored as it compares
    assert set(spec.settings(victim_only=True)) == {"dataset", "model", "attack"}
    assert ATTACKS.settings("not-registered", {"k": (1.0, 2)}) == {"k": [1, 2]}  # a plugin's rows read without it
    # Compared key by key where both hold one: a parameter added since keeps the old behaviour at its default.
    assert settings_changes({"attack": {"margin": 0, "old": 1}}, {"attack": {"margin": 1, "new": 2}, "defense": {}}) \
        == ["attack.margin 0 -> 1"]


def test_a_raised_revision_is_part_of_the_settings_and_settings_without_one_read_as_revision_1(monkeypatch):
    assert DEFENSES.revision("ft") == 1 and REVISION not in DEFENSES.settings("ft")
    ft = DEFENSES.get("ft")
    monkeypatch.setattr(ft, "revision", 2, raising=False)
    now = {"defense": DEFENSES.settings("ft")}
    assert now["defense"][REVISION] == 2
    before = {"defense": {k: v for k, v in now["defense"].items() if k != REVISION}}  # stored before the change
    assert settings_changes(before, now) == ["defense revision 1 -> 2"]
    assert settings_changes(now, now) == []
    monkeypatch.setattr(ft, "revision", 0)
    with pytest.raises(ConfigError, match="defense 'ft' has revision 0; a revision is an integer >= 1"):
        DEFENSES.settings("ft")


def test_a_clean_victim_is_keyed_without_the_target_label(tiny_grid):
    first = expand(load_grid(tiny_grid))
    tiny_grid["target_label"] = 3
    other = expand(load_grid(tiny_grid))
    keys = {(s.attack.name, s.victim_key) for s in first}, {(s.attack.name, s.victim_key) for s in other}
    clean = [{k for name, k in group if name == "none"} for group in keys]
    poisoned = [{k for name, k in group if name != "none"} for group in keys]
    assert clean[0] == clean[1]  # the target label does not shape a clean model's weights
    assert not poisoned[0] & poisoned[1]  # it does shape a backdoored one's
    # The experiment itself still differs: its ASR is measured against the target label.
    assert not {s.experiment_id for s in first} & {s.experiment_id for s in other}


def test_overrides_as_a_mapping_equal_the_same_overrides_as_strings(tiny_grid):
    as_strings = load_grid(tiny_grid, ["training.epochs=2", "attacks.1.patch_size=3", "seeds=[0, 1]"])
    as_mapping = load_grid(tiny_grid, {"training.epochs": 2, "attacks.1.patch_size": 3, "seeds": [0, 1]})
    assert as_mapping == as_strings and as_mapping.training.epochs == 2 and as_mapping.seeds == [0, 1]
    # A mapping's values are taken as they are, not parsed as YAML; the typed grid checks them.
    with pytest.raises(ConfigError, match="training.epochs"):
        load_grid(tiny_grid, {"training.epochs": "two"})
    with pytest.raises(ConfigError, match="not a dotted name"):
        load_grid(tiny_grid, {"": 1})


NATURAL_GRIDS = [("attacks-cifar10", "fidelity-cifar10", "cifar10.npz"), ("attacks-gtsrb", "fidelity-gtsrb", "gtsrb32.npz")]


@pytest.mark.parametrize("name, fidelity, data", NATURAL_GRIDS)
def test_natural_attack_grids_hold_every_attack_on_a_cheaper_victim_than_fidelitys(name, fidelity, data):
    from bdbench.attacks import ATTACKS

    grid = load_grid(name)
    specs = expand(grid)
    assert {s.attack.name for s in specs} == set(ATTACKS.names())  # every attack and the clean model
    assert all(s.defense.name == "none" and s.dataset.params["path"] == f"../shared/data/{data}" for s in specs)
    clean_label = {s.attack.name: s.poison_rate for s in specs if s.attack.name in ("sig", "lc", "narcissus", "dfb")}
    assert max(clean_label.values()) <= 0.05 and clean_label["narcissus"] == 0.0005
    # Both train cnn-small (4x4 pooled features, float32), which fits two CPU cores, instead of the fidelity grid's
    # PreAct-ResNet18, so they share no victim with it.
    fidelity_grid = load_grid(fidelity)
    assert grid.model.name == "cnn-small" and grid.model.params["pool"] == 4 and not grid.training.cpu_bfloat16
    assert fidelity_grid.model.name == "preact-resnet18"
    assert not {s.victim_key for s in expand(fidelity_grid)} & {s.victim_key for s in specs}


@pytest.mark.parametrize("name, fidelity, data", NATURAL_GRIDS)
def test_natural_attack_grids_pass_preflight_on_their_data(name, fidelity, data, monkeypatch):
    from conftest import SHARED_DATA

    from bdbench.data import load_dataset
    from bdbench.preflight import check_grid

    if not (SHARED_DATA / "cifar10.npz").is_file() or not (SHARED_DATA / "gtsrb32.npz").is_file():
        pytest.skip("../shared/data/cifar10.npz or gtsrb32.npz is absent")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the grids' data paths are relative to the repository
    grid = load_grid(name)
    check_grid(grid, load_dataset(grid.dataset.name, **grid.dataset.params))  # raises ConfigError if not


def test_the_sensitivity_grid_sweeps_four_defenses_around_their_defaults_on_model_defenses_victims():
    from bdbench.data import load_dataset
    from bdbench.defenses import DEFENSES
    from bdbench.preflight import check_grid

    grid = load_grid("sensitivity")
    specs = expand(grid)
    settings: dict[str, list[dict]] = {}
    for entry in grid.defenses:
        settings.setdefault(entry.name, []).append(DEFENSES.non_default(entry.name, entry.params))
    assert sorted(settings) == ["anp", "fp", "nad", "nc", "none"]
    for name in ("anp", "fp", "nad", "nc"):  # three settings, the default among them, one parameter varied
        assert len(settings[name]) == 3 and {} in settings[name]
        assert len({key for changed in settings[name] for key in changed}) == 1
    assert {s.victim_key for s in specs} == {s.victim_key for s in expand(load_grid("model-defenses"))}
    check_grid(grid, load_dataset(grid.dataset.name))  # raises ConfigError if not


@pytest.mark.parametrize("name", ["tradeoff-digits", "tradeoff-gtsrb"])
def test_the_tradeoff_grids_sweep_badnets_and_blended_from_under_to_over_poisoning(name, monkeypatch):
    from conftest import SHARED_DATA

    from bdbench.data import load_dataset
    from bdbench.preflight import check_grid

    grid = load_grid(name)
    specs = expand(grid)
    rates = {a: sorted({s.poison_rate for s in specs if s.attack.name == a}) for a in ("badnets", "blended")}
    assert all(len(r) >= 4 and r[0] <= 0.005 and r[-1] >= 0.1 for r in rates.values())
    assert "none" in {s.attack.name for s in specs}  # the clean model: the detectors' false alarms
    if name == "tradeoff-gtsrb":
        shared = {s.victim_key for s in expand(load_grid("attacks-gtsrb"))} & {s.victim_key for s in specs}
        assert len(shared) == 3  # attacks-gtsrb's clean, BadNets and Blended victims at 10%
        if not (SHARED_DATA / "gtsrb32.npz").is_file():
            pytest.skip("../shared/data/gtsrb32.npz is absent")
        monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the grid's data path is relative to the repository
    check_grid(grid, load_dataset(grid.dataset.name, **grid.dataset.params))  # raises ConfigError if not
