"""Adversarial Weight Masking (Chai and Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight
Masking", NeurIPS 2022).

AWM solves min_m alpha L(f(x; m * theta), y) + (1 - alpha) max_{|Delta|_1 <= tau} L(f(x + Delta; m * theta), y)
+ gamma |m|_1 on the clean budget (the paper's beta is 1 - alpha in the authors' code): a soft mask m in
[0, 1], initialised to one, one entry per weight of every convolution (`layers: conv`, as in the authors'
`MaskedConv2d`, which every convolution of their networks is and no linear layer; `layers: all` adds every
linear layer's weights; biases are never masked), multiplies the deployed weights, and Delta is one universal
perturbation added to every image, a stand-in for the unknown trigger. Each of `rounds` rounds (the paper's
epochs E) has two passes over `inner` epochs of batches drawn with replacement (`max(1, n // batch_size) x
inner` batches each, the authors' sampler, with at least one batch for a budget smaller than a batch, where
the authors' code would take none):

1. The inner maximisation (`recover_trigger`): Delta starts at zero and takes one plain gradient-ascent step
   (lr 10) per batch on CE(f(x + Delta; m * theta), f's own prediction on x), unclipped as in the paper and
   the authors' code, then, after the pass, is scaled onto the L1 ball of radius tau.
2. The outer minimisation: Adam (lr 0.01, constant) steps the masks on the loss above with that Delta, the
   perturbed image clipped to [0, 1], and the true labels; masks are clipped to [0, 1] after each step.

The weights are masked through `torch.func.functional_call` while the masks are learnt, so no module
is replaced; the model stays in eval mode throughout (BatchNorm keeps its running statistics, as in
the authors' code). The repaired model is a copy of the deployed one with each (continuous, unthresholded)
mask multiplied into its weights.

Defaults are the authors' code's (github.com/jinghuichen/AWM, `main.py` at a4a5f16): 20 rounds of 5 inner
epochs, batch 128, alpha 0.9, gamma 1e-8, perturbation step 10, mask Adam at 0.01 and no augmentation. The
mask learning rate is constant: the paper's Algorithm 1 has no schedule, and the authors' code, which stepped
an ExponentialLR(0.9) every round in its first upload (e6a80d0), made that step opt-in (`--lr-decay`, off by
default) the next day; `lr_decay: 0.9` restores it (as the 16-defense study's `awn` also decays by 0.9). The
paper's trigger bound tau = 1000 is an L1 norm over CIFAR's 3 x 32 x 32 = 3072 input values; on other image
sizes the same bound per input value is used (`trigger_norm`, default 1000 / 3072, times the number of input
values: 255 on 28 x 28 MNIST), since an absolute 1000 would leave a 784-value perturbation unbounded (the
authors' README takes tau = 100 for its one-shot runs; not a default here). Left out: the authors' optional
"shrink" warm-up (0 steps by default), and the nine random-resized-crop and flip copies of each image their
code adds when the budget is exactly one image per class (the budgets here are larger). The 16-defense study
(Dunnett et al., `defense/awn.py`) runs a different variant: masks on BatchNorm neurons rather than weights,
SGD, one pass of batch 256 per round; it is not followed. Nothing is tuned on data, and nothing is scaled down
for the CPU: a PreAct-ResNet18 (width 0.25) with the 200-image budget of `model-defenses` takes about
2 minutes on one CPU core (seconds on a small model).
"""

from __future__ import annotations

import copy
import functools
import operator
from typing import Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.params import NonNegativeFloat, PositiveFloat, PositiveInt, UnitInterval, UpToOne

CIFAR_INPUT_VALUES = 3 * 32 * 32  # the paper's tau = 1000 is an L1 norm over this many values


