"""Cross-check: bdbench's Activation Clustering, Spectral Signatures and STRIP against IBM's
Adversarial Robustness Toolbox (ART), on the same victims and the same poisoned training set.

For each backdoored victim of a grid (default `fidelity-cifar10`, seed 0), this rebuilds exactly
what the runner gives a defender (the poisoned training set with the attacker's labels, the
trained victim from the grid's cache in `--out`, the clean budget) and runs:

- **AC**: ours (`defenses.ac`: penultimate activations, FastICA to 10 dims, 2-means, the smaller
  cluster flagged below 35% of its class) beside ART's `ActivationDefence` given the same
  penultimate activations, twice: with ART's defaults (PCA to 10 dims; the "smaller" analysis,
  which flags the smaller cluster of every class whatever its size) and configured as ours:
  ART's FastICA and 2-means (`cluster_activations`), with the relative-size rule (a cluster below
  35% of its class) applied here, because ART 1.20.1's own `relative-size` analysis raises on any
  class where no cluster falls below the threshold.
- **SS**: ours (`defenses.ss`) beside ART's `SpectralSignatureDefense` with the same epsilon
  (`expected_pp_poison` 0.1, `eps_multiplier` 1.5: both remove the top 15% of each class), and
  a control: ART's scoring function handed centred features (see `art_ss_centred`).
- **STRIP**: ours (`defenses.strip`, 100 overlays drawn per input, the authors' unclipped pixel-wise
  sum, a normal fitted to the budget's entropies and cut at 1%) beside ART's `STRIP` fitted on the
  same clean budget (its defaults: 20 overlays, 0.5/0.5 blending, a normal fit at 1% false
  acceptance), on `--strip-images`
  clean test images and as many triggered ones (the attack's triggered test set); and a control:
  ART's procedure with the paper's entropy statistic (see `art_strip_per_prediction`); and ours with our
  former choices (the sum clipped at 255, the budget's 1% quantile as the boundary), together and each alone.

Prints, per victim and method: TPR (share of the poisoned training samples, or triggered test
inputs, flagged), FPR (share of the clean ones flagged), how many were flagged, the overlap of
ART's flagged set with ours (Jaccard), and seconds. ART is an optional extra
(`pip install adversarial-robustness-toolbox`), never a run-time dependency of bdbench.

    python benchmarks/art_crosscheck.py [--grid fidelity-cifar10] [--out OUT] [--attacks badnets,blended]
           [--set KEY=VALUE ...] [--strip-images 1000] [--methods ac,ss,strip]

The victims are trained (and cached in `--out`) if the grid has not trained them yet.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bdbench.attacks import ATTACKS
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import load_dataset
from bdbench.defenses import DEFENSES
from bdbench.defenses.base import DefenseContext
from bdbench.defenses.layers import classifier_layer
from bdbench.experiment import _generator, clean_budget, get_victim, new_model
from bdbench.grid import expand, load_grid
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache
from bdbench.training import default_device


@dataclass
class Flags:
    """What one method flagged: training samples (or test inputs) as a bool vector, and its seconds; or, where
    the method raised, its error (a peer library failing on a victim is a result too). `reference` marks ours at
    its defaults, the row its family's (the method name's first word's) Jaccard column compares the others with."""

    method: str
    flagged: np.ndarray | None
    seconds: float
    error: str = ""
    reference: bool = False


