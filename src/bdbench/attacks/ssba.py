"""SSBA: sample-specific invisible triggers from a steganographic encoder (Li, Li, Wu, Li, He and
Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021).

The paper trains a StegaStamp encoder/decoder pair (Tancik et al., CVPR 2020): the encoder hides a
bit string in an image as a small residual, the decoder reads it back. The attacker encodes one
fixed string (the paper: the target label's name) into every poisoned image, so each image gets its
own, invisible residual; the poisoned images take the target label.

bdbench trains the pair itself, on the experiment's own training images, and caches it with
`workshop.learned`: the encoder maps (image, secret) to a residual bounded by `max_residual` (a
scaled tanh), the decoder reads the secret from the encoded image after mild Gaussian noise; the
loss is the bits' cross-entropy plus `residual_weight` times the residual's mean square, with
random secrets in every batch (Adam, `steps` batches of 64). As StegaStamp first learns to hide
the bits and only then to hide them quietly, the residual's weight ramps up from zero (StegaStamp's
image-loss ramp) while the bound starts six times larger and shrinks to `max_residual`, both over
the first 70% of the steps. The decoder reads the encoded image as it will be stored, rounded to
8 bits (the rounding passed straight through to the gradient), so the residual survives storage.
Without the ramp and the rounding, on mnist5k's near-binary digits the residual shrank below half
a grey level before the decoder could read anything: bits at chance, stored images identical to
the clean ones, ASR 0.023. The attack's secret is a
seeded random string of `bits` bits; the decoder's accuracy on it is kept as `bit_accuracy`.

Size reduction from the paper: the encoder is a four-layer convolutional network of width `width`
(32) with the secret entering as one extra input plane, the decoder two strided convolutions and
a linear read-out, `bits` = 32 instead of 100, and 3,000 Adam steps on CPU instead of StegaStamp's
140,000; the paper's U-Net encoder, spatial-transformer decoder, LPIPS and critic losses and its
JPEG/blur/colour perturbation layers are left out (the trigger is never printed, so robustness to
them is not needed). Encoded images are stored as uint8, as StegaStamp's PNG output would be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.attacks.base import ATTACKS, Attack, LabelMode
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.params import NonNegativeFloat, PositiveFloat, PositiveInt, UpToOne
from bdbench.seeding import derive_seed


class StegaEncoder(nn.Module):
    """(image, secret bits) -> residual: the secret becomes one image-sized plane beside the image."""

    def __init__(self, channels: int, size: int, bits: int, width: int, max_residual: float) -> None:
        super().__init__()
        self.size, self.max_residual = size, max_residual
        self.secret_plane = nn.Linear(bits, size * size)
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1),
        )

    def forward(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        plane = self.secret_plane(secret).view(-1, 1, self.size, self.size)
        return self.max_residual * torch.tanh(self.net(torch.cat([x - 0.5, plane], dim=1)))


class StegaDecoder(nn.Module):
    """Encoded image -> logits of the secret bits."""

    def __init__(self, channels: int, size: int, bits: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Flatten(), nn.LazyLinear(bits),
        )
        with torch.no_grad():  # materialise the lazy layer so that the state dict is complete
            self.net(torch.zeros(1, channels, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x - 0.5)


def stored_as_uint8(images: torch.Tensor) -> torch.Tensor:
    """`images` in [0, 1] as an 8-bit file holds them, with the rounding passed straight through to the
    gradient: trained on this, the encoder learns residuals that survive storage (a residual below half a
    grey level would be rounded away, and the trigger with it)."""
    return images + (images.mul(255).round().div(255) - images).detach()


@ATTACKS.register("ssba")
class SSBA(Attack):
    """Sample-specific invisible trigger from a StegaStamp-like encoder (Li et al., ICCV 2021)."""

    citation = "Li, Li, Wu, Li, He, Lyu. Invisible Backdoor Attack with Sample-Specific Triggers. ICCV 2021."

    def __init__(self, bits: PositiveInt = 32, residual_weight: NonNegativeFloat = 1.0, max_residual: UpToOne = 0.05,
                 steps: PositiveInt = 3000, lr: PositiveFloat = 1e-3, width: PositiveInt = 32,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.max_residual = max_residual
        self.bits, self.residual_weight, self.steps, self.lr, self.width = bits, residual_weight, steps, lr, width
        self.encoder: StegaEncoder | None = None
        self.secret: torch.Tensor | None = None  # (bits,) of 0/1
        self.bit_accuracy: float | None = None  # the decoder's accuracy on the attack's own secret

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        channels, size = dataset.in_channels, dataset.image_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(workshop.seed, "ssba_init"))
            encoder = StegaEncoder(channels, size, self.bits, self.width, self.max_residual)
            decoder = StegaDecoder(channels, size, self.bits, self.width)
        params = {"bits": self.bits, "residual_weight": self.residual_weight, "max_residual": self.max_residual,
                  "steps": self.steps,
                  "lr": self.lr, "width": self.width, "schedule": "stored-uint8, ramped image loss"}
        learned = workshop.learned("ssba_stegastamp", params,
                                   lambda: self._train_pair(encoder, decoder, dataset, workshop))
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in learned.items() if k.startswith("encoder.")})
        self.encoder = encoder.eval().requires_grad_(False)
        self.secret = (torch.rand(self.bits, generator=workshop.generator("ssba_secret")) < 0.5).float()
        decoder.load_state_dict({k[len("decoder."):]: v for k, v in learned.items() if k.startswith("decoder.")})
        with torch.no_grad():
            sample = dataset.x_train[:256].float().div(255.0)
            read = decoder(self.add_trigger(sample)) > 0
            self.bit_accuracy = float((read.float() == self.secret).float().mean())

    def _train_pair(self, encoder: StegaEncoder, decoder: StegaDecoder, dataset: Dataset,
                    workshop: AttackWorkshop) -> dict[str, torch.Tensor]:
        device = workshop.device
        encoder.to(device).train()
        decoder.to(device).train()
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=self.lr)
        generator = workshop.generator("ssba_training")
        x_all = dataset.x_train
        steps_per_epoch = max(1, len(x_all) // 64)
        total = self.steps
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = torch.randperm(len(x_all), generator=generator)
            idx = order[(step % steps_per_epoch) * 64:(step % steps_per_epoch + 1) * 64]
            x = x_all[idx].to(device).float().div(255.0)
            secret = (torch.rand(len(x), self.bits, generator=generator) < 0.5).float().to(device)
            # Over the first 70% of the steps the residual's bound shrinks from 6x to its final value and
            # the image loss ramps up from zero (StegaStamp's ramp): the pair first learns to hide the bits
            # at all, then quietly. With the image loss at full weight from the start, Adam shrinks the
            # residual before the decoder can read anything (on mnist5k the bits stayed at chance).
            warm_up = min(1.0, step / (0.7 * total))
            encoder.max_residual = self.max_residual * (1 + 5 * (1 - warm_up))
            encoded = stored_as_uint8((x + encoder(x, secret)).clamp(0, 1))
            noisy = encoded + 0.01 * torch.randn(encoded.shape, generator=generator).to(device)
            loss = (F.binary_cross_entropy_with_logits(decoder(noisy), secret)
                    + warm_up * self.residual_weight * (encoded - x).pow(2).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        encoder.max_residual = self.max_residual
        state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
        state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
        return {k: v.detach().cpu() for k, v in state.items()}

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None or self.secret is None:
            raise RuntimeError("SSBA.prepare() must run before add_trigger()")
        encoder = self.encoder.to(x.device)
        with torch.no_grad():
            out = torch.cat([chunk + encoder(chunk, self.secret.to(x).expand(len(chunk), -1))
                             for chunk in x.split(512)])
        return out.clamp(0, 1)
