"""What malicious federated clients do beyond training on their poisoned share: the federated attacks.

A grid picks one with `federated.client_attack` (`dba`, `scaling`, `neurotoxin`, or `{name: ..., <params>}`); it
applies to the malicious clients only and composes with the grid's poisoning attack (BadNets, Blended, ...),
which still decides the trigger, the poisoned samples and the test-time ASR. Without a client attack the
malicious clients only train on their poisoned share (plain data poisoning). A benign run (attack `none`)
has no malicious behaviour at all.

A client attack may act at three points of a round, each a method with a no-op default:
  * `local_attack`: the poisoning attack one malicious client applies to its own share (DBA's local trigger);
  * `step_mask`: a 0/1 mask of the flattened weights to which every local SGD step of a malicious client is
    restricted (Neurotoxin);
  * `craft`: the update a malicious client sends instead of the one it trained (model replacement's scaling).
Clients learn the global model at the start of each round, so an attack may use the last global update
(`observe`), and nothing else: no other client's update, no test data.

Every attack registers its class with `@CLIENT_ATTACKS.register("name")`; its constructor's annotations are its
parameter checks (`bdbench.params`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from bdbench.attacks.base import Attack
from bdbench.errors import ConfigError
from bdbench.params import PositiveFloat, PositiveInt, UpToOne
from bdbench.registry import Registry

if TYPE_CHECKING:
    from bdbench.federated.config import FederatedConfig


class ClientAttack:
    """A malicious clients' behaviour. Subclasses set `citation` and override the hooks they use."""

    citation: ClassVar[str] = ""

    def check(self, config: FederatedConfig) -> None:
        """Refuse, before any training, a federation this attack cannot run in (a one-line `ConfigError`)."""

    def local_attack(self, attack: Attack, index: int, shape: tuple[int, int, int]) -> Attack:
        """The poisoning attack the `index`-th malicious client applies to its share of (C, H, W) images."""
        return attack

    def observe(self, global_step: torch.Tensor) -> None:
        """The global model moved by `global_step` (flattened) in the last round; every client sees that."""

    def step_mask(self) -> torch.Tensor | None:
        """A 0/1 mask (flattened weights) that restricts every local step of a malicious client; None: none."""
        return None

    def craft(self, update: torch.Tensor, context: CraftContext) -> torch.Tensor:
        """The flattened update a malicious client sends, given the one it trained."""
        return update

    def state(self) -> dict[str, torch.Tensor]:
        """What the attack carries between rounds (saved in the federation's checkpoints)."""
        return {}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `state` from a checkpoint."""


@dataclass(frozen=True)
class CraftContext:
    """What a malicious client knows when it crafts its update: clients averaged per round, the server's lr, and
    the round (1-based)."""

    per_round: int
    server_lr: float
    round: int = 1


CLIENT_ATTACKS: Registry[type[ClientAttack]] = Registry("federated client attack")


# --------------------------------------------------------------------------------------------------- DBA


def trigger_footprint(attack: Attack, shape: tuple[int, int, int]) -> torch.Tensor:
    """The pixels (H, W) a prepared attack's trigger changes: where it alters an all-black or an all-white image
    in any channel (a patch coloured like one of them still changes the other)."""
    probes = torch.stack([torch.zeros(shape, dtype=torch.uint8), torch.full(shape, 255, dtype=torch.uint8)])
    return (attack.trigger(probes) != probes).any(dim=1).any(dim=0)


def grid_shape(parts: int) -> tuple[int, int]:
    """Rows x columns of the most square grid with `parts` cells (4 -> 2 x 2, 2 -> 1 x 2, 6 -> 2 x 3)."""
    rows = max(d for d in range(1, math.isqrt(parts) + 1) if parts % d == 0)
    return rows, parts // rows


def split_footprint(footprint: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """The footprint cut into `parts` local footprints: its bounding box divided into the `grid_shape(parts)`
    grid (rows and columns split as evenly as they go, the first ones one pixel larger), each cell keeping the
    footprint's pixels inside it. The parts are disjoint and their union is the footprint."""
    rows, cols = torch.nonzero(footprint.any(dim=1)).flatten(), torch.nonzero(footprint.any(dim=0)).flatten()
    if len(rows) == 0:
        raise ConfigError("dba found no pixel that the poisoning attack's trigger changes; pick an attack that "
                          "stamps a visible trigger (badnets, blended, ...)")
    grid_rows, grid_cols = grid_shape(parts)
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if bottom - top < grid_rows or right - left < grid_cols:
        raise ConfigError(f"dba cannot cut a {bottom - top}x{right - left} trigger into {grid_rows}x{grid_cols} "
                          f"parts; lower dba parts or use a larger trigger")
    out = []
    for band in torch.arange(top, bottom).tensor_split(grid_rows):
        for strip in torch.arange(left, right).tensor_split(grid_cols):
            cell = torch.zeros_like(footprint)
            cell[int(band[0]):int(band[-1]) + 1, int(strip[0]):int(strip[-1]) + 1] = True
            out.append(cell & footprint)
    return out


