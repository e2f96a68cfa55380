"""One experiment: spec -> result row. Read top to bottom to follow a cell of the grid:

    data set -> attack.poison -> victim (trained or cached) -> deployed precision
      -> defense (sees only its DefenseContext) -> metrics computed here -> row
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from bdbench import metrics
from bdbench.attacks import ATTACKS, Attack, AttackWorkshop, PoisonedTrainingSet, TriggeredTestSet
from bdbench.data import Dataset, dataset_label, load_dataset
from bdbench.defenses import DEFENSES, SEES_TRAINING_SET, Defense, DefenseContext, DefenseOutcome, InputDetector
from bdbench.errors import ArtifactError, BdbenchError, NotApplicable
from bdbench.federated.attacks import client_attack_variant
from bdbench.grid import CleanBudget, ExperimentSpec, settings_changes
from bdbench.models import create_model, with_normalization
from bdbench.precision import PRECISIONS, Deployed, Precision, is_int8_kernel, passes_input_gradient
from bdbench.profiling import Cost, measure
from bdbench.schema import ResultRow
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache, StoredCheckpoint
from bdbench.training import default_device, predict, train, trains_in_bfloat16

log = logging.getLogger("bdbench")


def _generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


def new_model(spec: ExperimentSpec, dataset: Dataset, purpose: str) -> nn.Module:
    """An untrained model of the spec's architecture, initialised from a seed for `purpose`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, purpose))
        net = create_model(spec.model.name, dataset.num_classes, dataset.in_channels, dataset.image_size,
                           **spec.model.params)
    return with_normalization(net, dataset.mean, dataset.std)


