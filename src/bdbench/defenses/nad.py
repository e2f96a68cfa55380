"""Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021).

1. Teacher: fine-tune a copy of the deployed model on the clean budget (paper: 5% of the training
   data, 10 epochs). 2. Student: train the deployed model on the same data with cross-entropy plus
   beta times an attention-distillation loss at several intermediate layers, so that its attention
   follows the teacher's, which no longer lights up on the trigger (paper: 20 epochs).

The attention map of an (N, C, H, W) activation is the channel mean of |a|^p (p = 2), flattened
and L2-normalised per image (of an (N, T, D) token activation, the mean over D: one value per
token); the loss per layer is the mean squared difference of the student's and the teacher's
normalised maps, the form under which the paper's beta was set (its text writes the L2 distance).
The layers are the ends of the network's last three stages (`layers.stage_outputs`: the three
residual groups of the paper's WideResNet, layer2..4 of a pre-activation ResNet), with one beta per
layer, shallow to deep: [0, 0, 5000], the authors' released configuration (only the deepest group,
at the paper's CIFAR-10 value). BackdoorBench uses [500, 1000, 1000]. A network with fewer stages
than `layers` uses the deepest betas for the ones it has.

Optimisation: SGD with momentum 0.9 and weight decay 1e-4 at batch size 64, as in the paper. The
paper's step schedule (0.1 for two epochs, then 0.01) is replaced by a cosine schedule from 0.01,
BackdoorBench's setting for NAD, since the one trainer offers one-cycle, cosine or constant schedules
and 0.1 wrecks a model fine-tuned on a few hundred images. Both stages go through the one trainer,
the student with a `loss_fn` that runs the frozen teacher on the same augmented batch. As in the
authors' code the student trains in training mode and the teacher runs in eval mode.

Beta and the map's size: the paper's beta was set on its WideResNet's last group, an 8 x 8 map
(`reference_positions` 64). An L2-normalised map of P positions has entries of order 1/sqrt(P), so
the mean squared difference of two of them is of order 1/P: the same disagreement costs 4x as much
on a 4 x 4 map (the end of a pre-activation ResNet on 28 x 28 digits or 32 x 32 images) as on the
paper's. Each layer's beta is therefore multiplied by P / `reference_positions`, which keeps the
paper's weight of the attention term at any map size (4 x 4: 5000 -> 1250, near BackdoorBench's 1000
for PreAct-ResNet18's 4 x 4 layer4); `reference_positions: null` uses the betas as given. Without it,
at beta 5000 on 4 x 4 maps the distillation diverged (a clean PreAct-ResNet18 width 0.25 on mnist5k
fell from 0.985 to 0.12 clean accuracy), and on model-defenses' BadNets victim (seed 0) the back-off
below halved beta twice, to the same 1250, at three students' cost: the same CA 0.971 / ASR 0.500
either way, in 0.43x the CPU time with the scaling (60.5 -> 25.8 CPU s, one thread, loaded machine).

Back-off, checked on the clean budget: when the student's accuracy on the clean budget falls more
than `max_accuracy_drop` (0.1) below the deployed model's, NAD halves every beta and distils again
from the deployed model with the same teacher, at most `backoffs` (4) times, and logs the scale it
kept; when none stays within the budget the repair is declined and the deployed model kept
(`repair_declined`). The defender sees such a collapse on their own clean budget; test data is never used.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import capture_outputs, output_shapes, stage_outputs
from bdbench.errors import ConfigError
from bdbench.params import BatchSize, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, UnitInterval
from bdbench.training import LossFn


def attention_map(activation: torch.Tensor, power: float) -> torch.Tensor:
    """(N, positions) attention of an (N, C, H, W) map or (N, T, D) tokens: mean |a|^p over the
    channels, L2-normalised per image."""
    energy = activation.float().abs().pow(power)
    energy = energy.mean(1) if activation.ndim == 4 else energy.mean(-1)
    return F.normalize(energy.flatten(1), dim=1)


def map_positions(model: nn.Module, layers: list[str], x: torch.Tensor) -> list[int]:
    """Positions of the attention map of each of `layers` for the images `x`: H x W of an (N, C, H, W) output,
    T of (N, T, D) tokens, as `attention_map` flattens them (one traced pass, `layers.output_shapes`)."""
    return [shape[2] * shape[3] if len(shape) == 4 else shape[1] for shape in output_shapes(model, x, layers)]


def distillation_loss(teacher: nn.Module, layers: list[str], betas: list[float], power: float) -> LossFn:
    """Cross-entropy plus, for each of `layers`, its beta x the attention-distillation loss against the
    frozen `teacher`."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with capture_outputs(model, layers) as student_seen:
            logits = model(x)
        with torch.no_grad(), capture_outputs(teacher, layers) as teacher_seen:
            teacher(x)
        loss = F.cross_entropy(logits, y)
        for beta, student_maps, teacher_maps in zip(betas, student_seen, teacher_seen):
            loss = loss + beta * F.mse_loss(attention_map(student_maps[-1], power),
                                            attention_map(teacher_maps[-1], power))
        return loss

    return loss_fn


