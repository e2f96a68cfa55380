"""`bdbench triggers`: a picture of clean test images beside their triggered versions, one row per
attack, with the PSNR and SSIM of each attack's triggered test set against its clean images (the
same numbers as the `psnr`/`ssim` result columns).

An attack that learns its trigger while the victim trains (`Attack.learns_with_victim`: InputAware's
generator) has no trigger of its own before that: its row takes the generator stored with the grid's cached
victim (the grid's first seed), and is left out, with the reason, where no such victim is cached, rather than
drawn with an untrained generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from bdbench import metrics
from bdbench.attacks import ATTACKS, Attack, AttackWorkshop
from bdbench.data import DATASETS, Dataset, load_dataset
from bdbench.errors import ConfigError
from bdbench.grid import Component, GridSpec, expand, load_grid, without_poison_rate
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache
from bdbench.training import default_device


@dataclass
class TriggerRow:
    label: str
    clean: torch.Tensor  # uint8 (n, C, H, W)
    triggered: torch.Tensor  # uint8 (n, C, H, W)
    psnr: float | None
    ssim: float | None


@dataclass
class TriggerPicture:
    """The rows drawn, and the attacks left out with the reason (an attack whose trigger needs its victim)."""

    rows: list[TriggerRow]
    left_out: list[str] = field(default_factory=list)


# What an attack learned with its victim (Attack.victim_state), looked up by the attack's grid entry; None: not cached.
VictimStates = Callable[[Component], "dict[str, torch.Tensor] | None"]


def cached_victim_states(grid: GridSpec, cache: ArtifactCache) -> VictimStates:
    """The trigger state stored beside each attack's cached victim of `grid` (its first seed, first poison rate
    that has one), as the runner stores it."""
    specs = [s for s in expand(grid) if s.seed == grid.seeds[0]]

    def lookup(component: Component) -> dict[str, torch.Tensor] | None:
        for spec in specs:
            if spec.attack == component:
                state = cache.load_tensors("victims", f"{spec.victim_key}.attack")
                if state is not None:
                    return state
        return None

    return lookup


def _label(attack: Component) -> str:
    params = ", ".join(f"{k}={v}" for k, v in attack.params.items())
    return f"{attack.name} ({params})" if params else attack.name


def trigger_rows(dataset: Dataset, attacks: Iterable[Component], target_label: int, workshop: AttackWorkshop,
                 images: int = 4, victim_states: VictimStates | None = None) -> TriggerPicture:
    """For each attack, `images` images spread evenly over its triggered test set (clean and
    triggered; test sets are often sorted by class) and its PSNR/SSIM over the whole set."""
    picture = TriggerPicture([])
    for component in attacks:
        component = without_poison_rate(component)
        if ATTACKS.is_reference(component.name):
            continue
        attack: Attack = ATTACKS.build(component.name, component.params)
        attack.prepare(dataset, target_label, workshop)
        if attack.learns_with_victim:
            state = None if victim_states is None else victim_states(component)
            if state is None:
                where = "the grid has no cached victim for it in --out" if victim_states is not None else \
                    "give the grid that trained its victim (CONFIG) and its --out"
                picture.left_out.append(f"{_label(component)}: not drawn: its trigger is learned with the victim, "
                                        f"and {where}")
                continue
            attack.load_victim_state(state)
        triggered = attack.triggered_test_set(dataset, target_label)
        clean = triggered.x_clean
        if clean is None:
            raise ConfigError(f"attack {component.name} does not report the clean test images behind its triggers")
        picks = torch.linspace(0, len(clean) - 1, min(images, len(clean))).round().long()
        picture.rows.append(TriggerRow(_label(component), clean[picks], triggered.x[picks],
                                       metrics.psnr(clean, triggered.x), metrics.ssim(clean, triggered.x)))
    return picture


def draw(rows: list[TriggerRow], path: str | Path) -> Path:
    """Write the grid picture: per row, pairs of (clean, triggered) images and the row's PSNR/SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ConfigError("no attack to draw: give a grid with attacks other than none, or --attack NAME")
    pairs = max(len(r.clean) for r in rows)
    fig, axes = plt.subplots(len(rows), 2 * pairs, figsize=(1.3 * 2 * pairs + 2.6, 1.45 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for p in range(pairs):
            for side, images in enumerate((row.clean, row.triggered)):
                ax = axes[r, 2 * p + side]
                ax.set_xticks([])
                ax.set_yticks([])
                if p < len(images):
                    img = images[p].permute(1, 2, 0).numpy()
                    ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255,
                              interpolation="nearest")
                if r == 0:
                    ax.set_title("clean" if side == 0 else "triggered", fontsize=8)
        psnr = "n/a" if row.psnr is None else f"{row.psnr:.1f} dB"
        ssim = "n/a" if row.ssim is None else f"{row.ssim:.3f}"
        axes[r, 0].set_ylabel(f"{row.label}\nPSNR {psnr}\nSSIM {ssim}", rotation=0, ha="right", va="center",
                              fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_component(text: str, option: str) -> Component:
    """A command-line component: a registered name, or a YAML mapping such as
    '{name: npz, path: data.npz, allow_hflip: true}' (as `--set dataset=...` takes it)."""
    import yaml
    from pydantic import ValidationError

    try:
        value = yaml.safe_load(text) if text.lstrip().startswith("{") else text
        return Component.model_validate(value)
    except (yaml.YAMLError, ValidationError) as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(exc, ValidationError) else "not YAML"
        raise ConfigError(f"{option} {text!r}: {reason}; give a name or a mapping like "
                          "'{name: npz, path: data.npz}'") from None


def write_trigger_picture(output: str | Path, config: str | None = None, attacks: Iterable[str] = (),
                          dataset: str | None = None, out: str | Path = "bdbench-out", images: int = 4,
                          overrides: Iterable[str] = ()) -> TriggerPicture:
    """The `bdbench triggers` command: attacks from a grid (its data set, target and first seed) or
    from `attacks` (names or YAML mappings such as '{name: badnets, patch_size: 4}'), on `dataset`
    (default: the grid's, else mnist5k). Learned triggers are cached in `out`/cache like a run's."""
    grid: GridSpec | None = None
    if config is not None:
        grid = load_grid(config, overrides)
        dataset_spec, target_label, seed = grid.dataset, grid.target_label, grid.seeds[0]
        components = list(grid.attacks)
    else:
        dataset_spec, target_label, seed, components = Component(name="mnist5k"), 0, 0, []
    if dataset is not None:
        dataset_spec = parse_component(dataset, "--dataset")
        DATASETS.check(dataset_spec.name, dataset_spec.params)
        if grid is not None:
            grid = grid.model_copy(update={"dataset": dataset_spec})
    if attacks:
        components = [parse_component(a, "--attack") for a in attacks]
    for component in components:
        ATTACKS.build(component.name, without_poison_rate(component).params)  # bad names fail before any work
    data = load_dataset(dataset_spec.name, **dataset_spec.params)
    cache = ArtifactCache(Path(out) / "cache")
    workshop = AttackWorkshop.for_dataset(derive_seed(seed, "attack"), dataset_spec, default_device(), cache)
    states = None if grid is None else cached_victim_states(grid, cache)
    picture = trigger_rows(data, components, target_label, workshop, images, states)
    if not picture.rows and picture.left_out:
        raise ConfigError("; ".join(picture.left_out))
    draw(picture.rows, output)
    return picture
