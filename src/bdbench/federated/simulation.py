"""One federation, round by round: the global model a federated experiment deploys (its "victim").

    split the training set -> malicious clients poison their own share with the grid's attack
      -> each round: choose clients, train them (in this process or on Ray workers), collect their updates
      -> the server defense aggregates -> the global model moves -> score the evaluated model

Threat model: the server defense sees the round's updates and the clients' sample counts only; poisoned
samples, which clients are malicious and test data never reach it. The simulation scores the evaluated model
(Lockdown's consensus-fused one) on the test set after the rounds `eval_every` picks, for the per-round curve.

Every random choice of round r is drawn from a seed derived from the experiment's seed and r (participants,
each client's batches and augmentation, server noise), so a run resumed from a checkpoint ends with the same
weights as one never interrupted. The checkpoint is the one victims' training keeps (`training.Checkpoint`;
the runner's is a `store.StoredCheckpoint` under `federated/<victim key>` in the output folder's cache, with
the settings the federation ran with and the seconds it spent): the federation saves its state
(`Federation.state`) every `checkpoint_every` rounds, and a state that does not fit it, or one of other
settings, is discarded with a warning and the federation starts again from its first round.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bdbench.attacks import Attack
from bdbench.data import Dataset
from bdbench.errors import ArtifactError, ConfigError
from bdbench.federated.aggregation import SERVER_DEFENSES, RoundContext, ServerDefense
from bdbench.federated.attacks import ClientAttack, CraftContext, MaliciousClients, build_client_attack
from bdbench.federated.clients import ClientPlan, Clients, ClientTrainer, LocalSGD, Tensors, check_template
from bdbench.federated.config import FederatedConfig
from bdbench.federated.lockdown import Lockdown, consensus, init_masks, prune, prune_ratio, regrow
from bdbench.federated.ray_clients import client_trainer
from bdbench.federated.split import hold_out, split_dirichlet, split_iid
from bdbench.progress import steps
from bdbench.seeding import derive_seed
from bdbench.training import Checkpoint

log = logging.getLogger("bdbench")

BYTES_PER_VALUE = 4  # float32 weights
CURVE_FIELDS = ("round", "clean_acc", "asr", "robust_acc", "bytes_up", "bytes_down", "server_defense_s")


@dataclass
class FederationResult:
    """The evaluated global model and what the federation measured."""

    model: nn.Module
    curve: list[dict[str, Any]]  # one entry per evaluated round, CURVE_FIELDS
    bytes_up: float  # mean bytes all participating clients sent per round
    bytes_down: float  # mean bytes the server sent to them per round
    server_defense_s: float  # seconds of server-side aggregation over all rounds
    poisoned_samples: int
    resumed_from: int = 0  # the round a checkpoint resumed from (0: none)
    measures: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What is stored beside the cached global model (JSON) and read back when it is loaded."""
        return {"curve": self.curve, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "server_defense_s": self.server_defense_s, "poisoned_samples": self.poisoned_samples}


def client_shares(y: torch.Tensor, config: FederatedConfig, seed: int) -> list[torch.Tensor]:
    """The training-set rows each client holds."""
    if config.split == "iid":
        return split_iid(y, config.clients, derive_seed(seed, "federated_split"))
    return split_dirichlet(y, config.clients, config.split, derive_seed(seed, "federated_split"))