class Penultimate(nn.Module):
    """The victim up to its classification layer: outputs the features that layer reads, so that
    ART's detectors (which read the output of a wrapped model's last module) see the same
    activations as ours."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, classifier_layer(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].flatten(1)))
        try:
            self.model(x)
        finally:
            handle.remove()
        return seen[0]


def art_classifier(model: nn.Module, num_classes: int, shape: tuple[int, int, int], device: torch.device):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model if isinstance(model, nn.Sequential) else nn.Sequential(model), loss=nn.CrossEntropyLoss(), input_shape=shape,
                             nb_classes=num_classes, clip_values=(0.0, 1.0),
                             device_type="gpu" if device.type == "cuda" else "cpu")


def as_float(x: torch.Tensor) -> np.ndarray:
    return (x.float() / 255.0).numpy()


def timed(method: str, run, reference: bool = False) -> Flags:
    start = time.perf_counter()
    try:
        flagged = np.asarray(run(), dtype=bool)
    except Exception as exc:  # reported in the method's row; the other methods still run
        return Flags(method, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}".splitlines()[0],
                     reference)
    return Flags(method, flagged, time.perf_counter() - start, reference=reference)


def compare(spec, cache: ArtifactCache, device: torch.device, strip_images: int, methods: set[str]) -> None:
    """Ours and ART's on one victim, for `methods` (of ac, ss, strip): prints the training-set table as soon as
    it is measured, then the input-detection table."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.defences.transformer.poisoning import STRIP

    dataset = load_dataset(spec.dataset.name, **spec.dataset.params)
    attack = ATTACKS.build(spec.attack.name, spec.attack.params)
    attack.prepare(dataset, spec.target_label, AttackWorkshop.for_dataset(derive_seed(spec.seed, "attack"), spec.dataset,
                                                                          device, cache))
    poisoned = attack.poison(dataset, spec.poison_rate, spec.target_label, _generator(spec.seed, "poison"))
    victim = get_victim(spec, dataset, attack, poisoned, cache, device)
    poisoned = attack.after_training(poisoned)
    triggered = attack.triggered_test_set(dataset, spec.target_label)
    budget_x, budget_y = clean_budget(dataset, spec.clean_budget, spec.seed)
    model = victim.model.eval()

    def context(name: str) -> DefenseContext:
        return DefenseContext(
            model=copy.deepcopy(model), clean_x=budget_x.clone(), clean_y=budget_y.clone(),
            num_classes=dataset.num_classes, in_channels=dataset.in_channels, image_size=dataset.image_size,
            crop_padding=dataset.crop_padding, allow_hflip=dataset.allow_hflip, train_config=spec.training,
            seed=derive_seed(spec.seed, "defense", name), device=device,
            new_model=lambda: new_model(spec, dataset, "defense_model_init"),
            train_x=poisoned.x.clone(), train_y=poisoned.y.clone())

    def ours(name: str):
        return lambda: DEFENSES.build(name, {}).run(context(name)).flagged.numpy()

    shape = (dataset.in_channels, dataset.image_size, dataset.image_size)
    features = art_classifier(Penultimate(copy.deepcopy(model)), dataset.num_classes, shape, device)
    x_train, y_train = as_float(poisoned.x), np.eye(dataset.num_classes)[poisoned.y.numpy()]

    def art_ac_defaults():
        _, is_clean = ActivationDefence(features, x_train, y_train).detect_poison(
            nb_clusters=2, nb_dims=10, reduce="PCA", cluster_analysis="smaller")
        return ~np.asarray(is_clean, dtype=bool)

    def art_ac_relative_size():
        # ART's ICA and 2-means, then the relative-size rule applied here: ART 1.20.1's own
        # "relative-size" analysis raises ValueError (`cluster_id in np.where(...)`) whenever a class
        # has no cluster below the threshold, i.e. on every clean class.
        defence = ActivationDefence(features, x_train, y_train)
        clusters_by_class, _ = defence.cluster_activations(nb_clusters=2, nb_dims=10, reduce="FastICA")
        flagged = np.zeros(len(y_train), dtype=bool)
        labels = poisoned.y.numpy()
        for label, clusters in enumerate(clusters_by_class):
            members = np.flatnonzero(labels == label)
            sizes = np.bincount(clusters, minlength=2) / max(1, len(clusters))
            flagged[members] = sizes[clusters] < 0.35
        return flagged

    def art_ss():
        _, is_clean = SpectralSignatureDefense(features, x_train, y_train, expected_pp_poison=0.1,
                                               eps_multiplier=1.5).detect_poison()
        return ~np.asarray(is_clean, dtype=bool)

    def art_ss_centred():
        # Control: ART's own scoring function and cut-off, handed each class's features centred.
        # ART projects the uncentred features on the top singular vector (the paper's Algorithm 1
        # projects the centred ones); centring them first isolates that one difference.
        feats = features.get_activations(x_train, layer=0, batch_size=128).reshape(len(x_train), -1)
        flagged = np.zeros(len(y_train), dtype=bool)
        labels = poisoned.y.numpy()
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            class_feats = feats[members] - feats[members].mean(0)
            score = SpectralSignatureDefense.spectral_signature_scores(class_feats).ravel()
            flagged[members] = score >= np.quantile(score, 1 - 1.5 * 0.1)
        return flagged

    print(f"\n## {spec.describe()}")
    training = []
    if "ac" in methods:
        training += [timed("AC (ours: ICA)", ours("ac"), reference=True), timed("AC (ART: defaults)", art_ac_defaults),
                     timed("AC (ART: ICA, rel. size)", art_ac_relative_size)]
    if "ss" in methods:
        training += [timed("SS (ours)", ours("ss"), reference=True), timed("SS (ART)", art_ss),
                     timed("SS (ART, centred input)", art_ss_centred)]
    if training:
        table("Training-set cleansers", training, poisoned.poison_mask.numpy())
    if "strip" not in methods:
        return

    # STRIP on the same clean and triggered test images.
    pick = torch.Generator().manual_seed(0)
    clean_x = dataset.x_test[torch.randperm(len(dataset.x_test), generator=pick)[:strip_images]]
    trig_x = triggered.x[torch.randperm(len(triggered.x), generator=pick)[:strip_images]]
    inputs = torch.cat([clean_x, trig_x])
    is_triggered = np.r_[np.zeros(len(clean_x), bool), np.ones(len(trig_x), bool)]

    def our_strip(params: dict | None = None):
        def run() -> np.ndarray:
            detector = DEFENSES.build("strip", params or {}).run(context("strip")).input_detector
            return detector(inputs)[1].numpy()
        return run

    def art_strip():
        np.random.seed(derive_seed(spec.seed, "art_strip") % 2**32)
        # ART's STRIP reads the classifier's outputs as probabilities: the victim with a softmax.
        probabilities = nn.Sequential(copy.deepcopy(model), nn.Softmax(dim=1))
        strip = STRIP(art_classifier(probabilities, dataset.num_classes, shape, device))()
        strip.mitigate(as_float(budget_x))
        predictions = strip.predict(as_float(inputs))
        return ~predictions.any(axis=1)  # ART abstains with an all-zero row

    def art_strip_per_prediction():
        # Control: ART's procedure (20 overlays blended 0.5/0.5, a normal fit at 1% false acceptance)
        # with the paper's statistic: each perturbed prediction's entropy over the classes, averaged.
        # ART 1.20.1 takes `entropy(predictions, axis=0)`, an entropy over the overlays per class.
        from scipy.stats import entropy, norm

        rng = np.random.default_rng(derive_seed(spec.seed, "art_strip_control"))
        probabilities = nn.Sequential(copy.deepcopy(model), nn.Softmax(dim=1))
        classifier = art_classifier(probabilities, dataset.num_classes, shape, device)
        pool = as_float(budget_x)

        def statistic(images: np.ndarray) -> np.ndarray:
            picks = rng.integers(0, len(pool), (len(images), 20))
            blended = 0.5 * images[:, None] + 0.5 * pool[picks]
            predictions = classifier.predict(blended.reshape(-1, *shape).astype(np.float32), batch_size=1000)
            return entropy(predictions.reshape(len(images), 20, -1), base=2, axis=2).mean(1)

        threshold = norm.ppf(0.01, *norm.fit(statistic(pool)))
        return statistic(as_float(inputs)) <= threshold

    # Controls: ours before session 16 took its authors' procedure (the sum clipped at 255, the budget's
    # empirical 1% quantile as the boundary), and each of those two parts alone, to tell which one moves a verdict.
    screening = [timed("STRIP (ours)", our_strip(), reference=True),
                 timed("STRIP (ours, clipped, quantile)", our_strip({"superimposition": "clipped_sum",
                                                                      "boundary": "quantile"})),
                 timed("STRIP (ours, clipped)", our_strip({"superimposition": "clipped_sum"})),
                 timed("STRIP (ours, quantile)", our_strip({"boundary": "quantile"})),
                 timed("STRIP (ART)", art_strip),
                 timed("STRIP (ART, per-prediction)", art_strip_per_prediction)]
    table("Run-time input detection (test images)", screening, is_triggered)