class LocalTrigger(Attack):
    """One DBA attacker's poisoning: the global attack's samples, labels and poisoned images, except that only the
    pixels of its own part of the trigger are changed."""

    def __init__(self, attack: Attack, part: torch.Tensor) -> None:
        super().__init__(attack.label_mode)
        self.attack, self.part = attack, part

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.part.to(x.device), self.attack.add_trigger(x), x)

    def select(self, y: torch.Tensor, poison_rate: float, target_label: int,
               generator: torch.Generator) -> torch.Tensor:
        return self.attack.select(y, poison_rate, target_label, generator)

    def target_labels(self, y: torch.Tensor, target_label: int, num_classes: int) -> torch.Tensor:
        return self.attack.target_labels(y, target_label, num_classes)

    def poison_images(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.where(self.part.to(x.device), self.attack.poison_images(x, idx), x)


@CLIENT_ATTACKS.register("dba")
class DBA(ClientAttack):
    """DBA (Xie et al., ICLR 2020): the global trigger cut into local parts, one per attacker; each attacker poisons
    its share with its own part only, and the test-time ASR uses the whole (global) trigger.

    The paper's image triggers are four 1x4 bars in a 2x2 layout, one bar per attacker (four attackers). Here the
    grid's poisoning attack gives the global trigger: its footprint (the pixels it changes, found on a black and
    a white probe image) is cut into `parts` cells of the most square grid over its bounding box (2x2 for the
    default 4: a 3x3 BadNets patch gives parts of 4, 2, 2 and 1 pixels), and attacker i (the i-th malicious id)
    stamps the trigger on part i mod `parts` only, leaving the other pixels as they were. Choices the paper
    leaves open for other triggers: a full-image trigger (Blended) is cut into image quadrants the same way;
    with more attackers than parts the parts are reused in turn; fewer attackers than parts is refused, since
    some part would never be trained. The paper's other knobs (attack rounds, its scale factor) are not part
    of DBA here: the attackers poison every round they take part in, and scaling is the `scaling` attack."""

    citation = ("Xie, Huang, Chen, Li. DBA: Distributed Backdoor Attacks against Federated Learning. ICLR 2020.")

    def __init__(self, parts: PositiveInt = 4) -> None:
        self.parts = parts

    def check(self, config: FederatedConfig) -> None:
        attackers = len(config.malicious_ids)
        if attackers < self.parts:
            raise ConfigError(f"dba cuts the trigger into {self.parts} parts, one per attacker, but the federation has "
                              f"{attackers} malicious clients; set dba parts to at most {max(1, attackers)}")

    def local_attack(self, attack: Attack, index: int, shape: tuple[int, int, int]) -> Attack:
        if type(attack).poison is not Attack.poison:
            raise ConfigError(f"dba cuts the trigger of attacks that stamp it on chosen samples; "
                              f"{type(attack).__name__} poisons its own way; pick badnets, blended, ...")
        return LocalTrigger(attack, self.parts_of(attack, shape)[index % self.parts])

    def parts_of(self, attack: Attack, shape: tuple[int, int, int]) -> list[torch.Tensor]:
        """The local footprints (H, W) of a prepared attack's trigger on (C, H, W) images."""
        return split_footprint(trigger_footprint(attack, shape), self.parts)


# --------------------------------------------------------------------------------------------------- scaling


@CLIENT_ATTACKS.register("scaling")
class Scaling(ClientAttack):
    """Model replacement (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, AISTATS 2020, section 3.2): the attacker
    sends X~ = gamma (X - G) + G for its trained model X and the global model G, i.e. its update times gamma, so
    that averaging with the other updates leaves (about) X. `gamma` None takes the paper's estimate n / eta: n
    the clients averaged per round and eta the server learning rate. The paper has one attacker; with m
    attackers in a round each scaled by n / eta, their backdoored models count m times over (set `gamma` to
    n / (eta m) to share the replacement). `rounds`: the rounds in which the attackers scale (the paper's attacker
    replaces the model in one round, once the global model is close to convergence); in the others they send
    their trained update as it is; None: every round. The paper's constrain-and-scale variant (an
    anomaly-evasion loss term) is not implemented."""

    citation = ("Bagdasaryan, Veit, Hua, Estrin, Shmatikov. How To Backdoor Federated Learning. AISTATS 2020.")

    def __init__(self, gamma: PositiveFloat | None = None, rounds: list[PositiveInt] | None = None) -> None:
        self.gamma, self.rounds = gamma, rounds

    def check(self, config: FederatedConfig) -> None:
        late = [r for r in self.rounds or [] if r > config.rounds]
        if late:
            raise ConfigError(f"scaling round {late[0]} is after the federation's last round {config.rounds}; "
                              f"give rounds in 1..{config.rounds}")

    def factor(self, context: CraftContext) -> float:
        if self.rounds is not None and context.round not in self.rounds:
            return 1.0
        return self.gamma if self.gamma is not None else context.per_round / context.server_lr

    def craft(self, update: torch.Tensor, context: CraftContext) -> torch.Tensor:
        return update * self.factor(context)


# --------------------------------------------------------------------------------------------------- Neurotoxin


def bottom_mask(estimate: torch.Tensor, top_ratio: float) -> torch.Tensor:
    """1 everywhere except on the floor(top_ratio x D) coordinates of largest magnitude in `estimate` (D,)."""
    mask = torch.ones_like(estimate)
    count = math.floor(top_ratio * estimate.numel())
    if count > 0:
        mask[torch.topk(estimate.abs(), count, sorted=False).indices] = 0
    return mask


@CLIENT_ATTACKS.register("neurotoxin")
class Neurotoxin(ClientAttack):
    """Neurotoxin (Zhang, Panda, Song, Yang, Mahoney, Mittal, Ramchandran, Gonzalez, ICML 2022): every local SGD
    step of an attacker is projected onto the coordinates that benign clients rarely change, so that later
    benign rounds do not overwrite the backdoor.

    The benign gradient estimate is the paper's (Algorithm 1): the last global update, which every client
    learns by comparing the global models of two rounds. The coordinates of its `top_ratio` largest magnitudes
    (all layers together) are masked out; the default 0.05 is the authors' CV setting (`--gradmask_ratio
    0.95`, the bottom 95% kept). Choices: the whole step is masked, weight decay included, so the update is
    exactly zero on the masked coordinates; in the first round, with no global update seen yet, the attacker
    trains unmasked; the paper's optional norm projection (PGD) is left to the server's norm clipping."""

    citation = ("Zhang, Panda, Song, Yang, Mahoney, Mittal, Ramchandran, Gonzalez. Neurotoxin: Durable Backdoors in "
                "Federated Learning. ICML 2022.")

    def __init__(self, top_ratio: UpToOne = 0.05) -> None:
        self.top_ratio = top_ratio
        self.last_step: torch.Tensor | None = None

    def observe(self, global_step: torch.Tensor) -> None:
        self.last_step = global_step.detach().clone()

    def step_mask(self) -> torch.Tensor | None:
        return None if self.last_step is None else bottom_mask(self.last_step, self.top_ratio)

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.last_step is None else {"neurotoxin.last_step": self.last_step}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.last_step = tensors.get("neurotoxin.last_step")


def build_client_attack(config: FederatedConfig) -> ClientAttack | None:
    """The federation's client attack, built and checked; None where it has none."""
    spec = config.client_attack_spec
    if spec is None:
        return None
    built = CLIENT_ATTACKS.build(*spec)
    built.check(config)
    return built



class MaliciousClients:
    """The federation's side of a client attack: which clients run it, and its hooks applied to a round's
    participants (`chosen`, sorted client ids)."""

    def __init__(self, attack: ClientAttack, ids: list[int], context: CraftContext) -> None:
        self.attack, self.ids, self.context = attack, set(ids), context

    def _rows(self, chosen: torch.Tensor) -> list[int]:
        return [k for k, c in enumerate(chosen.tolist()) if c in self.ids]

    def step_masks(self, chosen: torch.Tensor, size: int, device: torch.device) -> torch.Tensor | None:
        """Per participant, the flattened 0/1 mask of its local steps (K, D): the attack's for malicious ones,
        ones for the others; None where the attack restricts nothing this round."""
        mask = self.attack.step_mask()
        rows = self._rows(chosen)
        if mask is None or not rows:
            return None
        out = torch.ones(len(chosen), size, device=device)
        out[rows] = mask.to(device)
        return out

    def craft(self, updates: torch.Tensor, chosen: torch.Tensor, round_: int) -> torch.Tensor:
        """Round `round_`'s updates (K, D) with each malicious participant's replaced by the one it crafts."""
        rows = self._rows(chosen)
        if not rows:
            return updates
        updates, context = updates.clone(), dataclasses.replace(self.context, round=round_)
        for k in rows:
            updates[k] = self.attack.craft(updates[k], context)
        return updates


def client_attack_variant(config: FederatedConfig) -> str | None:
    """The client attack's short name with its non-default parameters (`scaling(gamma=10)`); None without one."""
    spec = config.client_attack_spec
    return None if spec is None else CLIENT_ATTACKS.variant(*spec)


__all__ = ["CLIENT_ATTACKS", "DBA", "ClientAttack", "CraftContext", "LocalTrigger", "MaliciousClients", "Neurotoxin",
           "Scaling", "bottom_mask", "build_client_attack", "client_attack_variant", "grid_shape", "split_footprint", "trigger_footprint"]