@DEFENSES.register("nad")
class NeuralAttentionDistillation(Defense):
    """NAD (Li et al. 2021): distil a fine-tuned teacher's attention maps into the backdoored model."""

    kind = DefenseKind.MODEL_REPAIR
    revision = 2  # 2: when no beta keeps the budget, the deployed model is kept (the repair declined)
    citation = ("Li, Lyu, Koren, Lyu, Li, Ma. Neural Attention Distillation: Erasing Backdoor Triggers "
                "from Deep Neural Networks. ICLR 2021.")

    def __init__(self, teacher_epochs: PositiveInt = 10, epochs: PositiveInt = 20, lr: PositiveFloat = 0.01,
                 batch_size: BatchSize = 64, weight_decay: float = 1e-4,
                 beta: NonNegativeFloat | Sequence[NonNegativeFloat] = (0.0, 0.0, 5000.0),
                 power: PositiveFloat = 2.0, layers: PositiveInt = 3, reference_positions: PositiveInt | None = 64,
                 max_accuracy_drop: UnitInterval = 0.1, backoffs: NonNegativeInt = 4) -> None:
        betas = [float(beta)] * layers if isinstance(beta, (int, float)) else [float(b) for b in beta]
        if len(betas) != layers:  # the one check that relates two parameters
            raise ConfigError(f"defense 'nad' parameter 'beta' is {beta!r}: give one value, or one per layer "
                              f"({layers})")
        self.max_accuracy_drop, self.backoffs = max_accuracy_drop, backoffs
        self.teacher_epochs, self.epochs, self.lr, self.batch_size = teacher_epochs, epochs, lr, batch_size
        self.weight_decay, self.betas, self.power, self.layers = weight_decay, betas, power, layers
        self.reference_positions = reference_positions

    def run(self, context: DefenseContext) -> DefenseOutcome:
        settings = {"lr": self.lr, "schedule": "cosine", "batch_size": self.batch_size,
                    "weight_decay": self.weight_decay, "momentum": 0.9}
        teacher_config = context.train_config.model_copy(update={"epochs": self.teacher_epochs, **settings})
        student_config = context.train_config.model_copy(update={"epochs": self.epochs, **settings})
        teacher = context.fit(copy.deepcopy(context.model), context.clean_x, context.clean_y, teacher_config,
                              "nad_teacher")
        teacher.requires_grad_(False).eval()
        sample = context.clean_x[:2].to(context.device).float().div_(255.0)
        layers = stage_outputs(context.model, sample, self.layers)
        betas = self.betas[len(self.betas) - len(layers):]  # a shallow network may have fewer stages: keep the deepest
        if self.reference_positions is not None:
            betas = [beta * positions / self.reference_positions
                     for beta, positions in zip(betas, map_positions(context.model, layers, sample))]

        def distil(scale: float) -> nn.Module:
            return context.fit(copy.deepcopy(context.model).to(context.device), context.clean_x, context.clean_y,
                               student_config, "nad_student",
                               loss_fn=distillation_loss(teacher, layers, [b * scale for b in betas], self.power))

        student = context.halve_until_within_budget("nad", distil, self.max_accuracy_drop, self.backoffs)
        return DefenseOutcome(model=student.model, repair_declined=student.declined)