class WeightMasks:
    """A soft mask per weight of the chosen layers of `model`, applied through `functional_call`."""

    def __init__(self, model: nn.Module, layers: Literal["conv", "all"]) -> None:
        kinds = (nn.Conv2d,) if layers == "conv" else (nn.Conv2d, nn.Linear)
        self.model = model
        self.weights = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, kinds)}
        if not self.weights:
            raise ValueError(f"{type(model).__name__} has no {'/'.join(k.__name__ for k in kinds)} layer; "
                             "awm cannot run on this model")
        self.masks = {name: torch.ones_like(weight, requires_grad=True) for name, weight in self.weights.items()}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {name: self.weights[name] * mask for name, mask in self.masks.items()},
                               (x,))

    def l1(self) -> torch.Tensor:
        return functools.reduce(operator.add, (mask.abs().sum() for mask in self.masks.values()))

    def bake(self, model: nn.Module) -> nn.Module:
        """A copy of `model` (the deployed one) with every mask multiplied into its weights."""
        masked = copy.deepcopy(model)
        parameters = dict(masked.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                parameters[name].mul_(mask.to(parameters[name].device))
        return masked


def recover_trigger(masks: WeightMasks, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], image: torch.Tensor,
                    lr: float) -> torch.Tensor:
    """The inner maximisation of one round (Chai and Chen 2022, Algorithm 1, lines 3-8): a universal
    perturbation shaped like `image` starts at zero and takes one plain gradient-ascent step of `lr` per batch
    on the cross-entropy of the masked model on x + Delta against its own prediction on x (the authors' code;
    the paper's Algorithm 1 writes the true label). x + Delta is not clipped to [0, 1] here, in the paper and
    the authors' code alike: a clip would stop the gradient of every value it pushes past 0 or 1. The result
    is not projected (the caller scales it onto the L1 ball once, as the authors do)."""
    delta = torch.zeros((1, *image.shape), device=image.device, requires_grad=True)
    for x, _ in batches:
        with torch.no_grad():
            own = masks(x).argmax(1)
        grad, = torch.autograd.grad(F.cross_entropy(masks(x + delta), own), delta)
        with torch.no_grad():
            delta += lr * grad
    return delta.detach()


def l1_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """`delta` scaled down onto the L1 ball of `radius` when it lies outside (the authors' projection)."""
    return delta * min(1.0, radius / max(float(delta.abs().sum()), 1e-12))


@DEFENSES.register("awm")
class AdversarialWeightMasking(Defense):
    """AWM (Chai and Chen 2022): learn soft weight masks against an adversarially recovered universal trigger."""

    kind = DefenseKind.MODEL_REPAIR
    citation = "Chai, Chen. One-shot Neural Backdoor Erasing via Adversarial Weight Masking. NeurIPS 2022."

    def __init__(self, rounds: PositiveInt = 20, inner: PositiveInt = 5, batch_size: PositiveInt = 128,
                 mask_lr: PositiveFloat = 0.01, lr_decay: UpToOne = 1.0, perturbation_lr: PositiveFloat = 10.0,
                 alpha: UnitInterval = 0.9, gamma: NonNegativeFloat = 1e-8,
                 trigger_norm: PositiveFloat = 1000.0 / CIFAR_INPUT_VALUES,
                 layers: Literal["conv", "all"] = "conv") -> None:
        self.rounds, self.inner, self.batch_size = rounds, inner, batch_size
        self.mask_lr, self.lr_decay, self.perturbation_lr = mask_lr, lr_decay, perturbation_lr
        self.alpha, self.gamma = alpha, gamma
        self.trigger_norm, self.layers = trigger_norm, layers

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model).to(context.device).eval().requires_grad_(False)
        masks = WeightMasks(model, self.layers)
        optimizer = torch.optim.Adam(masks.masks.values(), lr=self.mask_lr)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.lr_decay)
        generator = context.generator("awm_batches")
        x_all, y_all = context.clean_x.to(context.device), context.clean_y.to(context.device)
        batch_size = min(self.batch_size, len(y_all))
        steps = max(1, len(y_all) // batch_size) * self.inner
        radius = self.trigger_norm * x_all[0].numel()

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for _ in range(steps):
                pick = torch.randint(len(y_all), (batch_size,), generator=generator).to(context.device)
                yield x_all[pick].float().div_(255.0), y_all[pick]

        for _ in range(self.rounds):
            trigger = l1_ball(recover_trigger(masks, batches(), x_all[0], self.perturbation_lr), radius)
            for x, y in batches():
                loss = (self.alpha * F.cross_entropy(masks(x), y)
                        + (1 - self.alpha) * F.cross_entropy(masks((x + trigger).clamp(0.0, 1.0)), y)
                        + self.gamma * masks.l1())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for mask in masks.masks.values():
                        mask.clamp_(0.0, 1.0)
            schedule.step()
        return DefenseOutcome(model=masks.bake(context.model).to(context.device).eval())
