"""Neural Polarizer Defense (Zhu, Wei, Zha and Wu, "Neural Polarizer: A Lightweight and Effective
Backdoor Defense via Purifying Poisoned Features", NeurIPS 2023).

NPD leaves the backdoored model as it is and inserts one learnable linear layer, the neural
polarizer, into it: a 1 x 1 convolution followed by BatchNorm, initialised to the identity, so the
polarized model starts out computing exactly what the deployed one does. Only the polarizer is
trained, on the clean budget, with a bi-level objective:

- inner (per batch): the estimated target label of each image, y_t = the class other than its true
  label y with the highest logit under the polarized model, and a targeted adversarial example
  x' = x + delta that drives the polarized model towards y_t (PGD minimising CE(f(x'), y_t)), a
  stand-in for a trigger that flips x to the attacker's class;
- outer: CE(f(x), y) (keep clean accuracy)
  + 0.4 [CE(f(x'), y) - log(1 - max_{k != y} p_k(x'))] (the boosted cross-entropy: classify the
  adversarial example correctly and push down its strongest wrong class; the code puts the polarized
  model's prediction on x in place of y in the first term, which is y wherever x is classified right)
  + 0.4 [-log(1 - p_{y_t}(x'))] (push down the estimated target class on it).

log(1 - p_k) is computed as logsumexp of the other logits minus logsumexp of all, which is exact and
stays finite when p_k is 1. The layer goes where the paper puts it, before the last stage of the
network: at the output of the second-to-last stage found by `layers.stage_outputs` (for the paper's
PreAct-ResNet18 on CIFAR-10, between layer3 and layer4; its code applies it a block later, to the
input of layer4.1.conv1), so no per-architecture code is needed; on the (N, T, D) tokens of a vision
transformer it acts on the D channels of each token. The layer replaces its host module in the
parent by a `PolarizedOutput` wrapper, a real submodule, so the repaired model deep-copies, saves
and traces (BatchNorm folding, FX quantization) like any other.

Defaults are the paper's and its BackdoorBench code's: loss weights 1 / 0.4 / 0.4, 50 epochs of
SGD (momentum 0.9, weight decay 5e-4) at lr 0.01 on a cosine schedule, batch size 128, no data
augmentation, the whole model in eval mode throughout (BatchNorm keeps its statistics, the
polarizer's too, so it trains as the linear layer the paper describes). The adversarial example:
the code's default is an L2 ball (radius 3, two steps); bdbench has one PGD routine, on an
L-infinity ball, so NPD uses the code's L-infinity setting: eps 0.2, 10 steps of 2.2 eps (each step
lands on a corner of the ball). Left out: the code's early stop of PGD once 60% of the batch reaches
its target, its start at x + eps (here PGD starts at x), and its 5 warm-up epochs of plain
cross-entropy at lr 1e-4 (a step of the code, not of the paper's objective). Nothing is tuned on data and nothing
needed scaling down for the CPU (one small layer trains, though every PGD step runs the whole network:
4 to 7 minutes on one shared CPU thread for the model-defenses grid's PreAct-ResNet18 of width 0.25).

Cost (issue 26): 258.0 CPU s on the `model-defenses` BadNets victim of seed 0, 1.04x the 247.8 CPU s that
trained it (`benchmarks/defense_cost.py`, one AVX2 thread). The paper's procedure demands it: every step
builds a targeted adversarial example of each image by 10 PGD steps, each a forward and an input-gradient
pass through the whole network (the frozen layers before the polarizer too), then runs the two forward passes
and the backward of the loss, about eight times the work of a training step per image; the 50 epochs see
6,400 images (one full batch of 128 an epoch from the 200-image budget), an eighth of the 48,000 the victim
trained on. The authors' code stops PGD once 60% of a batch reaches its target; that changes the examples, not only the
cost, and is left out with its other code-only steps (above).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.adversarial import linf_pgd, log_one_minus_softmax
from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.ft import fine_tune
from bdbench.defenses.layers import capture_outputs, stage_outputs
from bdbench.params import BatchSize, NonNegativeFloat, PositiveFloat, PositiveInt, UpToOne
from bdbench.training import LossFn


class Polarizer(nn.Module):
    """A 1 x 1 convolution and BatchNorm over the channels of an (N, C, H, W) map, or of the D channels
    of (N, T, D) tokens when `tokens`; the identity at initialisation (up to BatchNorm's epsilon)."""

    def __init__(self, channels: int, tokens: bool = False) -> None:
        super().__init__()
        self.tokens = tokens  # a plain attribute, fixed at construction, so FX traces one branch
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return self.norm(self.conv(x.transpose(1, 2).unsqueeze(-1))).squeeze(-1).transpose(1, 2)
        return self.norm(self.conv(x))


class PolarizedOutput(nn.Module):
    """`inner` followed by a `Polarizer` on its output."""

    def __init__(self, inner: nn.Module, polarizer: Polarizer) -> None:
        super().__init__()
        self.inner = inner
        self.polarizer = polarizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.polarizer(self.inner(x))


def insert_polarizer(model: nn.Module, sample: torch.Tensor) -> Polarizer:
    """Insert an identity-initialised `Polarizer` into `model` (in place) before its last stage, found by
    tracing the float images `sample`; a network with a single stage gets it at that stage's end."""
    names = stage_outputs(model, sample, count=2)
    name = names[0]
    with torch.no_grad(), capture_outputs(model, [name]) as seen:
        model.eval()(sample)
    output = seen[0][-1]
    tokens = output.ndim == 3
    polarizer = Polarizer(output.shape[-1] if tokens else output.shape[1], tokens).to(sample.device)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, PolarizedOutput(getattr(parent, child), polarizer))
    return polarizer


