"""Adversarial Input Filtering, AIF (Do, Harikumar, Le, Nguyen, Tran, Rana, Nguyen, Susilo and Venkatesh,
"Towards Effective and Robust Neural Trojan Defenses via Input Filtering", ECCV 2022).

VIF's filter learns only from clean images; AIF also shows it triggers. A trigger generator G plays
the attacker: for each clean image x and a target class t drawn at random, it makes an input-specific
trigger, a mask m(x, t) in [0, 1] and a pattern p(x, t) in [0, 1], stamped as x' = (1 - m) x + m p,
and is trained so that the filtered classifier C(F(x')) answers t. The filter F is trained, step for
step against G, to turn x' back into x and to keep C(F(x')) at x's true label, besides VIF's own loss
on clean images. The defended model is C(F(x)), as for VIF.

Details fixed here, not taken from the paper (our choices, stated so):
- G is a small fully convolutional network (three 3x3 convolutions of `width` channels) reading the
  image and the target as one-hot planes; it outputs the mask (sigmoid, one channel) and the
  pattern (sigmoid, the image's channels), in the style of the input-aware dynamic attack's generator
  (Nguyen and Tran, NeurIPS 2020).
- G's loss: cross-entropy of C(F(x')) against t plus `mask_weight` x max(0, mean(m) - `mask_bound`),
  which keeps a trigger to about a tenth of the image (a trigger that covers the image would leave F
  nothing to recover x from). G trains with Adam at the filter's learning rate, one step per filter step.
- F's loss: VIF's (reconstruction + kl_weight x KL + ce_weight x cross-entropy) on x, plus
  `adversarial_weight` (1) times the same loss on x' with x as the reconstruction target.
- The filter's architecture and training settings are VIF's (`bdbench.defenses.vif`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.base import DEFENSES, DefenseContext
from bdbench.defenses.filtering import Filtered, seeded, train_filter
from bdbench.defenses.vif import VariationalInputFiltering
from bdbench.params import BatchSize, NonNegativeFloat, PositiveFloat, PositiveInt, UpToOne
from bdbench.training import LoopPrecision


class TriggerGenerator(nn.Module):
    """Input- and target-specific triggers: (x in [0, 1], one-hot target) -> (stamped x, mask)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + num_classes, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1 + in_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        planes = F.one_hot(target, self.num_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        out = torch.sigmoid(self.net(torch.cat([x, planes], dim=1)))
        mask, pattern = out[:, :1], out[:, 1:]
        return (1 - mask) * x + mask * pattern, mask


class TriggerAdversary:
    """AIF's opponent (`filtering.Adversary`): one Adam step of G against the filtered classifier per call."""

    def __init__(self, trigger_generator: TriggerGenerator, lr: float, mask_bound: float, mask_weight: float) -> None:
        self.trigger_generator = trigger_generator
        self.optimizer = torch.optim.Adam(trigger_generator.parameters(), lr=lr)
        self.mask_bound, self.mask_weight = mask_bound, mask_weight

    def attack(self, filtered: nn.Module, x: torch.Tensor, generator: torch.Generator,
               precision: LoopPrecision) -> torch.Tensor:
        target = torch.randint(self.trigger_generator.num_classes, (len(x),), generator=generator).to(x.device)
        self.trigger_generator.train()
        with precision.autocast():
            triggered, mask = self.trigger_generator(x, target)
            logits = filtered(triggered.contiguous(memory_format=precision.memory_format))
        loss = (F.cross_entropy(logits.float(), target)
                + self.mask_weight * (mask.float().mean() - self.mask_bound).clamp_min(0))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return triggered.detach().float()


@DEFENSES.register("aif")
class AdversarialInputFiltering(VariationalInputFiltering):
    """AIF (Do et al. 2022): VIF's filter, trained also to undo the triggers of a generator trained against it."""

    def __init__(self, steps: PositiveInt = 2000, batch_size: BatchSize = 64, lr: PositiveFloat = 1e-3,
                 latent_dim: PositiveInt = 64, width: PositiveInt = 32, kl_weight: NonNegativeFloat = 0.1,
                 ce_weight: NonNegativeFloat = 1.0, adversarial_weight: NonNegativeFloat = 1.0,
                 mask_bound: UpToOne = 0.1, mask_weight: NonNegativeFloat = 10.0) -> None:
        super().__init__(steps=steps, batch_size=batch_size, lr=lr, latent_dim=latent_dim, width=width,
                         kl_weight=kl_weight, ce_weight=ce_weight)
        self.adversarial_weight, self.mask_bound, self.mask_weight = adversarial_weight, mask_bound, mask_weight

    def fit_filter(self, context: DefenseContext) -> Filtered:
        with seeded(context, "aif"):
            image_filter = self.new_filter(context)
            trigger_generator = TriggerGenerator(context.in_channels, context.num_classes, self.width).to(context.device)
            adversary = TriggerAdversary(trigger_generator, self.training.lr, self.mask_bound, self.mask_weight)
            return train_filter(context, image_filter, self.training, "aif", adversary, self.adversarial_weight)