def clean_budget(dataset: Dataset, budget: CleanBudget, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean images: a stratified draw from the clean training set (never test data)."""
    generator = _generator(seed, "clean_budget")
    y = dataset.y_train
    picked = []
    for label in range(dataset.num_classes):
        members = torch.nonzero(y == label).flatten()
        if budget.per_class is not None:
            count = budget.per_class
        else:
            assert budget.fraction is not None  # CleanBudget holds one of the two
            count = round(budget.fraction * len(members))
        count = min(len(members), max(1, count))
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    idx = torch.sort(torch.cat(picked)).values
    return dataset.x_train[idx], y[idx]


@dataclass
class Victim:
    model: nn.Module
    cached: bool
    training: Cost | None  # what training it took; None when loaded from the cache
    federated: dict[str, Any] | None = None  # a federated victim's measurements (FederationResult.summary)


def check_victim_settings(spec: ExperimentSpec, info: dict[str, Any] | None) -> None:
    """An `ArtifactError` (the victim is trained again) where the cached victim's info says it was trained with
    other settings than the code's current defaults give its spec; victims cached before settings were recorded
    pass."""
    before = info.get("settings") if info else None
    if before and (changes := settings_changes(before, spec.settings(victim_only=True))):
        raise ArtifactError(f"cached victim {spec.victim_key} was trained with other defaults than the code's now "
                            f"({'; '.join(changes)})")


def victim_checkpoint(spec: ExperimentSpec, cache: ArtifactCache, kind: str,
                      start_over: str) -> StoredCheckpoint | None:
    """Where a victim killed part-way (a session's end, a pre-empted node) resumes from: the checkpoint of its
    training (`kind` "training", its last epoch) or of its federation ("federated", its last checkpointed round)
    in the cache under its key, made with its settings (`start_over` says, in a warning, how it starts again
    without one). None in a cache that is not `durable` (a Ray node's, which dies with the worker)."""
    if not cache.durable:
        return None
    return StoredCheckpoint(cache, kind, spec.victim_key, spec.settings(victim_only=True), start_over)


@contextmanager
def measure_resumable(checkpoint: StoredCheckpoint | None) -> Iterator[Cost]:
    """`measure()` of a victim's training, to which the seconds its checkpoint carried are added: the epochs or
    rounds trained before a resume count too."""
    with measure() as cost:
        yield cost
    if checkpoint is not None:
        cost.seconds += checkpoint.earlier_s
        cost.cpu_seconds += checkpoint.earlier_cpu_s


def get_federated_victim(spec: ExperimentSpec, dataset: Dataset, attack: Attack, cache: ArtifactCache,
                         device: torch.device) -> Victim:
    """The global model of the spec's federation, from the cache when the same federation ran before (its
    measurements are stored beside it); otherwise the federation runs, resuming from its last checkpoint."""
    from bdbench.federated.simulation import run_federation

    assert spec.federated is not None
    with cache.lock("victims", spec.victim_key):
        model = new_model(spec, dataset, "victim_init")
        try:
            info = cache.load_info("victims", spec.victim_key)
            check_victim_settings(spec, info)
            if cache.load("victims", spec.victim_key, model):
                if not isinstance(info, dict) or "federated" not in info:
                    raise ArtifactError(f"cached federated victim {spec.victim_key} lacks its measurements")
                return Victim(model.to(device).eval(), True, None, info["federated"])
        except ArtifactError as exc:
            log.warning("%s; running the federation again", exc)
            cache.discard("victims", spec.victim_key)  # a checkpoint of it stays: resumed if its settings fit
            model = new_model(spec, dataset, "victim_init")
        federation = spec.federated
        checkpoint = victim_checkpoint(spec, cache, "federated", "running the federation from its first round")
        with measure_resumable(checkpoint) as training:
            result = run_federation(
                federation, (federation.server_defense.name, federation.server_defense.params), dataset,
                None if ATTACKS.is_reference(spec.attack.name) else attack, spec.poison_rate, spec.target_label,
                model, derive_seed(spec.seed, "federation"), device, checkpoint=checkpoint)
        summary = result.summary()
        cache.save("victims", spec.victim_key, result.model, {
            "spec": spec.model_dump(mode="json", include={"dataset", "model", "attack", "poison_rate", "target_label",
                                                          "seed", "federated"}),
            "settings": spec.settings(victim_only=True), "train_s": round(training.seconds, 3),
            "train_cpu_s": round(training.cpu_seconds, 3), "poisoned_samples": result.poisoned_samples,
            "federated": summary,
        })
        if checkpoint is not None:  # done with, once the finished model is stored
            checkpoint.discard()
    return Victim(result.model.eval(), False, training, summary)


def get_victim(spec: ExperimentSpec, dataset: Dataset, attack: Attack, poisoned: PoisonedTrainingSet,
               cache: ArtifactCache, device: torch.device) -> Victim:
    """The trained victim of this cell, from the cache when the same spec and seed trained it before.

    The cache lock makes "load, or train and save" one step, so that workers needing the same
    victim at the same time train it once (executors also schedule a victim's experiments after it).
    """
    attack_key = f"{spec.victim_key}.attack"  # what the attack learned with this victim, if anything
    with cache.lock("victims", spec.victim_key):
        model = new_model(spec, dataset, "victim_init")
        try:
            check_victim_settings(spec, cache.load_info("victims", spec.victim_key))
            if cache.load("victims", spec.victim_key, model):
                if attack.learns_with_victim:
                    state = cache.load_tensors("victims", attack_key)
                    if state is None:
                        raise ArtifactError(f"cached victim {spec.victim_key} lacks the trigger its attack learned with it")
                    attack.load_victim_state(state)
                return Victim(model.to(device).eval(), True, None)
        except ArtifactError as exc:
            log.warning("%s; retraining it", exc)
            cache.discard("victims", spec.victim_key)
            model = new_model(spec, dataset, "victim_init")
        checkpoint = victim_checkpoint(spec, cache, "training", "training from the first epoch")
        with measure_resumable(checkpoint) as training:
            train(model, poisoned.x, poisoned.y, spec.training, seed=derive_seed(spec.seed, "victim_train"),
                  crop_padding=dataset.crop_padding, hflip=dataset.allow_hflip, device=device,
                  hook=attack.training_hook(), checkpoint=checkpoint)
        if attack.learns_with_victim:  # saved first: a victim file never exists without its trigger
            cache.save_tensors("victims", attack_key, attack.victim_state(), {"victim_key": spec.victim_key,
                                                                             "attack": spec.attack.name})
        cache.save("victims", spec.victim_key, model, {
            "spec": spec.model_dump(mode="json", include={"dataset", "model", "training", "attack", "poison_rate",
                                                          "target_label", "seed"}),
            "settings": spec.settings(victim_only=True),
            "train_s": round(training.seconds, 3),
            "train_cpu_s": round(training.cpu_seconds, 3),
            "poisoned_samples": int(poisoned.poison_mask.sum()),
        })
        if checkpoint is not None:
            checkpoint.discard()
    return Victim(model.eval(), False, training)


def evaluate(model: nn.Module, dataset: Dataset, triggered: TriggeredTestSet | None) -> dict:
    """Clean accuracy on the test set; ASR and robust accuracy on its triggered images, on the
    model's own device (int8 kernels run on the CPU)."""
    result = {"clean_acc": metrics.accuracy(predict(model, dataset.x_test), dataset.y_test),
              "asr": None, "robust_acc": None}
    if triggered is not None and len(triggered.x):
        pred = predict(model, triggered.x)
        result["asr"] = metrics.attack_success_rate(pred, triggered.y_target)
        result["robust_acc"] = metrics.robust_accuracy(pred, triggered.y_true)
    return result


def triggered_test_source(spec: ExperimentSpec, attack: Attack) -> dict[str, Any]:
    """What fixes the triggered test set: the data set, the attack and its parameters (with the code's defaults,
    so that a changed default computes its metrics again) and the target label;
    the seed where the trigger is drawn or learned from it (`Attack.seeded_trigger`); the victim where the
    attack learns its trigger with it (`Attack.learns_with_victim`: input-aware)."""
    return {"dataset": spec.dataset.model_dump(mode="json"), "attack": spec.attack.model_dump(mode="json"),
            "attack_settings": ATTACKS.settings(spec.attack.name, spec.attack.params),
            "target_label": spec.target_label, "seed": spec.seed if attack.seeded_trigger else None,
            "victim_key": spec.victim_key if attack.learns_with_victim else None}


def trigger_stealth(triggered: TriggeredTestSet | None, spec: ExperimentSpec, attack: Attack,
                    cache: ArtifactCache) -> dict[str, float | None]:
    """PSNR (dB) and SSIM of the triggered test images against the same images without the trigger,
    computed once per triggered test set and cached; a corrupt cache entry is computed again, with a warning."""
    if triggered is None or triggered.x_clean is None:
        return {"psnr": None, "ssim": None}
    source = triggered_test_source(spec, attack)
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    with cache.lock("stealth", key):
        try:
            stored = cache.load_tensors("stealth", key)
            if stored is not None:
                return _stealth_values(stored, key)
        except ArtifactError as exc:
            log.warning("%s; computing the stealth metrics again", exc)
            cache.discard("stealth", key)
        values = {"psnr": metrics.psnr(triggered.x_clean, triggered.x),
                  "ssim": metrics.ssim(triggered.x_clean, triggered.x)}
        stored = {name: torch.tensor(math.nan if value is None else value, dtype=torch.float64)
                  for name, value in values.items()}
        cache.save_tensors("stealth", key, stored, {**source, "images": len(triggered.x)})
    return values


def _stealth_values(stored: dict[str, torch.Tensor], key: str) -> dict[str, float | None]:
    if set(stored) != {"psnr", "ssim"} or any(value.numel() != 1 for value in stored.values()):
        raise ArtifactError(f"cached stealth metrics {key} hold {sorted(stored)}, not one psnr and one ssim")
    return {name: None if math.isnan(float(value)) else float(value) for name, value in stored.items()}


def retrain_on_kept(spec: ExperimentSpec, dataset: Dataset, poisoned: PoisonedTrainingSet, flagged: torch.Tensor,
                    device: torch.device) -> nn.Module:
    """A data cleanser's last step: a fresh model trained on the samples it kept, with the victim's own settings."""
    keep = ~flagged
    model = new_model(spec, dataset, "retrain_init")
    train(model, poisoned.x[keep], poisoned.y[keep], spec.training, seed=derive_seed(spec.seed, "retrain"),
          crop_padding=dataset.crop_padding, hflip=dataset.allow_hflip, device=device)
    return model


def screen_inputs(detector: InputDetector, dataset: Dataset,
                  triggered: TriggeredTestSet | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An input detector's own work at run time: its (scores, flags) on the clean and the triggered test images."""
    verdicts = {"clean": detector(dataset.x_test)}
    if triggered is not None and len(triggered.x):
        verdicts["triggered"] = detector(triggered.x)
    return verdicts


def _flagged_samples(outcome: DefenseOutcome, poisoned: PoisonedTrainingSet) -> torch.Tensor | None:
    """The training samples a defense flagged (None if it flags none), checked against the training set's size."""
    if outcome.flagged is None:
        return None
    flagged = outcome.flagged.bool().cpu()
    if flagged.shape != poisoned.poison_mask.shape:
        raise ValueError(f"defense flagged {tuple(flagged.shape)} samples, the training set has "
                         f"{len(poisoned.poison_mask)}")
    return flagged


def _score_outcome(outcome: DefenseOutcome, poisoned: PoisonedTrainingSet, flagged: torch.Tensor | None,
                   verdicts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> dict[str, Any]:
    """Score what a defense returned (and its input detector's verdicts) against ground truth."""
    row: dict[str, Any] = {}
    if outcome.detected is not None:
        row["detected"] = bool(outcome.detected)
    if outcome.anomaly_index is not None:
        row["anomaly_index"] = float(outcome.anomaly_index)
    if outcome.suspected_targets is not None:
        row["suspected_targets"] = [int(t) for t in outcome.suspected_targets]
    if outcome.class_statistics is not None:
        row["class_statistics"] = outcome.class_statistics_list()
    if outcome.threshold is not None:
        row["det_threshold"] = float(outcome.threshold)
    if outcome.repair_declined is not None:
        row["repair_declined"] = bool(outcome.repair_declined)
    # Training samples are scored twice: against every poisoned sample (det_*) and against the payload alone, the
    # samples that carry the backdoor (det_payload_*: Qi et al.'s elimination and sacrifice rates, where a flagged
    # cover sample counts as a sacrificed clean one). The two agree for attacks without cover samples.
    if outcome.sample_scores is not None:
        scores = outcome.sample_scores.cpu()
        row["det_auroc"] = metrics.auroc(scores, poisoned.poison_mask)
        row["det_payload_auroc"] = metrics.auroc(scores, poisoned.payload_mask)
    if flagged is not None:
        row["det_tpr"], row["det_fpr"] = metrics.detection_rates(flagged, poisoned.poison_mask)
        row["det_payload_tpr"], row["det_payload_fpr"] = metrics.detection_rates(flagged, poisoned.payload_mask)
    if verdicts is not None:
        # Every triggered test input carries the test-time trigger, the one the payload samples taught the model
        # (no test input is a cover sample): for an input detector the payload rates are its rates.
        clean_scores, clean_flags = verdicts["clean"]
        row["det_fpr"] = row["det_payload_fpr"] = float(clean_flags.float().mean())
        if "triggered" in verdicts:
            trig_scores, trig_flags = verdicts["triggered"]
            row["det_tpr"] = row["det_payload_tpr"] = float(trig_flags.float().mean())
            truth = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(trig_scores))]).bool()
            auroc = metrics.auroc(torch.cat([clean_scores.cpu(), trig_scores.cpu()]), truth)
            row["det_auroc"] = row["det_payload_auroc"] = auroc
    return row


def model_for_defense(defense: Defense, deployed: Deployed, budget_x: torch.Tensor) -> tuple[nn.Module, str | None]:
    """The model a defense receives under quantize-then-defend, and the proxy used (None or "ste").

    A defense that only queries predictions gets the deployed model. One that needs the model's
    internals gets it too if it passes input gradients; otherwise its straight-through twin, or,
    without one, the experiment is not applicable (never "not detected").
    """
    if not defense.needs_internals or passes_input_gradient(deployed.model, budget_x[:8].float().div(255.0)):
        return deployed.model, None
    if deployed.twin is not None:
        return deployed.twin, "ste"
    raise NotApplicable(f"{type(defense).__name__} needs input gradients, which this deployed model does not "
                        "pass and for which its precision has no straight-through twin")


def redeploy(precision: Precision, model: nn.Module, calibration_x: torch.Tensor) -> nn.Module:
    """`model` as deployed: float networks (a repaired copy, a twin, a retrained model) go through
    the precision again; a model that already holds int8 kernels is deployed as it is."""
    if any(is_int8_kernel(m) for m in model.modules()):
        return model
    return precision.deploy(model, calibration_x).model


def base_row(spec: ExperimentSpec) -> ResultRow:
    """The columns an experiment's spec fixes, before any work: a misspelled column fails here."""
    return ResultRow(
        experiment_id=spec.experiment_id, victim_key=spec.victim_key,
        dataset=dataset_label(spec.dataset.name, spec.dataset.params, spec.dataset.label),
        dataset_loader=spec.dataset.name, model=spec.model.name,
        attack=spec.attack.name, attack_params=spec.attack.params, attack_variant=spec.attack_variant,
        poison_rate=spec.poison_rate, target_label=spec.target_label, defense=spec.defense.name,
        defense_params=spec.defense.params, defense_variant=spec.defense_variant,
        defense_kind=DEFENSES.get(spec.defense.name).kind.value, precision=spec.precision,
        precision_order=spec.precision_order, seed=spec.seed,
        spec=json.dumps(spec.model_dump(mode="json"), sort_keys=True), settings=spec.settings(),
        **_federated_columns(spec),
    )


def _federated_columns(spec: ExperimentSpec) -> dict[str, Any]:
    """The columns a federated spec fixes (none for a centralized one)."""
    federation = spec.federated
    if federation is None:
        return {}
    return {"server_defense": federation.server_defense.name, "server_defense_params": federation.server_defense.params,
            "server_defense_variant": federation.server_defense_variant, "fed_clients": federation.clients,
            "fed_malicious": len(federation.malicious_ids), "fed_participation": federation.participation,
            "fed_split": federation.split_name(), "rounds": federation.rounds,
            "fed_client_attack": None if ATTACKS.is_reference(spec.attack.name) else client_attack_variant(federation)}


def run_experiment(spec: ExperimentSpec, cache: ArtifactCache, device: torch.device | None = None,
                   log_dir: Path | None = None) -> dict[str, Any]:
    """Run one experiment and return its row (every column of `ResultRow`). A failure is a row with status
    `error`, never an exception."""
    device = device or default_device()
    row = base_row(spec)
    # Float reductions split across threads, and PyTorch and oneDNN pick kernels by the CPU's instruction
    # set (AVX-512, AVX2, ...), so both are part of "same device, same numbers".
    row.device, row.torch_threads = str(device), torch.get_num_threads()
    row.cpu_kernels = torch.backends.cpu.get_cpu_capability()
    row.train_dtype = "bfloat16" if trains_in_bfloat16(spec.training, device) else "float32"
    start = time.perf_counter()
    try:
        _run(spec, cache, device, row)
        row.status = "ok"
    except NotApplicable as exc:
        row.status, row.error = "not_applicable", str(exc)
    except BdbenchError as exc:
        row.status, row.error = "error", str(exc)
    except Exception as exc:  # a crash in an attack or defense is a result, not the end of the grid
        row.status, row.error = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"{spec.experiment_id}.log").write_text(traceback.format_exc())
    row.wall_s = round(time.perf_counter() - start, 3)
    row.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row.as_dict()


def _seconds(costs: dict[str, Cost], part: str) -> float | None:
    """Seconds a part of the defense took, None where the defense has no such part."""
    return round(costs[part].seconds, 3) if part in costs else None


def _run(spec: ExperimentSpec, cache: ArtifactCache, device: torch.device, row: ResultRow) -> None:
    """The experiment's work; it fills the measured columns of `row` once all of it has succeeded."""
    dataset = load_dataset(spec.dataset.name, **spec.dataset.params)
    if not 0 <= spec.target_label < dataset.num_classes:
        raise BdbenchError(f"target_label {spec.target_label} is not a class of {dataset.name} (0..{dataset.num_classes - 1})")

    attack: Attack = ATTACKS.build(spec.attack.name, spec.attack.params)
    workshop = AttackWorkshop.for_dataset(derive_seed(spec.seed, "attack"), spec.dataset, device, cache)
    attack.prepare(dataset, spec.target_label, workshop)
    if spec.federated is not None:
        # The malicious clients poison their own shares inside the federation; no central training set exists.
        poisoned = PoisonedTrainingSet(dataset.x_train, dataset.y_train, torch.zeros(len(dataset.y_train), dtype=torch.bool))
        victim = get_federated_victim(spec, dataset, attack, cache, device)
    else:
        poisoned = attack.poison(dataset, spec.poison_rate, spec.target_label, _generator(spec.seed, "poison"))
        victim = get_victim(spec, dataset, attack, poisoned, cache, device)
    # After the victim: an attack that learns its trigger while the victim trains has it only now.
    poisoned = attack.after_training(poisoned)
    reference = ATTACKS.is_reference(spec.attack.name)
    triggered = None if reference else attack.triggered_test_set(dataset, spec.target_label)

    budget_x, budget_y = clean_budget(dataset, spec.clean_budget, spec.seed)
    precision = PRECISIONS.get(spec.precision)
    deployed = precision.deploy(victim.model, budget_x)
    before = evaluate(deployed.model, dataset, triggered)

    defense = DEFENSES.build(spec.defense.name, spec.defense.params)
    if spec.federated is not None and defense.kind in SEES_TRAINING_SET:
        raise NotApplicable(f"{spec.defense.name} inspects the training set, which a federation never gathers in one "
                            "place; run it on a centralized grid")
    if spec.precision_order == "defend_then_quantize":
        defended, proxy = victim.model, None
    else:
        defended, proxy = model_for_defense(defense, deployed, budget_x)
    sees_training_set = defense.kind in SEES_TRAINING_SET
    context = DefenseContext(
        model=copy.deepcopy(defended), clean_x=budget_x.clone(), clean_y=budget_y.clone(),
        num_classes=dataset.num_classes, in_channels=dataset.in_channels, image_size=dataset.image_size,
        crop_padding=dataset.crop_padding, allow_hflip=dataset.allow_hflip, train_config=spec.training,
        seed=derive_seed(spec.seed, "defense", spec.defense.name), device=device,
        new_model=lambda: new_model(spec, dataset, "defense_model_init"),
        train_x=poisoned.x.clone() if sees_training_set else None,
        train_y=poisoned.y.clone() if sees_training_set else None,
    )
    # Everything the defense costs a user is timed, part by part: the method itself, the retraining
    # after a data cleanser, the input detector's screening of the test images. Scoring against
    # ground truth is the benchmark's work, not the defense's, and stays out.
    costs: dict[str, Cost] = {}
    with measure() as costs["method"]:
        outcome = defense.run(context)
    repaired, flagged, verdicts = outcome.model, _flagged_samples(outcome, poisoned), None
    if flagged is not None and repaired is None:
        with measure() as costs["retrain"]:
            repaired = retrain_on_kept(spec, dataset, poisoned, flagged, device)
    if outcome.input_detector is not None:
        with measure() as costs["scoring"]:
            verdicts = screen_inputs(outcome.input_detector, dataset, triggered)
    detection = _score_outcome(outcome, poisoned, flagged, verdicts)
    # Whatever the defense hands back is measured as it would be deployed.
    after = evaluate(redeploy(precision, repaired, budget_x), dataset, triggered) if repaired is not None else before

    stealth = trigger_stealth(triggered, spec, attack, cache)
    der = None
    if not DEFENSES.is_reference(spec.defense.name) and before["asr"] is not None:
        der = metrics.defense_effectiveness_rating(before["clean_acc"], before["asr"], after["clean_acc"], after["asr"])
    # The row's measured columns are set only now, after every step succeeded: an error row holds none of them.
    row.clean_acc, row.asr, row.robust_acc = after["clean_acc"], after["asr"], after["robust_acc"]
    row.update(**detection)
    row.psnr, row.ssim = stealth["psnr"], stealth["ssim"]
    row.clean_acc_before, row.asr_before, row.robust_acc_before = (before["clean_acc"], before["asr"],
                                                                   before["robust_acc"])
    row.quantized_layers, row.proxy = deployed.quantized_layers, proxy
    row.clean_budget, row.victim_cached = len(budget_y), victim.cached
    if victim.training is not None:
        row.victim_train_s = round(victim.training.seconds, 3)
        row.victim_train_cpu_s = round(victim.training.cpu_seconds, 3)
    row.defense_s = round(sum(cost.seconds for cost in costs.values()), 3)
    row.defense_cpu_s = round(sum(cost.cpu_seconds for cost in costs.values()), 3)
    row.defense_method_s, row.defense_retrain_s = _seconds(costs, "method"), _seconds(costs, "retrain")
    row.defense_scoring_s = _seconds(costs, "scoring")
    row.peak_rss_mb = max(c.peak_rss_mb for c in costs.values())
    row.der = der
    if victim.federated is not None:
        row.bytes_up, row.bytes_down = victim.federated["bytes_up"], victim.federated["bytes_down"]
        row.server_defense_s = round(victim.federated["server_defense_s"], 4)
        row.round_metrics = victim.federated["curve"]
