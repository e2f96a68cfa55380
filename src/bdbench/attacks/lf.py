"""LF: a smooth, low-frequency trigger (Zeng, Park, Mao and Jia, "Rethinking the Backdoor Attacks'
Triggers: A Frequency Perspective", ICCV 2021).

The paper shows that common triggers carry high-frequency artifacts that a simple detector finds,
and builds smooth triggers instead: a universal adversarial perturbation towards the target
class, computed on a clean model the attacker trains, and passed through a low-pass filter at
every step so that no high-frequency content survives. The poisoned image is x + v, clipped.

Here the clean model is `workshop.surrogate` (a clean `surrogate` network trained on the
experiment's own training set, cached), and the perturbation is found by signed-gradient steps
on the targeted cross-entropy over the non-target training images, projected after every step
onto the L-infinity ball of radius `eps` and then onto the low-frequency band (an ideal filter
in the 2-D Fourier domain keeping spatial frequencies up to `cutoff` of the Nyquist frequency
on each axis). The final perturbation is band-limited exactly; its L-infinity norm may exceed
`eps` slightly after the last filtering. Both perturbation and surrogate are cached by
`workshop.learned`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdbench.attacks.base import ATTACKS, Attack, LabelMode
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.params import PositiveFloat, PositiveInt, UpToOne
from bdbench.training import TrainConfig


def low_pass(v: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Keep the spatial frequencies of (…, H, W) images up to `cutoff` x Nyquist on both axes."""
    h, w = v.shape[-2:]
    keep_rows = torch.fft.fftfreq(h).abs() <= 0.5 * cutoff + 1e-9
    keep_cols = torch.fft.fftfreq(w).abs() <= 0.5 * cutoff + 1e-9
    window = (keep_rows.view(-1, 1) & keep_cols.view(1, -1)).to(v.device)
    return torch.fft.ifft2(torch.fft.fft2(v) * window).real


@ATTACKS.register("lf")
class LowFrequency(Attack):
    """Low-pass-filtered universal adversarial perturbation of a clean surrogate (Zeng et al., ICCV 2021)."""

    citation = ("Zeng, Park, Mao, Jia. Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective. "
                "ICCV 2021.")

    def __init__(self, eps: UpToOne = 0.1, cutoff: UpToOne = 0.25, epochs: PositiveInt = 5, step: PositiveFloat = 0.01,
                 surrogate: str = "cnn-small", surrogate_epochs: PositiveInt = 10,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.eps, self.cutoff, self.epochs, self.step = eps, cutoff, epochs, step
        self.surrogate, self.surrogate_epochs = surrogate, surrogate_epochs
        self.perturbation: torch.Tensor | None = None  # (C, H, W)

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        training = TrainConfig(epochs=self.surrogate_epochs)
        params = {"eps": self.eps, "cutoff": self.cutoff, "epochs": self.epochs, "step": self.step,
                  "surrogate": self.surrogate, "training": training.model_dump(), "target": target_label,
                  "label_mode": self.label_mode}

        def build() -> dict[str, torch.Tensor]:
            model = workshop.surrogate(dataset, model=self.surrogate, training=training)
            return {"perturbation": self._universal_perturbation(model, dataset, target_label, workshop)}

        self.perturbation = workshop.learned("lf", params, build)["perturbation"]

    def _universal_perturbation(self, model: torch.nn.Module, dataset: Dataset, target_label: int,
                                workshop: AttackWorkshop) -> torch.Tensor:
        device = workshop.device
        x_all, y_all = dataset.x_train, dataset.y_train
        if self.label_mode == "all2one":
            x_all, y_all = x_all[y_all != target_label], y_all[y_all != target_label]
        generator = workshop.generator("lf_batches")
        v = torch.zeros(x_all.shape[1:], device=device, requires_grad=True)
        for p in model.parameters():
            p.requires_grad_(False)
        for _ in range(self.epochs):
            order = torch.randperm(len(x_all), generator=generator)
            for start in range(0, len(order), 128):
                idx = order[start:start + 128]
                x = x_all[idx].to(device).float().div(255.0)
                wanted = self.target_labels(y_all[idx], target_label, dataset.num_classes).to(device)
                loss = F.cross_entropy(model((x + v).clamp(0, 1)), wanted)
                (grad,) = torch.autograd.grad(loss, v)
                with torch.no_grad():
                    v -= self.step * grad.sign()
                    v.copy_(low_pass(v.clamp(-self.eps, self.eps), self.cutoff))
        return v.detach().cpu()

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.perturbation is None:
            raise RuntimeError("LowFrequency.prepare() must run before add_trigger()")
        return (x + self.perturbation.to(x)).clamp(0, 1)
