"""Grid specs: a YAML file (or a built-in name) -> validated `GridSpec` -> frozen `ExperimentSpec`s.

One experiment is one cell of dataset x model x attack x poison rate x defense x precision x
seed. Its id is a hash of its spec, so the same cell always has the same id; the victim key
hashes only what shapes the trained victim, so experiments that differ in defense or precision
share one trained model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bdbench.attacks import ATTACKS
from bdbench.data import DATASETS
from bdbench.defenses import DEFENSES
from bdbench.errors import ConfigError
from bdbench.federated import SERVER_DEFENSES, FederatedConfig
from bdbench.models import MODELS
from bdbench.plugins import import_modules
from bdbench.precision import PRECISIONS
from bdbench.registry import REVISION
from bdbench.training import TrainConfig

PrecisionOrder = Literal["quantize_then_defend", "defend_then_quantize"]
MODEL_SHAPE = ("num_classes", "in_channels", "image_size")  # model parameters that come from the data set


class Component(BaseModel):
    """A registered name with its parameters; YAML may give just the name, or `{name: ..., <params>}`."""

    model_config = ConfigDict(frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    # A display name (`{name: npz, path: ..., label: my-cifar}`): shown in rows and reports, never part of
    # a hash (left out of every dump), so naming a setting does not retrain or rerun anything.
    label: str | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value, "params": {}}
        if isinstance(value, dict) and "params" not in value:
            value = dict(value)
            if "name" not in value:
                raise ValueError("needs a 'name'")
            label = value.pop("label", None)
            if label is not None and (not isinstance(label, str) or not label.strip()):
                raise ValueError(f"label must be a non-empty string, not {label!r}")
            return {"name": value.pop("name"), "params": value, "label": label}
        return value


class CleanBudget(BaseModel):
    """The defender's clean data: a fraction of the training set, or a number of images per class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float | None = Field(0.05, gt=0, le=1)
    per_class: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> CleanBudget:
        if self.per_class is not None:
            if "fraction" in self.model_fields_set and self.fraction is not None:
                raise ValueError("give fraction or per_class, not both")
            object.__setattr__(self, "fraction", None)
        elif self.fraction is None:
            raise ValueError("set either fraction or per_class")
        return self


class FederatedGrid(FederatedConfig):
    """A grid's `federated:` section: the federation's settings and its axis of server defenses. With it, every
    victim is the global model of a federation (`bdbench.federated`), the grid's poison rate is the share of each
    malicious client's candidate samples it poisons, and the grid's `training` is not used."""

    server_defenses: list[Component] = Field([Component(name="fedavg")], min_length=1)


class FederatedSpec(FederatedConfig):
    """One experiment's federation: the settings and its one server defense."""

    server_defense: Component

    @property
    def server_defense_variant(self) -> str:
        return SERVER_DEFENSES.variant(self.server_defense.name, self.server_defense.params, self.server_defense.label)


def _check_federated(federated: FederatedGrid, model: Component, attacks: list[Component]) -> None:
    from bdbench.attacks import Attack

    for attack in attacks:
        cls = ATTACKS.get(attack.name)
        if getattr(cls, "learns_with_victim", False) or cls.training_hook is not Attack.training_hook:
            raise ValueError(f"attack {attack.name} controls the victim's training through a hook, which federated "
                             "clients do not run; pick a data-poisoning attack (badnets, blended, ...)")
    for entry in federated.server_defenses:
        SERVER_DEFENSES.build(entry.name, entry.params).check(federated.clients, federated.per_round)
    from bdbench.federated.attacks import build_client_attack

    build_client_attack(federated)
    import torch

    from bdbench.federated.clients import check_template
    from bdbench.models import create_model

    with torch.device("meta"):
        check_template(create_model(model.name, 10, 3, 32, **model.params), model.name)


