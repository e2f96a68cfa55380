"""Reconstructive Neuron Pruning, RNP (Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive Neuron Pruning
for Backdoor Defense", ICML 2023).

Unlearn, then recover, then prune. Defaults are those of the authors' released code (bboylyg/RNP), which
BackdoorBench also uses.

1. Unlearning (all weights): gradient ascent on the cross-entropy of the clean budget (SGD, lr 0.01,
   momentum 0.9, weight decay 5e-4, batch size 128, the victim's augmentation, training mode), epoch by
   epoch, at most `unlearning_epochs` (20) with the lr divided by 10 after epoch 10, stopping after the
   first epoch whose accuracy on its own training batches is at most `clean_threshold` (0.2). The clean
   neurons forget; the backdoor neurons, which clean data barely uses, stay.
2. Recovering (one mask per neuron): every neuron of a normalisation layer (`layers.norm_layers`, through
   anp's `NeuronPerturbation`, which multiplies its scale by the mask) gets a mask in [0, 1], starting at
   1, and only the masks learn to bring the unlearned model's clean-budget loss back down: SGD, lr 0.2,
   momentum 0.9, no weight decay, loss alpha x cross-entropy with alpha = 0.2, `recovering_epochs` (20)
   over the clean budget in training mode, each mask clipped to [0, 1] after every step. Clean neurons
   recover (mask near 1); backdoor neurons, which nothing pulls back, go to 0.
3. Pruning: the masks are carried over to a copy of the DEPLOYED model (not the unlearned one), where a
   pruned neuron's scale is set to zero. The authors prune every neuron whose mask is at most a threshold
   and sweep that threshold (0 to 0.9) against test data; here the threshold is 0.2 (the value at which
   their published BadNets log removes the backdoor, and anp's default), and how many of the neurons below
   it go is chosen on the clean budget alone by anp's rule (`anp.prune_by_mask`): lowest mask first, in
   `selection_steps` (20) equal steps, keeping the largest pruning before the first step that brings the
   clean budget's accuracy more than `max_accuracy_drop` (0.05) below the deployed model's. `fraction`
   instead prunes that share of all neurons, lowest masks first, with no check.

Both learning stages go through the one trainer (`DefenseContext.fit`): unlearning with a negated loss
and one call per epoch, so that the stopping rule can read each epoch's accuracy; recovering with a
wrapper whose only parameters are the masks. Deviations this brings: the unlearning SGD restarts its
momentum each epoch, and both stages use Nesterov momentum (the authors: plain momentum). The trainer
drops an epoch's ragged last batch, so the batch size is evened out to give as many batches per epoch as
the authors' loader, which keeps it: ceil(n / 128), 200 images in two batches of 100 (at 128, one batch,
half the steps). The authors clip the unlearning gradient's norm at 20 before computing it, which has no
effect, so there is no clipping here.

Scale: at the studies' scale (a PreAct-ResNet18 of width 0.25 on 28x28 digits, 200 clean images: the `model-defenses` grid) and on
the tests' 16-channel network, unlearning does not go through the backdoor (the unlearned model predicts
other classes, or recovery cannot pull it back from the target), the lowest masks fall on neurons that
clean accuracy needs, and the clean-budget check then prunes next to nothing; see the tests.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.anp import NeuronPerturbation, prune_by_mask
from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.params import BatchSize, NonNegativeFloat, OpenRate, PositiveFloat, PositiveInt, UnitInterval, UpToOne
from bdbench.training import TrainConfig

log = logging.getLogger(__name__)

_LR_DROP_EPOCH = 10  # the authors' step schedule: the unlearning lr falls tenfold after this many epochs


class _MaskedNetwork(nn.Module):
    """The network of `neurons` with its masks as the only trainable parameters, so that the one
    trainer can learn them (the network's own weights are frozen)."""

    def __init__(self, neurons: NeuronPerturbation) -> None:
        super().__init__()
        self.network = neurons.model.requires_grad_(False)
        self.masks = nn.ParameterList(neurons.masks)
        self.neurons = neurons

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neurons(x, perturbed=False)


@DEFENSES.register("rnp")
class ReconstructiveNeuronPruning(Defense):
    """RNP (Li et al. 2023): unlearn on clean data, learn neuron masks that recover it, prune the unrecovered."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Li, Lyu, Ma, Koren, Lyu, Li, Jiang. Reconstructive Neuron Pruning for Backdoor Defense. "
                "ICML 2023.")

    def __init__(self, unlearning_lr: PositiveFloat = 0.01, unlearning_epochs: PositiveInt = 20,
                 clean_threshold: UnitInterval = 0.2, recovering_lr: PositiveFloat = 0.2,
                 recovering_epochs: PositiveInt = 20, alpha: PositiveFloat = 0.2, batch_size: BatchSize = 128,
                 weight_decay: NonNegativeFloat = 5e-4, threshold: UpToOne = 0.2,
                 max_accuracy_drop: UnitInterval = 0.05,
                 selection_steps: PositiveInt = 20, fraction: OpenRate | None = None) -> None:
        self.fraction = None if fraction is None else float(fraction)
        self.batch_size, self.threshold = batch_size, threshold
        self.max_accuracy_drop, self.selection_steps = max_accuracy_drop, selection_steps
        self.unlearning_lr, self.unlearning_epochs = unlearning_lr, unlearning_epochs
        self.clean_threshold = clean_threshold
        self.recovering_lr, self.recovering_epochs, self.alpha = recovering_lr, recovering_epochs, alpha
        self.weight_decay = weight_decay

    def stage_config(self, context: DefenseContext, **settings: object) -> TrainConfig:
        """The trainer's settings for one stage: SGD with momentum 0.9 at a constant lr, and `batch_size`
        evened out so that the clean budget splits into as many batches as a loader that keeps its last
        ragged batch would give (the trainer drops it): 200 images at 128 make two batches of 100."""
        size = len(context.clean_y)
        batch_size = max(2, math.ceil(size / math.ceil(size / self.batch_size)))
        return context.train_config.model_copy(update={"batch_size": batch_size, "momentum": 0.9,
                                                       "schedule": "constant", **settings})

    def unlearn(self, context: DefenseContext, model: nn.Module) -> nn.Module:
        """Gradient ascent on the clean budget, in place, until an epoch's accuracy is at most `clean_threshold`."""
        accuracy = 1.0
        for epoch in range(self.unlearning_epochs):
            hits: list[torch.Tensor] = []

            def ascent(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                logits = net(x)
                hits.append((logits.detach().argmax(1) == y).float())  # noqa: B023 - called within this epoch only
                return -F.cross_entropy(logits, y)

            lr = self.unlearning_lr * (0.1 if epoch >= _LR_DROP_EPOCH else 1.0)
            config = self.stage_config(context, epochs=1, lr=lr, weight_decay=self.weight_decay)
            context.fit(model, context.clean_x, context.clean_y, config, f"rnp_unlearn_{epoch}", loss_fn=ascent)
            accuracy = float(torch.cat(hits).mean())
            if accuracy <= self.clean_threshold:
                break
        log.info("rnp: unlearned for %d epochs, training accuracy %.3f", epoch + 1, accuracy)
        return model

    def recover(self, context: DefenseContext, neurons: NeuronPerturbation) -> NeuronPerturbation:
        """Learn `neurons`' masks, and nothing else, to minimise alpha x cross-entropy on the clean budget,
        each mask projected onto [0, 1] after every step."""
        neurons.masks = [nn.Parameter(mask) for mask in neurons.masks]

        def recovery(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # the projection after the previous step
                for mask in neurons.masks:
                    mask.clamp_(0.0, 1.0)
            return self.alpha * F.cross_entropy(net(x), y)

        config = self.stage_config(context, epochs=self.recovering_epochs, lr=self.recovering_lr, weight_decay=0.0)
        context.fit(_MaskedNetwork(neurons), context.clean_x, context.clean_y, config, "rnp_recover", loss_fn=recovery)
        neurons.masks = [mask.detach().clamp(0.0, 1.0) for mask in neurons.masks]
        return neurons

    def run(self, context: DefenseContext) -> DefenseOutcome:
        # `neurons.original` keeps the deployed weights (pruning starts from them); `neurons.model` is unlearned.
        neurons = NeuronPerturbation(copy.deepcopy(context.model).to(context.device).eval())
        self.unlearn(context, neurons.model)
        self.recover(context, neurons)
        return DefenseOutcome(model=prune_by_mask(context, neurons, self.threshold, self.max_accuracy_drop,
                                                  self.selection_steps, self.fraction))
