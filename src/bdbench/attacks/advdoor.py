"""AdvDoor (Zhang, Ding, Tian, Guo, Yuan and Jiang, "AdvDoor: Adversarial Backdoor Attack of Deep
Learning System", ISSTA 2021).

The trigger is a targeted universal adversarial perturbation (TUAP) of a clean model: one
perturbation delta, ||delta||_inf <= eps, that pushes images of every class towards the target.
Because the trigger already points along the target's own features, the backdoor it implants is
hard to tell apart from natural adversarial vulnerability. Poisoned samples are x + delta with
the target label (dirty-label, all-to-one by construction: the perturbation is learned for one
target).

The paper builds the TUAP with the iterative DeepFool-style universal-perturbation algorithm; we
optimise the same objective (every non-target training image classified as the target, within
the eps ball) by projected sign-gradient descent on the cross-entropy to the target over
mini-batches, which reaches a higher targeted fooling rate per second on CPU. The clean model is
a surrogate the attacker trains on the training data. eps defaults to 16/255.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bdbench.attacks.base import ATTACKS, Attack, LabelMode
from bdbench.attacks.workshop import AttackWorkshop, surrogate_options
from bdbench.data import Dataset
from bdbench.params import OpenRate, PositiveInt


def targeted_universal_perturbation(model: torch.nn.Module, x: torch.Tensor, target: int, eps: float,
                                    epochs: int, generator: torch.Generator, batch_size: int = 128,
                                    step: float | None = None) -> torch.Tensor:
    """One perturbation (C, H, W) within the eps ball that makes `model` predict `target` on as many
    of the uint8 images `x` as it can: projected sign-gradient descent over shuffled mini-batches."""
    device = next(model.parameters()).device
    step = step if step is not None else eps / 10
    delta = torch.zeros(x.shape[1:], device=device)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            xb = x[order[start:start + batch_size]].to(device).float().div(255.0)
            delta.requires_grad_(True)
            logits = model((xb + delta).clamp(0, 1))
            loss = F.cross_entropy(logits, torch.full((len(xb),), target, device=device))
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() - step * grad.sign()).clamp(-eps, eps)
    return delta.detach().cpu()


@ATTACKS.register("advdoor")
class AdvDoor(Attack):
    """Targeted universal adversarial perturbation of a clean surrogate as the trigger (Zhang et al. 2021)."""

    citation = ("Zhang, Ding, Tian, Guo, Yuan, Jiang. AdvDoor: Adversarial Backdoor Attack of Deep Learning "
                "System. ISSTA 2021.")
    label_modes = ("all2one",)
    single_target_reason = "the universal perturbation is learned towards one target class"

    def __init__(self, eps: OpenRate = 16 / 255, epochs: PositiveInt = 5, surrogate: dict[str, Any] | None = None,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.eps, self.epochs = eps, epochs
        self.surrogate = dict(surrogate or {})
        self.delta: torch.Tensor | None = None

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        def build() -> dict[str, torch.Tensor]:
            model = workshop.surrogate(dataset, **surrogate_options(self.surrogate))
            for p in model.parameters():
                p.requires_grad_(False)
            others = dataset.x_train[dataset.y_train != target_label]
            return {"delta": targeted_universal_perturbation(model, others, target_label, self.eps, self.epochs,
                                                             workshop.generator("advdoor"))}

        params = {"eps": self.eps, "epochs": self.epochs, "target_label": target_label, "surrogate": self.surrogate}
        self.delta = workshop.learned("advdoor_tuap", params, build)["delta"]

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            raise RuntimeError("AdvDoor.prepare() must run before add_trigger()")
        return (x + self.delta.to(x)).clamp(0, 1)