def poison_shares(dataset: Dataset, shares: list[torch.Tensor], malicious: list[int], attack: Attack,
                  share: float, target_label: int, seed: int,
                  client_attack: ClientAttack | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The federation's training tensor with each malicious client's rows poisoned by `attack` (or the local attack
    a client attack gives the client, DBA's part of the trigger): floor(share x the attack's candidates among
    the client's samples) of them (for an all-to-one attack, its non-target samples, as Lockdown's
    `poison_dataset`). Returns images, labels and the number of poisoned samples."""
    x, y, poisoned = dataset.x_train.clone(), dataset.y_train.clone(), 0
    shape = (int(dataset.x_train.shape[1]), int(dataset.x_train.shape[2]), int(dataset.x_train.shape[3]))
    for index, client in enumerate(malicious):
        own_attack = attack if client_attack is None else client_attack.local_attack(attack, index, shape)
        rows = shares[client]
        own = dataclasses.replace(dataset, x_train=dataset.x_train[rows], y_train=dataset.y_train[rows])
        generator = torch.Generator().manual_seed(derive_seed(seed, "federated_poison", client))
        candidates = len(own_attack.select(own.y_train, 1.0, target_label, generator))
        count = math.floor(share * candidates)
        if count == 0:
            continue
        result = own_attack.poison(own, count / len(rows), target_label, generator)
        if result.y.dtype != torch.long:
            raise ConfigError(f"attack {type(attack).__name__} trains on soft labels, which federated clients do not "
                              "support yet; pick a hard-label attack")
        x[rows], y[rows] = result.x, result.y
        poisoned += int(result.poison_mask.sum())
    return x, y, poisoned


def _stack(params: Tensors, k: int) -> Tensors:
    return {n: p.unsqueeze(0).expand(k, *p.shape).clone() for n, p in params.items()}


def _flat(stacked: Tensors, names: list[str]) -> torch.Tensor:
    return torch.cat([stacked[n].reshape(stacked[n].shape[0], -1) for n in names], dim=1)


def _unflat(vector: torch.Tensor, like: Tensors, names: list[str]) -> Tensors:
    """Flattened weights (D,), or stacked ones (K, D), back to name -> (*shape) or (K, *shape)."""
    out, start = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = vector[..., start:start + size].reshape(*vector.shape[:-1], *like[n].shape)
        start += size
    return out


class Federation:
    """The state of one federation between rounds: global weights, Lockdown's masks, the curve so far."""

    def __init__(self, config: FederatedConfig, defense: ServerDefense, template: nn.Module, seed: int,
                 device: torch.device, client_attack: ClientAttack | None = None) -> None:
        self.config, self.defense, self.template, self.seed, self.device = config, defense, template, seed, device
        self.malicious = None if client_attack is None else MaliciousClients(
            client_attack, config.malicious_ids, CraftContext(config.per_round, config.server_lr))
        self.names = [n for n, _ in template.named_parameters()]
        self.weights: Tensors = {n: p.detach().to(device).clone() for n, p in template.named_parameters()}
        self.masks: Tensors | None = None
        self.removed: dict[str, torch.Tensor] | None = None
        if isinstance(defense, Lockdown):
            shapes = {n: p.shape for n, p in self.weights.items()}
            self.masks = init_masks(shapes, config.clients, defense.density,
                                    torch.Generator().manual_seed(derive_seed(seed, "lockdown_masks")),
                                    defense.mask_init, defense.same_init_mask)
            self.masks = {n: m.to(device) for n, m in self.masks.items()}
            self.removed = {n: torch.zeros(config.clients, dtype=torch.long) for n in self.names}
        self.round = 0
        self.curve: list[dict[str, Any]] = []
        self.server_s = 0.0
        self.bytes = [0.0, 0.0]  # summed over rounds: up, down

    # ------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {f"weights.{n}": p for n, p in self.weights.items()}
        if self.masks is not None and self.removed is not None:
            tensors.update({f"masks.{n}": m.to(torch.uint8) for n, m in self.masks.items()})
            tensors.update({f"removed.{n}": r for n, r in self.removed.items()})
        if self.malicious is not None:
            tensors.update({f"client_attack.{n}": t for n, t in self.malicious.attack.state().items()})
        tensors["round"] = torch.tensor(self.round)
        tensors["totals"] = torch.tensor([self.server_s, *self.bytes], dtype=torch.float64)
        tensors["curve"] = torch.tensor([[math.nan if e[f] is None else float(e[f]) for f in CURVE_FIELDS]
                                         for e in self.curve], dtype=torch.float64).view(-1, len(CURVE_FIELDS))
        return tensors

    def load(self, tensors: dict[str, Any]) -> None:
        """Continue from a `state`: an `ArtifactError` where it lacks an entry or does not fit this federation
        (other weights, clients or rounds). The federation is not to be used after one: start a new one."""
        problem = self._misfit(tensors)
        if problem is not None:
            raise ArtifactError(f"federated checkpoint does not fit this federation ({problem})")
        try:
            self.weights = {n: tensors[f"weights.{n}"].to(self.device).clone() for n in self.names}
            if self.masks is not None:
                self.masks = {n: tensors[f"masks.{n}"].float().to(self.device) for n in self.names}
                self.removed = {n: tensors[f"removed.{n}"].long() for n in self.names}
            if self.malicious is not None:
                self.malicious.attack.load({n.removeprefix("client_attack."): t for n, t in tensors.items()
                                            if n.startswith("client_attack.")})
            self.round = int(tensors["round"])
            self.server_s, up, down = (float(v) for v in tensors["totals"])
            self.bytes = [up, down]
            self.curve = [{f: (int(v) if f == "round" else None if math.isnan(v) else float(v))
                           for f, v in zip(CURVE_FIELDS, entry.tolist())} for entry in tensors["curve"]]
        except KeyError as exc:
            raise ArtifactError(f"federated checkpoint lacks {exc.args[0]}") from None

    def _misfit(self, tensors: dict[str, Any]) -> str | None:
        """Why `tensors` is not a state of this federation, or None when it is one: each entry `state` makes
        here is a tensor of the shape it has here, and its round is one a checkpoint is saved after."""
        now = self.state()
        now.pop("curve")  # its length is the number of rounds evaluated so far
        for name, tensor in now.items():
            if name.startswith("client_attack."):
                continue  # what the attack carries changes as the rounds go (Neurotoxin's estimate comes later)
            if name not in tensors:
                return f"it lacks {name}"
            if not isinstance(tensors[name], torch.Tensor) or tensors[name].shape != tensor.shape:
                return f"{name} holds another shape"
        curve = tensors.get("curve")
        if not isinstance(curve, torch.Tensor) or curve.ndim != 2 or curve.shape[1] != len(CURVE_FIELDS):
            return "its curve is not one of this federation"
        if not 0 < int(tensors["round"]) < self.config.rounds:
            return f"round {int(tensors['round'])} of {self.config.rounds}"
        return None

    # ------------------------------------------------------------- one round

    def evaluated_weights(self) -> Tensors:
        """The weights the federation deploys: the global model, fused by consensus under Lockdown."""
        if self.masks is not None and isinstance(self.defense, Lockdown):
            return consensus(self.weights, self.masks, self.defense.theta)
        return self.weights

    def model(self) -> nn.Module:
        """A copy of the template holding the evaluated weights, in eval mode, on the federation's device."""
        model = copy.deepcopy(self.template).to(self.device)
        weights = self.evaluated_weights()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
        return model.eval()

    def _attack_masks(self, chosen: torch.Tensor, masks: Tensors | None) -> Tensors | None:
        """The masks the participants' local steps keep to: Lockdown's (or none), times a client attack's."""
        size = sum(p.numel() for p in self.weights.values())
        flat = None if self.malicious is None else self.malicious.step_masks(chosen, size, self.device)
        if flat is None:
            return masks
        attack = _unflat(flat, self.weights, self.names)
        return attack if masks is None else {n: masks[n] * attack[n] for n in self.names}

    def server_update(self, trainer: ClientTrainer, root: torch.Tensor, local: LocalSGD, r: int) -> torch.Tensor:
        """The server's own flattened update of round `r`: the global model trained on its root set `root` with the
        clients' local SGD, in batches of at most the root set's size (FLTrust)."""
        own = dataclasses.replace(local, batch_size=min(local.batch_size, len(root)))
        plan = ClientPlan.draw(root, own, derive_seed(self.seed, "server_root", r))
        trained = trainer.train(_stack(self.weights, 1), [plan], own, None, bool(self.config.vectorised))
        return _flat({n: trained[n] - self.weights[n] for n in self.names}, self.names)[0]

    def run_round(self, trainer: Clients, shares: list[torch.Tensor], local: LocalSGD,
                  root: torch.Tensor | None = None) -> dict[str, float]:
        """One round, its clients trained by `trainer` (in this process or on Ray workers); `root`: the server's
        root set (rows of the training tensor) where its defense has one."""
        config, r = self.config, self.round + 1
        order = torch.randperm(config.clients, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "participants", r)))
        chosen = torch.sort(order[:config.per_round]).values
        k = len(chosen)
        plans = [ClientPlan.draw(shares[int(c)], local, derive_seed(self.seed, "client", r, int(c))) for c in chosen]
        start = _stack(self.weights, k)
        masks = None
        if self.masks is not None and self.removed is not None:
            masks = {n: m[chosen] for n, m in self.masks.items()}
            start = {n: start[n] * masks[n] for n in self.names}
            down = sum(float(m.sum()) for m in masks.values()) * BYTES_PER_VALUE
            removed = {n: v[chosen] for n, v in self.removed.items()}
            if any(int(v.sum()) for v in removed.values()):
                screens = [ClientPlan.draw(shares[int(c)], local, derive_seed(self.seed, "screen", r, int(c)),
                                           epochs=1, augment=False) for c in chosen]
                masks = regrow(masks, trainer.gradient_sums(start, screens, bool(config.vectorised)), removed)
        else:
            down = float(k * sum(p.numel() for p in self.weights.values()) * BYTES_PER_VALUE)
        trained = trainer.train(start, plans, local, self._attack_masks(chosen, masks), bool(config.vectorised))
        if masks is not None and self.masks is not None and self.removed is not None:
            assert isinstance(self.defense, Lockdown)
            masks, counts = prune(masks, trained, prune_ratio(r, config.rounds, self.defense.alpha0))
            for n in self.names:
                self.masks[n][chosen] = masks[n]
                self.removed[n][chosen] = counts[n]
            updates = _flat({n: masks[n] * (trained[n] - self.weights[n]) for n in self.names}, self.names)
            up = sum(float(m.sum()) for m in masks.values()) * BYTES_PER_VALUE
        else:
            updates = _flat({n: trained[n] - self.weights[n] for n in self.names}, self.names)
            up = float(updates.numel() * BYTES_PER_VALUE)
        if self.malicious is not None:
            updates = self.malicious.craft(updates, chosen, r)
        sizes = torch.tensor([len(shares[int(c)]) for c in chosen], dtype=torch.float64, device=updates.device)
        context = RoundContext(r, config.rounds, config.clients,
                               torch.Generator().manual_seed(derive_seed(self.seed, "server", r)))
        began = time.perf_counter()
        if root is not None:
            context.server_update = self.server_update(trainer.in_process, root, local, r)
        aggregate = self.defense.aggregate(updates, sizes, context)
        seconds = time.perf_counter() - began
        step = _unflat(aggregate.to(updates.dtype), self.weights, self.names)
        self.weights = {n: self.weights[n] + config.server_lr * step[n] for n in self.names}
        if self.malicious is not None:
            self.malicious.attack.observe(config.server_lr * aggregate)
        self.round, self.server_s = r, self.server_s + seconds
        self.bytes = [self.bytes[0] + up, self.bytes[1] + down]
        return {"bytes_up": up, "bytes_down": down, "server_defense_s": seconds}


