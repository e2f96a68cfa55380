"""The pieces of input filtering (Do, Harikumar, Le, Nguyen, Tran, Rana, Nguyen, Susilo and Venkatesh,
"Towards Effective and Robust Neural Trojan Defenses via Input Filtering", ECCV 2022), shared by VIF,
AIF and FtC: the variational filter, its loss, the filtered model, and the loop that trains a filter
on the defender's clean budget against the frozen deployed classifier.

The filter is a variational autoencoder whose narrow latent code forces it to compress an image:
what the clean images of the budget share (the object) survives reconstruction, a small unfamiliar
pattern (a trigger) does not. At run time the filter is deterministic: it decodes the mean of the
latent code, so the same image is always filtered the same way (the paper samples in training only).

The paper's text was not at hand when this was written (only its abstract): the structure of the
losses (VAE evidence bound plus the classifier's cross-entropy on the reconstruction; AIF's generator
game; FtC's contrast rule) follows the paper's description, and every architecture choice and loss
weight here is ours, to be checked against its appendix. Details fixed here:
- Encoder: a 3x3 convolution of `width` channels, then stride-2 3x3 convolutions doubling the
  channels (at most 4 x width) until the side is 4 or less (32 -> 16 -> 8 -> 4, 28 -> 14 -> 7 -> 4,
  8 -> 4), then a linear layer to the latent mean and log-variance. Decoder: the mirror image, with
  nearest-neighbour upsampling to the encoder's sides and a sigmoid on the output. No normalisation
  layers, so a batch of one filters as a batch of many.
- Reconstruction loss: squared error summed over pixels in [0, 1] (a Gaussian decoder), averaged over
  the batch; KL term summed over the latent dimensions, averaged over the batch.
- The budget images are augmented as the victim's were (crop, flip), and the loop counts steps,
  not epochs, because a budget may be 150 images or 5,000.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.base import DefenseContext
from bdbench.progress import steps
from bdbench.training import LoopPrecision, augment_batch, loop_precision

MAX_LATENT_SIDE = 4  # the encoder halves the image until its side is at most this


class VariationalFilter(nn.Module):
    """A convolutional VAE on images in [0, 1]: `forward` samples (training), `purify` decodes the mean."""

    def __init__(self, in_channels: int, image_size: int, latent_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        self.sides = [image_size]
        channels = [width]
        encoder: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        while self.sides[-1] > MAX_LATENT_SIDE:
            self.sides.append((self.sides[-1] + 1) // 2)
            channels.append(min(2 * channels[-1], 4 * width))
            encoder += [nn.Conv2d(channels[-2], channels[-1], 3, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.code_shape = (channels[-1], self.sides[-1], self.sides[-1])
        features = channels[-1] * self.sides[-1] ** 2
        self.to_latent = nn.Linear(features, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        self.up = nn.ModuleList(nn.Conv2d(channels[i], channels[i - 1], 3, padding=1)
                                for i in range(len(channels) - 1, 0, -1))
        self.to_image = nn.Conv2d(width, in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent code's mean and log-variance for images `x` in [0, 1]."""
        mean, log_var = self.to_latent(self.encoder(x)).chunk(2, dim=1)
        return mean, log_var

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.from_latent(z)).unflatten(1, self.code_shape)
        for conv, side in zip(self.up, reversed(self.sides[:-1])):
            h = F.relu(conv(F.interpolate(h, size=(side, side), mode="nearest")))
        return torch.sigmoid(self.to_image(h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reconstruction from a sampled code (the reparameterisation trick), with the code's mean and
        log-variance."""
        mean, log_var = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return self.decode(z), mean, log_var

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """The filtered image: the decoded mean code (deterministic)."""
        return self.decode(self.encode(x)[0])


def vae_terms(x: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor,
              log_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's two losses, each averaged over the batch: squared reconstruction error summed over pixels,
    and KL(q(z|x) || N(0, I)) summed over the latent dimensions."""
    reconstruction_error = (reconstruction.float() - x.float()).pow(2).flatten(1).sum(1).mean()
    kl = -0.5 * (1 + log_var.float() - mean.float().pow(2) - log_var.float().exp()).sum(1).mean()
    return reconstruction_error, kl


@contextmanager
def seeded(context: DefenseContext, purpose: str) -> Iterator[None]:
    """Torch's global generators (CPU, and the context's GPU) seeded for `purpose` inside the block and restored
    after it: network initialisation and the VAE's sampling noise are then repeatable from the experiment's seed."""
    devices = [context.device] if context.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(context.generator(purpose).initial_seed())
        yield


class Filtered(nn.Module):
    """The defended model: the classifier applied to the filter's output (images in [0, 1], as any model here)."""

    def __init__(self, image_filter: VariationalFilter, classifier: nn.Module) -> None:
        super().__init__()
        self.image_filter, self.classifier = image_filter, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.image_filter.purify(x))


@dataclass(frozen=True)
class FilterTraining:
    """How a filter is trained: Adam for `steps` batches of `batch_size` budget images at `lr`, minimising
    reconstruction + kl_weight x KL + ce_weight x cross-entropy of the classifier on the reconstruction."""

    steps: int
    batch_size: int
    lr: float
    kl_weight: float
    ce_weight: float


class Adversary(Protocol):
    """AIF's opponent: given the currently filtered classifier and a clean batch, it takes its own training
    step and returns triggered versions of the batch (detached) for the filter to learn to clean."""

    def attack(self, filtered: nn.Module, x: torch.Tensor, generator: torch.Generator,
               precision: LoopPrecision) -> torch.Tensor:
        ...


def filter_objective(image_filter: VariationalFilter, classifier: nn.Module, x_in: torch.Tensor,
                     x_target: torch.Tensor, y: torch.Tensor, settings: FilterTraining,
                     precision: LoopPrecision) -> torch.Tensor:
    """The filter's loss on inputs `x_in` whose clean versions are `x_target` with labels `y`."""
    with precision.autocast():
        reconstruction, mean, log_var = image_filter(x_in)
        logits = classifier(reconstruction.contiguous(memory_format=precision.memory_format))
    reconstruction_error, kl = vae_terms(x_target, reconstruction, mean, log_var)
    return reconstruction_error + settings.kl_weight * kl + settings.ce_weight * F.cross_entropy(logits.float(), y)


def train_filter(context: DefenseContext, image_filter: VariationalFilter, settings: FilterTraining, purpose: str,
                 adversary: Adversary | None = None, adversarial_weight: float = 0.0) -> Filtered:
    """Train `image_filter` on the clean budget against the frozen deployed classifier and return the filtered
    model. With an `adversary` (AIF), each step also asks the filter to turn the adversary's triggered batch
    back into the clean one, weighted by `adversarial_weight`. The passes run as the trainer trained the victim
    (`training.loop_precision`); parameters, losses and Adam stay float32."""
    precision = loop_precision(context.train_config, context.device)
    classifier = copy.deepcopy(context.model).to(context.device).eval().requires_grad_(False)
    classifier.to(memory_format=precision.memory_format)  # type: ignore[call-overload]
    image_filter.to(context.device).train()
    optimizer = torch.optim.Adam(image_filter.parameters(), lr=settings.lr)
    generator = context.generator(purpose)
    x_all, y_all = context.clean_x.to(context.device), context.clean_y.to(context.device)
    filtered = Filtered(image_filter, classifier)
    for _ in steps(f"{purpose} step", settings.steps):
        pick = torch.randint(len(y_all), (settings.batch_size,), generator=generator).to(context.device)
        x = augment_batch(x_all[pick].float().div_(255.0), context.crop_padding, context.allow_hflip, generator)
        y = y_all[pick]
        triggered = None if adversary is None else adversary.attack(filtered, x, generator, precision)
        optimizer.zero_grad(set_to_none=True)
        loss = filter_objective(image_filter, classifier, x, x, y, settings, precision)
        if triggered is not None:
            loss = loss + adversarial_weight * filter_objective(image_filter, classifier, triggered, x, y, settings,
                                                                precision)
        loss.backward()
        optimizer.step()
    classifier.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return filtered.eval()