class GridSpec(BaseModel):
    """A whole grid as written in YAML. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "grid"
    description: str = ""
    dataset: Component
    model: Component
    training: TrainConfig = TrainConfig()
    attacks: list[Component] = Field(min_length=1)
    poison_rates: list[float] = Field([0.1], min_length=1)
    target_label: int = Field(0, ge=0)
    defenses: list[Component] = Field([Component(name="none")], min_length=1)
    precisions: list[str] = Field(["fp32"], min_length=1)
    # quantize_then_defend: the defender receives the deployed model; defend_then_quantize: the
    # defense repairs the FP32 model, which is then deployed. Both are measured as deployed.
    precision_order: PrecisionOrder = "quantize_then_defend"
    seeds: list[int] = Field([0], min_length=1)
    clean_budget: CleanBudget = CleanBudget()
    federated: FederatedGrid | None = None
    # Modules to import before the names are checked, in the driver and in every worker (bdbench.plugins).
    plugins: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("plugins") is not None:
            modules = data["plugins"]
            if isinstance(modules, str):
                modules = [modules]
            if not isinstance(modules, list):
                raise ConfigError(f"grid spec plugins: {modules!r} is not a list of module names; write "
                                  "plugins: [my_pkg.my_defense]")
            import_modules(modules)
            data = {**data, "plugins": modules}
        return data

    @field_validator("poison_rates")
    @classmethod
    def _rates(cls, rates: list[float]) -> list[float]:
        for rate in rates:
            if not 0 < rate < 1:
                raise ValueError(f"poison rate {rate} is not in (0, 1)")
        return rates

    @field_validator("seeds", "poison_rates", "precisions")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(str, repeated))} given more than once; list each value once")
        return values

    @model_validator(mode="after")
    def _names_and_params(self) -> GridSpec:
        # Build each component once so unknown names and parameters fail now, not mid-grid.
        # Constructors do no work, so this is cheap.
        for attack in self.attacks:
            own_rate = attack.params.get("poison_rate")
            if own_rate is not None and not (isinstance(own_rate, (int, float)) and 0 < own_rate < 1):
                raise ValueError(f"attack {attack.name} poison_rate {own_rate} is not in (0, 1)")
            ATTACKS.build(attack.name, without_poison_rate(attack).params)
        for defense in self.defenses:
            DEFENSES.build(defense.name, defense.params)
        for precision in self.precisions:
            PRECISIONS.get(precision)
        DATASETS.check(self.dataset.name, self.dataset.params)
        MODELS.check(self.model.name, self.model.params, supplied=MODEL_SHAPE)
        if self.federated is not None:
            _check_federated(self.federated, self.model, self.attacks)
        return self


class ExperimentSpec(BaseModel):
    """One cell of a grid, frozen; `experiment_id` and `victim_key` are hashes of its fields."""

    model_config = ConfigDict(frozen=True)

    dataset: Component
    model: Component
    training: TrainConfig
    attack: Component
    poison_rate: float
    target_label: int
    defense: Component
    precision: str
    seed: int
    clean_budget: CleanBudget
    precision_order: PrecisionOrder = "quantize_then_defend"
    federated: FederatedSpec | None = None
    # The grid's plugin modules, which a worker imports before it runs the experiment; not part of any hash
    # or dump (the component names are), so naming a plugin module reruns nothing.
    plugins: tuple[str, ...] = Field((), exclude=True)

    def _fields(self, include: set[str] | None = None) -> dict[str, Any]:
        """The fields that the hashes cover. Fields added later are left out at their defaults, so
        that ids and victim keys from before they existed still hold; where a federation's clients train
        (`client_workers`, in this process or on Ray workers) is left out always: it changes no number."""
        fields = self.model_dump(mode="json", include=include)
        if fields.get("federated") is not None:
            del fields["federated"]["client_workers"]
        if fields.get("precision_order") == "quantize_then_defend":
            del fields["precision_order"]
        if "training" in fields and not fields["training"]["cpu_bfloat16"]:
            del fields["training"]["cpu_bfloat16"]
        if "federated" in fields and fields["federated"] is None:
            del fields["federated"]
        return fields

    @property
    def experiment_id(self) -> str:
        return _hash(self._fields())

    @property
    def victim_key(self) -> str:
        """The hash of what shapes the victim's weights. A clean model (attack `none`) learns no
        target, so its key leaves the target label out (and a federation's client attack, which no client runs
        then): one clean model serves every target label and client attack."""
        shaping = {"dataset", "model", "training", "attack", "poison_rate", "target_label", "seed", "federated"}
        if ATTACKS.is_reference(self.attack.name):
            shaping.discard("target_label")
        fields = self._fields(shaping)
        if self.federated is not None:  # what shapes the global model: not how often it is scored or checkpointed
            federation = self.federated
            if ATTACKS.is_reference(self.attack.name):
                federation = federation.model_copy(update={"client_attack": None})
            fields["federated"] = {**federation.settings(),
                                   "server_defense": self.federated.server_defense.model_dump(mode="json")}
        return _hash(fields)

    def settings(self, victim_only: bool = False) -> dict[str, dict[str, Any]]:
        """Every parameter each component runs with, the code's current defaults filled in (`Registry.settings`):
        the data set, model, attack and defense, and a federation's server defense and client attack.
        `victim_only`: what shapes the victim (no defense). A clean federation runs no client attack. Stored
        with a row and a victim, it tells a resumed grid that a default changed since they were made."""
        settings = {"dataset": DATASETS.settings(self.dataset.name, self.dataset.params),
                    "model": MODELS.settings(self.model.name, self.model.params),
                    "attack": ATTACKS.settings(self.attack.name, self.attack.params)}
        if not victim_only:
            settings["defense"] = DEFENSES.settings(self.defense.name, self.defense.params)
        if self.federated is not None:
            settings["server_defense"] = SERVER_DEFENSES.settings(self.federated.server_defense.name,
                                                                  self.federated.server_defense.params)
            client_attack = self.federated.client_attack_spec
            if client_attack is not None and not ATTACKS.is_reference(self.attack.name):
                from bdbench.federated.attacks import CLIENT_ATTACKS

                settings["client_attack"] = CLIENT_ATTACKS.settings(*client_attack)
        return settings

    @property
    def attack_variant(self) -> str:
        return ATTACKS.variant(self.attack.name, self.attack.params, self.attack.label)

    @property
    def defense_variant(self) -> str:
        return DEFENSES.variant(self.defense.name, self.defense.params, self.defense.label)

    def describe(self) -> str:
        attack = (self.attack_variant if ATTACKS.is_reference(self.attack.name)
                  else f"{self.attack_variant}@{self.poison_rate:g} target {self.target_label}")
        order = " (defend, then quantize)" if self.precision_order == "defend_then_quantize" else ""
        federated = ""
        if self.federated is not None:
            from bdbench.federated.attacks import client_attack_variant

            behaviour = None if ATTACKS.is_reference(self.attack.name) else client_attack_variant(self.federated)
            federated = f"federated {self.federated.server_defense_variant}{f' vs {behaviour}' if behaviour else ''}: "
        return f"{federated}{attack} / {self.defense_variant} / {self.precision}{order} / seed {self.seed}"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def settings_changes(before: Mapping[str, dict[str, Any]], now: Mapping[str, dict[str, Any]]) -> list[str]:
    """`part.key old -> new` for each parameter both settings hold with different values, and `part revision
    old -> new` where the code's revision differs (1 where none is held). A parameter only one holds does not
    count: a parameter added since keeps the old behaviour at its default (the rule new parameters follow, as
    new spec fields do for the experiment id)."""
    changes = []
    for part in sorted(set(before) & set(now)):
        old, new = before[part].get(REVISION, 1), now[part].get(REVISION, 1)
        if old != new:
            changes.append(f"{part} revision {old!r} -> {new!r}")
        changes += [f"{part}.{key} {before[part][key]!r} -> {now[part][key]!r}"
                    for key in sorted(set(before[part]) & set(now[part]) - {REVISION})
                    if before[part][key] != now[part][key]]
    return changes


def without_poison_rate(attack: Component) -> Component:
    """The attack without its own `poison_rate` (a grid key, not an attack parameter)."""
    if "poison_rate" not in attack.params:
        return attack
    return Component(name=attack.name, params={k: v for k, v in attack.params.items() if k != "poison_rate"},
                     label=attack.label)


def expand(grid: GridSpec) -> list[ExperimentSpec]:
    """Every experiment of a grid, grouped so that experiments sharing a victim are adjacent.

    Attack `none` trains one clean model per seed (its poison rate is recorded as 0). An attack
    entry with its own `poison_rate` (a clean-label attack at its paper's rate) runs at that rate
    instead of the grid's `poison_rates`.
    """
    specs: list[ExperimentSpec] = []
    seen: set[str] = set()
    runs = [(attack, rate) for attack in grid.attacks
            for rate in ([attack.params["poison_rate"]] if "poison_rate" in attack.params else grid.poison_rates)]
    federations: list[FederatedSpec | None] = [None]
    if grid.federated is not None:
        settings = grid.federated.model_dump(exclude={"server_defenses"})
        federations = [FederatedSpec(**settings, server_defense=entry) for entry in grid.federated.server_defenses]
    for seed, (attack, rate), federated in itertools.product(grid.seeds, runs, federations):
        attack = without_poison_rate(attack)
        rate = 0.0 if ATTACKS.is_reference(attack.name) else rate
        for defense, precision in itertools.product(grid.defenses, grid.precisions):
            spec = ExperimentSpec(dataset=grid.dataset, model=grid.model, training=grid.training,
                                  attack=attack, poison_rate=rate, target_label=grid.target_label,
                                  defense=defense, precision=precision, seed=seed,
                                  clean_budget=grid.clean_budget, plugins=tuple(grid.plugins),
                                  # At fp32 both orders are the same experiment.
                                  precision_order="quantize_then_defend" if precision == "fp32"
                                  else grid.precision_order, federated=federated)
            if spec.experiment_id not in seen:
                seen.add(spec.experiment_id)
                specs.append(spec)
    return specs


# ---------------------------------------------------------------- loading YAML and overrides

def builtin_configs() -> dict[str, str]:
    """Built-in grid names -> their one-line descriptions."""
    found = {}
    for entry in resources.files("bdbench.configs").iterdir():
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            found[entry.name[:-5]] = str(data.get("description", "")).strip()
    return dict(sorted(found.items()))


def read_config(config: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML file path, or of a built-in grid name."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file; give a YAML path or one of: {', '.join(builtin_configs())}")
        text = path.read_text()
        source = str(path)
    elif str(config) in builtin_configs():
        text = resources.files("bdbench.configs").joinpath(f"{config}.yaml").read_text()
        source = f"built-in {config}"
    else:
        raise ConfigError(f"no config file or built-in grid named {str(config)!r}; built-ins: {', '.join(builtin_configs())}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a grid spec must be a YAML mapping of keys such as dataset, model, attacks")
    return data


def _pairs(overrides: Iterable[str] | Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of each override: a mapping's items as they are, or `KEY=VALUE` strings
    whose VALUE is YAML."""
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"override key {key!r} is not a dotted name such as 'training.epochs'")
            yield key, value
        return
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE (for example --set seeds=[0,1])")
        try:
            yield key, yaml.safe_load(raw)
        except yaml.YAMLError:
            yield key, raw


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply overrides: `KEY=VALUE` strings (VALUE is YAML) or a mapping {KEY: value}; KEY is dotted
    (`dataset.path`, `attacks.1.alpha`)."""
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for key, value in _pairs(overrides):
        value = json.loads(json.dumps(value))  # plain data, and a copy
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has no item {part}")
                index = int(part)
                if isinstance(node[index], str) and not last:
                    node[index] = {"name": node[index]}
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if isinstance(node.get(part), str):
                        node[part] = {"name": node[part]}
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")
    return data


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "grid"
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        nested: dict[str, type[BaseModel]] = {"training": TrainConfig, "clean_budget": CleanBudget,
                                              "federated": FederatedGrid}
        model = GridSpec if not parent else nested.get(str(parent[0]))
        valid = f"; valid keys: {', '.join(model.model_fields)}" if model else ""
        return f"unknown key {where!r} in grid spec{valid}"
    message = err["msg"].removeprefix("Value error, ")
    return f"grid spec {where}: {message}"


def load_grid(config: str | Path | dict[str, Any], overrides: Iterable[str] | Mapping[str, Any] = ()) -> GridSpec:
    """Read, override and validate a grid spec; every problem is a one-line `ConfigError`."""
    data = config if isinstance(config, dict) else read_config(config)
    data = apply_overrides(data, overrides)
    try:
        return GridSpec.model_validate(data)
    except ConfigError:
        raise
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
