"""Input-aware dynamic backdoor (Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020).

A generator G makes a pattern for each input and a mask generator M says where it goes:
x' = x + (G(x) - x) * M(x). M is trained first, alone, to produce sparse masks (mean density at
most `mask_density`, weight `lambda_norm`) that differ between inputs (the diversity loss). G is
then trained jointly with the victim: in each batch `backdoor_ratio` of the rows carry their own
trigger and the target label, `cross_ratio` carry the trigger generated from *another* input and
keep their true label (cross-trigger mode: a trigger only works on the input it was made for), and
the diversity loss ||x1 - x2|| / ||G(x1) - G(x2)|| (weight `lambda_div`) keeps G from collapsing to
one pattern. Paper defaults: ratios 0.1/0.1, lambda_div 1, lambda_norm 100, mask density 0.032,
Adam (lr 0.01, betas 0.5/0.9) for G and M.

Joint training goes through the trainer's one hook: the hook owns G and its optimiser; the images
it returns carry G's graph, so the trainer's backward pass gives G the classification gradient,
the hook adds the diversity gradient itself, and takes G's optimiser step at the start of the
next batch (the last batch's G step is dropped).

What "poisoned samples" means here: the backdoor rows are a fixed seeded subset of the training
set (`backdoor_ratio`, which the grid's poison rate sets), relabelled to the target by `poison`
and stored clean until training; each time one of them is in a batch, the hook replaces it with
its current G/M trigger. Once the victim is trained, `after_training` stores them with the final
trigger, which is what a data-inspecting defense sees and what the test set carries. Cross rows
are drawn per batch from the other rows and are not in the mask. G's weights are saved beside the
victim (`victim_state`), so a cached victim comes with the generator it was trained against.

CPU-feasible simplification: G and M are three-layer convolutional encoder-decoders of width
`width` (16) without BatchNorm, where the paper uses deeper ones (32-128 channels, BatchNorm);
M is pretrained for `mask_epochs` (10) epochs instead of 25, and G trains for as many epochs as
the victim does (the paper trains both for hundreds of epochs with step decays).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.attacks.base import ATTACKS, Attack, LabelMode, PoisonedRows, PoisonedTrainingSet, clean_rows
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import Dataset
from bdbench.params import BelowOne, NonNegativeFloat, OpenRate, PositiveFloat, PositiveInt
from bdbench.seeding import derive_seed
from bdbench.training import BatchHook

_EPS = 1e-7


class _EncoderDecoder(nn.Module):
    """Conv (stride 1) - conv (stride 2) - transposed conv back to the input size - 1x1 conv out."""

    def __init__(self, channels: int, out_channels: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[..., :x.shape[-2], :x.shape[-1]] if out.shape[-1] != x.shape[-1] else out


def _seeded(seed: int, build) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ||x1 - x2|| / ||out1 - out2|| (RMS distances): small when different
    inputs get different outputs."""
    images = (x1 - x2).pow(2).flatten(1).mean(1).add(_EPS).sqrt()
    outputs = (out1 - out2).pow(2).flatten(1).mean(1).add(_EPS).sqrt()  # inside the root: finite gradient at 0
    return (images / (outputs + _EPS)).mean()