def table(title: str, runs: list[Flags], positive: np.ndarray) -> None:
    reference = {r.method.split()[0]: r.flagged for r in runs if r.reference and r.flagged is not None}
    print(f"\n{title}: {int(positive.sum())} positives of {len(positive)}")
    print(f"| {'method':<31} | {'TPR':>6} | {'FPR':>6} | {'flagged':>8} | {'Jaccard with ours':>17} | {'seconds':>8} |")
    print(f"|{'-' * 33}|{'-' * 7}:|{'-' * 7}:|{'-' * 9}:|{'-' * 18}:|{'-' * 9}:|")
    for run in runs:
        if run.flagged is None:
            print(f"| {run.method:<31} | failed: {run.error} |")
            continue
        ours = reference.get(run.method.split()[0])  # absent where ours failed
        union = 0 if ours is None else (ours | run.flagged).sum()
        jaccard = float("nan") if ours is None else (ours & run.flagged).sum() / union if union else 1.0
        tpr = (run.flagged & positive).sum() / max(1, positive.sum())
        fpr = (run.flagged & ~positive).sum() / max(1, (~positive).sum())
        print(f"| {run.method:<31} | {tpr:6.3f} | {fpr:6.3f} | {int(run.flagged.sum()):8d} | {jaccard:17.3f} | "
              f"{run.seconds:8.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="fidelity-cifar10")
    parser.add_argument("--out", default="bdbench-out", help="the grid's output folder (its victim cache)")
    parser.add_argument("--attacks", default="badnets,blended")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strip-images", type=int, default=1000)
    parser.add_argument("--methods", default="ac,ss,strip", help="which of ac, ss, strip to compare")
    args = parser.parse_args()
    grid = load_grid(args.grid, args.overrides)
    wanted = args.attacks.split(",")
    specs = [s for s in expand(grid) if s.attack.name in wanted and s.seed == args.seed and s.defense.name == "none"
             and s.precision == "fp32"]
    device = default_device()
    cache = ArtifactCache(f"{args.out}/cache")
    print(f"ART cross-check on {grid.name} ({grid.dataset.name} {grid.dataset.params.get('path', '')}), seed "
          f"{args.seed}, {device}, {torch.get_num_threads()} threads")
    for spec in specs:
        compare(spec, cache, device, args.strip_images, set(args.methods.split(",")))


if __name__ == "__main__":
    main()