def strongest_other_class(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the class with the highest logit other than `labels`: NPD's estimated target label."""
    return logits.scatter(1, labels.view(-1, 1), float("-inf")).argmax(1)


@DEFENSES.register("npd")
class NeuralPolarizer(Defense):
    """NPD (Zhu et al. 2023): train one inserted linear layer to filter trigger features out, the model frozen."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Zhu, Wei, Zha, Wu. Neural Polarizer: A Lightweight and Effective Backdoor Defense via Purifying "
                "Poisoned Features. NeurIPS 2023.")

    def __init__(self, epochs: PositiveInt = 50, lr: PositiveFloat = 0.01, batch_size: BatchSize = 128,
                 weight_decay: NonNegativeFloat = 5e-4, eps: UpToOne = 0.2, steps: PositiveInt = 10,
                 step_fraction: PositiveFloat = 2.2, clean_weight: NonNegativeFloat = 1.0,
                 bce_weight: NonNegativeFloat = 0.4, asr_weight: NonNegativeFloat = 0.4) -> None:
        self.epochs, self.lr, self.batch_size, self.weight_decay = epochs, lr, batch_size, weight_decay
        self.eps, self.steps, self.step_fraction = eps, steps, step_fraction
        self.clean_weight, self.bce_weight, self.asr_weight = clean_weight, bce_weight, asr_weight

    def loss(self) -> LossFn:
        """The outer objective on one batch, with its targeted adversarial examples built inside; the model
        is put in eval mode first, so the frozen network's BatchNorm statistics never move."""

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            model.eval()
            with torch.no_grad():
                target = strongest_other_class(model(x), y)
            adversarial = linf_pgd(lambda z: -F.cross_entropy(model(z), target), x, eps=self.eps,
                                   step_size=self.step_fraction * self.eps, steps=self.steps)
            clean_logits, adv_logits = model(x).float(), model(adversarial).float()
            boosted = (F.cross_entropy(adv_logits, y)
                       - log_one_minus_softmax(adv_logits, strongest_other_class(adv_logits, y)).mean())
            suppressed = -log_one_minus_softmax(adv_logits, target).mean()
            return (self.clean_weight * F.cross_entropy(clean_logits, y) + self.bce_weight * boosted
                    + self.asr_weight * suppressed)

        return loss_fn

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model).to(context.device).eval()
        polarizer = insert_polarizer(model, context.clean_x[:2].to(context.device).float().div(255.0))
        model.requires_grad_(False)
        polarizer.requires_grad_(True)
        model = fine_tune(context, model, context.clean_x, context.clean_y, epochs=self.epochs, lr=self.lr,
                          batch_size=self.batch_size, purpose="npd", loss_fn=self.loss(), momentum=0.9,
                          weight_decay=self.weight_decay, crop_padding=0, hflip=False)
        return DefenseOutcome(model=model.requires_grad_(True).eval())