def run_federation(config: FederatedConfig, server_defense: tuple[str, dict[str, Any]], dataset: Dataset,
                   attack: Attack | None, poison_share: float, target_label: int, template: nn.Module, seed: int,
                   device: torch.device, checkpoint: Checkpoint | None = None,
                   stop_after: int | None = None) -> FederationResult:
    """Run a federation and return its evaluated global model and measurements. `attack` None (or a reference
    attack) is a benign run. With a `checkpoint` (the protocol victims' training uses, without its `every_s`:
    a federation saves its state every `checkpoint_every` rounds of its config, not on a clock), the run
    resumes from the state it holds and saves there; a state the federation refuses (`Federation.load`) is
    rejected (`Checkpoint.reject`) and the federation starts from its first round. `stop_after` ends after
    that round (tests of resuming)."""
    from bdbench.experiment import evaluate  # the runner's own scoring (imported here: experiment imports this module)

    check_template(template, type(template).__name__)
    defense = SERVER_DEFENSES.build(*server_defense)
    defense.check(config.clients, config.per_round)
    root = None
    if defense.root_samples:
        root, pool = hold_out(len(dataset.y_train), defense.root_samples, derive_seed(seed, "federated_root"))
        shares = [pool[rows] for rows in client_shares(dataset.y_train[pool], config, seed)]
    else:
        shares = client_shares(dataset.y_train, config, seed)
    small = [(i, len(s)) for i, s in enumerate(shares) if len(s) < config.batch_size]
    if small:
        raise ConfigError(f"client {small[0][0]} holds {small[0][1]} samples, fewer than federated.batch_size "
                          f"{config.batch_size}; lower batch_size, use fewer clients or raise split.min_samples")
    triggered, client_attack = None, None
    if attack is not None:
        client_attack = build_client_attack(config)
        x, y, poisoned = poison_shares(dataset, shares, config.malicious_ids, attack, poison_share, target_label, seed,
                                       client_attack)
        triggered = attack.triggered_test_set(dataset, target_label)
    else:
        x, y, poisoned = dataset.x_train, dataset.y_train, 0
    local = LocalSGD(config.local_epochs, config.batch_size, config.client_lr, config.client_momentum,
                     config.weight_decay, dataset.crop_padding, dataset.allow_hflip)
    federation = Federation(config, defense, template, seed, device, client_attack)
    state = checkpoint.load() if checkpoint is not None else None
    if checkpoint is not None and state is not None:
        try:
            federation.load(state)
            log.warning("federation resumes after round %d of %d from checkpoint %s", federation.round,
                        config.rounds, checkpoint)
        except ArtifactError as exc:
            log.warning("%s; running the federation from its first round", exc)
            checkpoint.reject()
            federation = Federation(config, defense, template, seed, device, build_client_attack(config)
                                    if client_attack is not None else None)
    resumed = federation.round
    if config.vectorised is None:
        config = config.model_copy(update={"vectorised": device.type == "cuda"})
        federation.config = config
    with client_trainer(ClientTrainer(template, x, y, device, config.client_chunk), config.client_workers) as trainer:
        for _ in steps("federated round", config.rounds, federation.round):
            sent = federation.run_round(trainer, shares, local, root)
            r = federation.round
            if r % config.eval_every == 0 or r == config.rounds:
                measured = evaluate(federation.model(), dataset, triggered)
                federation.curve.append({"round": r, **measured, **sent})
            if checkpoint is not None and r % config.checkpoint_every == 0 and r < config.rounds:
                checkpoint.save(federation.state())
            if stop_after is not None and r >= stop_after:
                break
    model = federation.model()
    rounds = max(1, federation.round)
    return FederationResult(model, federation.curve, federation.bytes[0] / rounds, federation.bytes[1] / rounds,
                            federation.server_s, poisoned, resumed)


__all__ = ["CURVE_FIELDS", "Federation", "FederationResult", "client_shares", "poison_shares", "run_federation"]
