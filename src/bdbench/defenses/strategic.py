"""Strategic retraining (Dhonthi, Hahn and Hashemi, "Backdoor Mitigation in Deep Neural Networks via
Strategic Retraining", FM 2023, arXiv 2212.07278), with the ABS analysis it builds on (Liu, Lee, Tao,
Ma, Aafer and Zhang, "ABS: Scanning Neural Networks for Back-doors by Artificial Brain Stimulation",
CCS 2019).

The paper removes backdoors, planted or learnt by accident, without knowing the trigger's shape: an
ABS-style analysis names the compromised ("trojan") neurons and the trigger masks they imply, the model
is retrained on clean images stamped with those masks under their true labels, restricted to the
`top_p` classes the masks affect most, and the two steps repeat until the analysis finds no trojan
neuron left. Each round here:

1. Stimulation analysis (ABS): `seed_images` images of the clean budget (spread over the classes) are
   run to one inner layer; each neuron of that layer (a channel of a feature map, every position at
   once) is set in turn to `stimulation_steps` values spread evenly up to `stimulation_max` times the
   layer's largest activation on those images, the others kept as the image made them, and the rest
   of the network runs on. A stimulation elevates label l on an image by the margin of l's logit over
   the runner-up where l comes out on top. A neuron's elevation of l is the smallest, over the seed
   images of other classes, of the largest margin any value reaches: a trojan neuron lifts one label
   whatever the image. The `candidates` neurons with the largest positive elevations go on.
2. Trigger masks (ABS's reverse engineering): per candidate, a mask m (1 x H x W) and a pattern p
   (C x H x W), both squashed into [0, 1] as Neural Cleanse's, stamped as (1 - m) x + m p, are
   optimised with Adam (lr `mask_lr`) for `mask_steps` batches of the clean budget to raise that
   neuron's mean activation, keep the layer's other neurons down (`other_weight`), and keep the
   mask's mean under `max_mask_size` of the image (a hinge penalty, `size_weight`); activations are
   measured in units of the layer's largest activation. All candidates go through one batched pass.
   A candidate is a trojan neuron when its stamped budget images of other classes go to its label at
   a rate (ABS's REASR) of at least `reasr_threshold`.
3. Strategic retraining: for each trojan neuron, the classes whose budget images its mask moves off
   their true label most often, the `top_p` most affected (only classes it moves at all); their
   budget images, stamped with the mask and kept under their true labels, join the whole clean
   budget, and the model is fine-tuned on that set with the `ft` recipe (SGD, cosine schedule, the
   victim's augmentation).

The rounds stop when a round finds no trojan neuron (the paper's stopping rule) or after `iterations`
rounds; the model of the last round is returned (the deployed model's copy if the first round finds
nothing).

Choices the paper leaves open, or that could not be checked against it (its body could not be read for
this implementation beyond its abstract and summary, so its own settings are not known here), written
down:
- The layer: the end of the network's second-to-last stage (`layers.stage_outputs`): layer3 of a
  PreAct-ResNet18, the second stage's last ReLU of cnn-small, the second-to-last block of a vision
  transformer (whose neurons are the token features, each set on every token). Deep enough to carry a
  trigger feature, with a nonlinear stage still after it: at the final feature map every channel
  reaches the linear head directly, so a large enough value lifts some label on every image and the
  analysis separates nothing.
- Stimulation values: 8 steps up to 3x the layer's largest activation on the seed images; 20 seed images.
- `candidates` 5, `mask_steps` 200 batches of 32 at Adam lr 0.1, `max_mask_size` 0.06 of the image
  (ABS's bound on a trigger), `other_weight` 0.5, `size_weight` 50, `reasr_threshold` 0.8. The one
  setting changed after a measurement: `mask_steps` was 100, at which one of four mask seeds missed the
  trigger of the tiny digits BadNets model of the tests (REASR 0 on the clean budget where the others
  reached 1); at 200 all four found it.
- `top_p`: a number of classes, 3. "Most affected" is read as the classes whose stamped images leave
  their true label most often.
- Retraining: 5 epochs of fine-tuning per round on the budget plus the stamped images, SGD lr 0.01,
  batch 32 (the `ft` recipe), at most 5 rounds.
Everything runs on the defender's clean budget; no test data, poison labels or attack knowledge.

Measured on `model-defenses` (PreAct-ResNet18 width 0.25, mnist5k, seed 0, 200 budget images, one thread on
a loaded core): on the BadNets victim round 0 found 5 trojan neurons, all lifting the target label with
REASR 1.0, round 1 none; CA 0.981 -> 0.970, ASR 1.000 -> 0.003 (fine-tuning alone: ASR 1.000), in 0.92x
the victim's training time. On the clean victim round 0 found none and the model came back unchanged
(CA 0.989), in 0.50x. On the Blended victim (alpha 0.2 over the whole image) round 0 found none either: a
mask of at most 6% of the image cannot carry a whole-image blend, so ABS's premise of a patch-like trigger
does not hold and ASR stays 1.000 (CA 0.980; 0.29x). In kind this is what the paper reports on GTSRB with small and medium CNNs (as its
abstract and summary state; its tables could not be read here): the trojan neurons fall to zero within a few
rounds and benign accuracy is kept. Its claim of doing better than Neural Cleanse was not measured here.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.ft import fine_tune
from bdbench.defenses.layers import stage_outputs
from bdbench.defenses.nc import ReversedTriggers, squash, unsquash
from bdbench.params import (
    BatchSize,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitInterval,
    UpToOne,
)
from bdbench.training import images_per_pass, predict

log = logging.getLogger(__name__)


@dataclass
class Elevations:
    """What stimulating each neuron of a layer does: the label it lifts most (`labels`, one per neuron) and by
    how much on the seed image where it lifts it least (`elevations`; -inf where no label tops every image)."""

    labels: torch.Tensor
    elevations: torch.Tensor

    def candidates(self, count: int) -> torch.Tensor:
        """The neurons with the `count` largest positive elevations, largest first."""
        order = torch.argsort(self.elevations, descending=True)[:count]
        return order[self.elevations[order] > 0]


def inspected_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The layer stimulated: the end of the second-to-last stage (the last one where there is only one)."""
    sample = x[:2].to(next(model.parameters()).device).float().div(255.0)
    return model.get_submodule(stage_outputs(model, sample, 2)[0])


