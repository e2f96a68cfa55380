"""Label-consistent backdoor (Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks",
arXiv 1912.02771, 2019).

Clean-label: only target-class training images are poisoned and keep their labels. Each is first
made hard to classify by an untargeted L-infinity PGD perturbation against a clean surrogate
(the attacker's own model, trained on the same training data), so the network cannot fit it from
its natural features and leans on the trigger instead; then the trigger is applied. The trigger
is the paper's 3x3 black-and-white pattern, in all four corners (the paper's choice that survives
flips and crops), applied as x + amplitude * (2 p - 1) inside each patch: amplitude 255 stamps the
pattern, a smaller one is the paper's reduced-visibility trigger. Test images get the trigger
only. Defaults: eps = 16/255, the paper's stronger budget; 100 PGD steps of 2.5 eps / steps.
The paper's alternative (GAN interpolation) is not implemented.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bdbench.attacks.base import ATTACKS, CleanLabelAttack, LabelMode
from bdbench.attacks.workshop import AttackWorkshop, surrogate_options
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.params import BelowOne, PositiveInt

_PATTERN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def pgd_untargeted(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                   batch_size: int = 256) -> torch.Tensor:
    """L-infinity PGD that maximises the cross-entropy of the true labels, from the clean image
    (no random start, so the result is deterministic). Float images in [0, 1] in and out."""
    device = next(model.parameters()).device
    step = 2.5 * eps / steps
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        adv = xb.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), yb)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step * grad.sign()
            adv = (xb + (adv - xb).clamp(-eps, eps)).clamp(0, 1)
        out.append(adv.detach().cpu())
    return torch.cat(out)


@ATTACKS.register("lc")
class LabelConsistent(CleanLabelAttack):
    """Clean-label: PGD-perturbed target-class images from a clean surrogate plus a corner trigger (Turner et al. 2019)."""

    seeded_trigger = False  # the seed shapes only the training images' PGD perturbation
    citation = "Turner, Tsipras, Madry. Label-Consistent Backdoor Attacks. arXiv:1912.02771, 2019."

    def __init__(self, eps: BelowOne = 16 / 255, steps: PositiveInt = 100,
                 amplitude: Annotated[float, Field(gt=0, le=255)] = 255.0,
                 corners: Literal["four", "one"] = "four", surrogate: dict[str, Any] | None = None,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.eps, self.steps, self.amplitude, self.corners = eps, steps, amplitude, corners
        self.surrogate = dict(surrogate or {})
        self.mask: torch.Tensor | None = None  # (H, W) 1 inside the trigger patches
        self.sign: torch.Tensor | None = None  # (H, W) +1 white / -1 black pattern pixels
        self.x_adv: dict[int, torch.Tensor] = {}  # training index -> perturbed uint8 image

    def check(self, dataset: Dataset, target_label: int) -> None:
        if dataset.image_size < 3:
            raise ConfigError(f"lc needs images of at least 3x3 pixels, not {dataset.image_size}x{dataset.image_size}")

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        self.check(dataset, target_label)
        size = dataset.image_size
        self.mask, self.sign = torch.zeros(size, size), torch.zeros(size, size)
        origins = [(size - 3, size - 3)]
        if self.corners == "four":
            # The paper mirrors the pattern into each corner, so a flipped image still carries it.
            origins += [(0, 0), (0, size - 3), (size - 3, 0)]
        for row, col in origins:
            self.mask[row:row + 3, col:col + 3] = 1
            self.sign[row:row + 3, col:col + 3] = 2 * _PATTERN - 1
        members = torch.nonzero(dataset.y_train == target_label).flatten()

        def build() -> dict[str, torch.Tensor]:
            model = workshop.surrogate(dataset, **surrogate_options(self.surrogate))
            for p in model.parameters():
                p.requires_grad_(False)
            x = dataset.x_train[members].float().div(255.0)
            adv = pgd_untargeted(model, x, dataset.y_train[members], self.eps, self.steps)
            return {"x_adv": adv.mul(255.0).round().to(torch.uint8)}

        params = {"eps": self.eps, "steps": self.steps, "target_label": target_label, "surrogate": self.surrogate}
        adv = workshop.learned("lc_pgd", params, build)["x_adv"]
        self.x_adv = dict(zip(members.tolist(), adv))

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.sign is None:
            raise RuntimeError("LabelConsistent.prepare() must run before add_trigger()")
        return (x + self.mask.to(x) * self.sign.to(x) * (self.amplitude / 255.0)).clamp(0, 1)

    def poison_images(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        adv = torch.stack([self.x_adv[int(i)] for i in idx]) if len(idx) else x
        return self.trigger(adv)