@ATTACKS.register("inputaware")
class InputAware(Attack):
    """Input-aware dynamic trigger generator trained with the victim (Nguyen and Tran, NeurIPS 2020)."""

    citation = "Nguyen, Tran. Input-Aware Dynamic Backdoor Attack. NeurIPS 2020."
    learns_with_victim = True

    def __init__(self, cross_ratio: BelowOne = 0.1, lambda_div: NonNegativeFloat = 1.0,
                 lambda_norm: NonNegativeFloat = 100.0, mask_density: OpenRate = 0.032, lr: PositiveFloat = 0.01,
                 mask_epochs: PositiveInt = 10, width: PositiveInt = 16,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.cross_ratio, self.lambda_div, self.lambda_norm = cross_ratio, lambda_div, lambda_norm
        self.mask_density, self.lr, self.mask_epochs, self.width = mask_density, lr, mask_epochs, width
        self.pattern_net: nn.Module | None = None  # G
        self.mask_net: nn.Module | None = None  # M, fixed after pretraining

    # --- the trigger -----------------------------------------------------------------------
    @staticmethod
    def _threshold(m: torch.Tensor) -> torch.Tensor:
        """The paper's soft step: masks near 0 or 1, still differentiable."""
        return torch.tanh(m * 20 - 10) / (2 + _EPS) + 0.5

    def networks(self) -> tuple[nn.Module, nn.Module]:
        """G and M, which `prepare` builds."""
        if self.pattern_net is None or self.mask_net is None:
            raise RuntimeError("InputAware.prepare() must run before the trigger is used")
        return self.pattern_net, self.mask_net

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.networks()[0](x)) + 1) / 2

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        return self._threshold(torch.tanh(self.networks()[1](x)) / 2 + 0.5)

    def compose(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """`x` with the trigger that G and M make for `source` (x itself for the backdoor, another
        input for the cross-trigger samples)."""
        return x + (self.patterns(source) - x) * self.masks(source)

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.networks()[0].parameters()).device
        with torch.no_grad():
            out = torch.cat([self.compose(chunk.to(device), chunk.to(device)) for chunk in x.split(512)])
        return out.to(x.device).clamp(0, 1)

    # --- learning ----------------------------------------------------------------------------
    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        channels = dataset.in_channels
        self.pattern_net = _seeded(derive_seed(workshop.seed, "inputaware_G"),
                                   lambda: _EncoderDecoder(channels, channels, self.width)).to(workshop.device)
        params = {"lambda_div": self.lambda_div, "lambda_norm": self.lambda_norm, "density": self.mask_density,
                  "lr": self.lr, "epochs": self.mask_epochs, "width": self.width}
        self.mask_net = mask_net = _seeded(derive_seed(workshop.seed, "inputaware_M"),
                                           lambda: _EncoderDecoder(channels, 1, self.width))
        state = workshop.learned("inputaware_mask", params, lambda: self._train_masks(dataset, workshop))
        mask_net.load_state_dict(state)
        mask_net.to(workshop.device).eval().requires_grad_(False)

    def _train_masks(self, dataset: Dataset, workshop: AttackWorkshop) -> dict[str, torch.Tensor]:
        """The paper's first stage: M alone, sparse and diverse masks."""
        net = self.networks()[1].to(workshop.device).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.5, 0.9))
        generator = workshop.generator("inputaware_mask_batches")
        x_all = dataset.x_train
        for _ in range(self.mask_epochs):
            order = torch.randperm(len(x_all), generator=generator)
            partner = torch.randperm(len(x_all), generator=generator)
            for start in range(0, len(order) - 1, 128):
                x1 = x_all[order[start:start + 128]].to(workshop.device).float().div(255.0)
                x2 = x_all[partner[start:start + 128]].to(workshop.device).float().div(255.0)
                m1, m2 = self.masks(x1), self.masks(x2)
                loss = (self.lambda_norm * F.relu(m1.mean() - self.mask_density)
                        + self.lambda_div * diversity_loss(x1, x2, m1, m2))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    def poison(self, dataset: Dataset, poison_rate: float, target_label: int,
               generator: torch.Generator) -> PoisonedTrainingSet:
        """Relabel the backdoor rows; their triggers come from G during training (see module doc)."""
        idx = self.select(dataset.y_train, poison_rate, target_label, generator)
        y = dataset.y_train.clone()
        y[idx] = self.target_labels(y[idx], target_label, dataset.num_classes)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        self.poison_mask = mask
        return PoisonedTrainingSet(dataset.x_train.clone(), y, mask)

    def training_hook(self) -> BatchHook | None:
        self.networks()  # prepare() has run
        return _JointTraining(self, PoisonedRows(self.poison_mask))

    def after_training(self, poisoned: PoisonedTrainingSet) -> PoisonedTrainingSet:
        x = poisoned.x.clone()
        x[poisoned.poison_mask] = self.trigger(x[poisoned.poison_mask])
        return dataclasses.replace(poisoned, x=x)

    def victim_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.networks()[0].state_dict().items()}

    def load_victim_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pattern_net = self.networks()[0]
        pattern_net.load_state_dict(tensors)
        pattern_net.eval()


class _JointTraining:
    """The hook that trains G with the victim, batch by batch (see the module docstring)."""

    def __init__(self, attack: InputAware, poisoned_rows: PoisonedRows) -> None:
        self.attack, self.poisoned_rows = attack, poisoned_rows
        self.optimizer: torch.optim.Optimizer | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                 index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attack = self.attack
        net, mask_net = attack.networks()
        if self.optimizer is None:
            net.to(x.device).train()
            mask_net.to(x.device)
            self.optimizer = torch.optim.Adam(net.parameters(), lr=attack.lr, betas=(0.5, 0.9))
        else:  # the previous batch's backward pass has filled G's gradients
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        poisoned = self.poisoned_rows(index)
        backdoor = torch.nonzero(poisoned).flatten()
        cross = clean_rows(poisoned, round(attack.cross_ratio * len(x)), generator)
        sources = torch.randint(0, len(x), (len(cross),), generator=generator).to(x.device)
        out = x.clone()
        if len(backdoor):
            out[backdoor] = attack.compose(x[backdoor], x[backdoor])
        if len(cross):
            out[cross] = attack.compose(x[cross], x[sources])
        pairs = min(len(backdoor), len(cross))
        if pairs and attack.lambda_div > 0:
            x1, x2 = x[backdoor[:pairs]], x[sources[:pairs]]
            loss = attack.lambda_div * diversity_loss(x1, x2, attack.patterns(x1), attack.patterns(x2))
            loss.backward()
        return out, y