class _Reached(Exception):
    """Raised by `run_to` once the layer has produced its output: nothing after it needs computing."""


def run_to(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of `layer` on float images `x`, with its autograd history, without running the rest of the
    network."""
    seen: list[torch.Tensor] = []

    def stop(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        seen.append(output)
        raise _Reached

    handle = layer.register_forward_hook(stop)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def neurons_first(activation: torch.Tensor) -> torch.Tensor:
    """A layer's output with its neurons on dimension 1: channels of (N, C, H, W) maps and features of (N, D)
    vectors are there already; the features of (N, T, D) tokens (a vision transformer's blocks) are moved there
    (swapping the same two dimensions back restores the layer's order)."""
    return activation.transpose(1, 2) if activation.ndim == 3 else activation


@torch.no_grad()
def stimulate(model: nn.Module, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
              values: torch.Tensor) -> Elevations:
    """ABS's stimulation analysis of every neuron of `layer` (a channel of a feature map at every position, a
    feature of a vector or of every token) on the uint8 seed images `x` with labels `y`, at the stimulation
    `values`."""
    device = next(model.parameters()).device
    model.eval()
    images = x.to(device).float().div(255.0)
    base = neurons_first(run_to(model, layer, images).detach().clone())
    neurons, seeds, steps = base.shape[1], len(images), len(values)
    # Every (neuron, value, image) in order, through the model in passes of at most `images_per_pass`.
    cases = torch.cartesian_prod(torch.arange(neurons), torch.arange(steps), torch.arange(seeds))
    logits = torch.empty(len(cases), num_classes, device=device)
    chunk = max(1, images_per_pass(device))
    replacement: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, _output: replacement[0])
    try:
        for start in range(0, len(cases), chunk):
            neuron, step, image = (column.to(device) for column in cases[start:start + chunk].unbind(1))
            stimulated = base[image].clone()
            stimulated[torch.arange(len(image), device=device), neuron] = values.to(device)[step].view(
                -1, *([1] * (base.ndim - 2))).expand(len(image), *base.shape[2:])
            replacement[:] = [neurons_first(stimulated)]  # back in the layer's own order
            logits[start:start + chunk] = model(images[image]).float()
    finally:
        handle.remove()
    logits = logits.view(neurons, steps, seeds, num_classes)
    top = logits.topk(2, dim=-1)
    margin, label = top.values[..., 0] - top.values[..., 1], top.indices[..., 0]
    lifted = torch.where(nn.functional.one_hot(label, num_classes).bool(), margin[..., None],
                         torch.tensor(-torch.inf, device=device)).amax(1)  # (neurons, seeds, classes)
    own = nn.functional.one_hot(y.to(device), num_classes).bool()[None].expand_as(lifted)
    per_label = lifted.masked_fill(own, torch.inf).amin(1)  # images of the label itself do not count
    elevations, labels = per_label.masked_fill(torch.isinf(per_label) & (per_label > 0), -torch.inf).max(1)
    return Elevations(labels.cpu(), elevations.cpu())


def reverse_engineer_masks(model: nn.Module, layer: nn.Module, neurons: torch.Tensor, x: torch.Tensor, peak: float,
                           generator: torch.Generator, *, steps: int, batch_size: int, lr: float, max_size: float,
                           other_weight: float, size_weight: float) -> ReversedTriggers:
    """ABS's trigger reverse engineering for each of `neurons` of `layer` at once, on the uint8 clean images `x`:
    masks and patterns that excite that neuron and not the layer's others, their masks' mean under `max_size`."""
    device = next(model.parameters()).device
    model.eval()
    count, (_, channels, height, width) = len(neurons), x.shape
    mask_raw = unsquash(torch.rand(count, 1, height, width, generator=generator) * 2 * max_size).to(device)
    pattern_raw = unsquash(torch.rand(count, channels, height, width, generator=generator)).to(device)
    mask_raw.requires_grad_()
    pattern_raw.requires_grad_()
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=lr)
    picked = neurons.to(device)
    for _ in range(steps):
        xb = x[torch.randint(len(x), (batch_size,), generator=generator)].to(device).float().div(255.0)
        mask, pattern = squash(mask_raw), squash(pattern_raw)
        stamped = (1 - mask[:, None]) * xb[None] + (mask * pattern)[:, None]  # (count, batch, C, H, W)
        activation = run_to(model, layer, stamped.flatten(0, 1)).float()
        activation = neurons_first(activation)
        activation = activation.flatten(2).mean(2) if activation.ndim > 2 else activation
        activation = activation.view(count, batch_size, -1) / peak  # (count, batch, neurons of the layer)
        target = activation.gather(2, picked.view(-1, 1, 1).expand(-1, batch_size, 1)).squeeze(2)
        others = (activation.sum(2) - target) / max(1, activation.shape[2] - 1)
        size = mask.flatten(1).mean(1)
        loss = (-target.mean(1) + other_weight * others.mean(1) + size_weight * (size - max_size).clamp_min(0)).sum()
        mask_raw.grad, pattern_raw.grad = torch.autograd.grad(loss, [mask_raw, pattern_raw])  # not the model's
        optimizer.step()
    with torch.no_grad():
        mask, pattern = squash(mask_raw).cpu(), squash(pattern_raw).cpu()
    return ReversedTriggers(mask, pattern, mask.flatten(1).sum(1).double())


@dataclass
class TrojanNeurons:
    """One round's findings: the trojan neurons, the label each lifts, their trigger masks (one per neuron),
    their REASRs, and the classes each mask affects most (a list of class tensors)."""

    neurons: torch.Tensor
    labels: torch.Tensor
    triggers: ReversedTriggers
    reasr: torch.Tensor
    affected: list[torch.Tensor]

    def retraining_samples(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The budget images of each trojan neuron's most affected classes, stamped with its mask, under their
        true labels."""
        stamped, labels = [], []
        for index, classes in enumerate(self.affected):
            chosen = torch.isin(y, classes)
            stamped.append(self.triggers.stamp(x[chosen], torch.full((int(chosen.sum()),), index)))
            labels.append(y[chosen])
        if not stamped:
            return x[:0], y[:0]
        return torch.cat(stamped), torch.cat(labels)


def affected_classes(model: nn.Module, stamped: torch.Tensor, y: torch.Tensor, num_classes: int, top_p: int,
                     device: torch.device) -> torch.Tensor:
    """The `top_p` classes whose `stamped` images most often leave their true label `y`, among those that
    leave it at all, most affected first."""
    moved = (predict(model, stamped, device=device) != y).double()
    rate = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, moved)
    rate /= torch.bincount(y, minlength=num_classes).clamp_min(1)
    order = torch.argsort(rate, descending=True)[:top_p]
    return order[rate[order] > 0]


@DEFENSES.register("strategic")
class StrategicRetraining(Defense):
    """Strategic retraining (Dhonthi et al. 2023): ABS finds trojan neurons and their masks; retrain on masked
    clean images of the most affected classes under their true labels; repeat until none is found."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Dhonthi, Hahn, Hashemi. Backdoor Mitigation in Deep Neural Networks via Strategic Retraining. "
                "FM 2023 (arXiv 2212.07278); with ABS, Liu et al., CCS 2019.")

    def __init__(self, iterations: PositiveInt = 5, top_p: PositiveInt = 3, seed_images: BatchSize = 20,
                 stimulation_steps: PositiveInt = 8, stimulation_max: PositiveFloat = 3.0,
                 candidates: PositiveInt = 5, mask_steps: NonNegativeInt = 200, mask_batch_size: PositiveInt = 32,
                 mask_lr: PositiveFloat = 0.1, max_mask_size: UpToOne = 0.06, other_weight: NonNegativeFloat = 0.5,
                 size_weight: NonNegativeFloat = 50.0, reasr_threshold: UnitInterval = 0.8,
                 epochs: PositiveInt = 5, lr: PositiveFloat = 0.01, batch_size: PositiveInt = 32) -> None:
        self.iterations, self.top_p, self.seed_images = iterations, top_p, seed_images
        self.stimulation_steps, self.stimulation_max, self.candidates = stimulation_steps, stimulation_max, candidates
        self.mask_steps, self.mask_batch_size, self.mask_lr = mask_steps, mask_batch_size, mask_lr
        self.max_mask_size, self.other_weight, self.size_weight = max_mask_size, other_weight, size_weight
        self.reasr_threshold = reasr_threshold
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model).to(context.device)
        seeds = self.seed_indices(context.clean_y, context.generator("strategic_seeds"))
        for round_ in range(self.iterations):
            found = self.find_trojans(context, model, seeds, context.generator(f"strategic_masks_{round_}"))
            log.info("strategic: round %d, %d trojan neurons (labels %s, REASR %s)", round_, len(found.neurons),
                     found.labels.tolist(), [round(r, 3) for r in found.reasr.tolist()])
            if not len(found.neurons):
                break
            stamped, labels = found.retraining_samples(context.clean_x, context.clean_y)
            model = fine_tune(context, model, torch.cat([context.clean_x, stamped]),
                              torch.cat([context.clean_y, labels]), epochs=self.epochs, lr=self.lr,
                              batch_size=self.batch_size, purpose=f"strategic_retrain_{round_}")
        return DefenseOutcome(model=model.eval())

    def seed_indices(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`seed_images` budget indices, spread over the classes in turn (a random image of each class, then a
        second of each, ...)."""
        order = torch.randperm(len(y), generator=generator)
        rank = torch.empty(len(y), dtype=torch.long)  # the image's place among its class's shuffled images
        for label in y.unique():
            members = order[y[order] == label]
            rank[members] = torch.arange(len(members))
        return order[torch.argsort(rank[order], stable=True)][:self.seed_images]

    def find_trojans(self, context: DefenseContext, model: nn.Module, seeds: torch.Tensor,
                     generator: torch.Generator) -> TrojanNeurons:
        """One round of the analysis on `model`: stimulation, masks for the candidates, REASR, affected classes."""
        x, y = context.clean_x, context.clean_y
        layer = inspected_layer(model, x)
        model.eval()
        with torch.no_grad():  # the unit of the stimulation values and of the mask objective
            peak = float(run_to(model, layer, x[seeds].to(context.device).float().div(255.0)).max().clamp_min(1e-6))
        values = torch.linspace(0, self.stimulation_max * peak, self.stimulation_steps + 1)[1:]
        elevations = stimulate(model, layer, x[seeds], y[seeds], context.num_classes, values)
        neurons = elevations.candidates(self.candidates)
        labels = elevations.labels[neurons]
        if not len(neurons):
            empty = torch.zeros(0, dtype=torch.float64)
            return TrojanNeurons(neurons, labels, ReversedTriggers(x[:0].float(), x[:0].float(), empty), empty, [])
        triggers = reverse_engineer_masks(model, layer, neurons, x, peak, generator, steps=self.mask_steps,
                                          batch_size=self.mask_batch_size, lr=self.mask_lr,
                                          max_size=self.max_mask_size, other_weight=self.other_weight,
                                          size_weight=self.size_weight)
        reasr, affected = torch.zeros(len(neurons), dtype=torch.float64), []
        for index, label in enumerate(labels.tolist()):
            stamped = triggers.stamp(x, torch.full((len(x),), index))
            others = y != label
            predicted = predict(model, stamped[others], device=context.device)
            reasr[index] = float((predicted == label).double().mean()) if others.any() else 0.0
            affected.append(affected_classes(model, stamped, y, context.num_classes, self.top_p, context.device))
        trojan = reasr >= self.reasr_threshold
        kept = torch.nonzero(trojan).flatten()
        return TrojanNeurons(neurons[kept], labels[kept],
                             ReversedTriggers(triggers.masks[kept], triggers.patterns[kept], triggers.norms[kept]),
                             reasr[kept], [affected[i] for i in kept.tolist()])
