"""Local training of a round's clients: all of them as one vectorised computation, or one after another.

Clients of one architecture share a template module; their weights are stacked along a leading client axis
(`torch.func.stack_module_state` layout: name -> (K, *shape)) and one SGD step of every client is one backward pass
through `vmap(loss)` over that axis (`torch.func.functional_call` runs the template with each client's weights).
Every client still sees only its own samples, in its own order, with its own augmentation: what each client
does is drawn beforehand from its own seed (`ClientPlan`), so the vectorised and the one-at-a-time paths
compute the same numbers (`tests/test_federated.py`) and `benchmarks/federated_vectorised.py` compares their
speed. Clients with fewer steps than others (non-IID shares) stop updating once their steps are done.

The template must have no BatchNorm running statistics (they would be shared buffers updated in place):
use a model with GroupNorm or no normalisation (`cnn-small` with `norm: group`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from bdbench.errors import ConfigError

Tensors = dict[str, torch.Tensor]


def check_template(model: nn.Module, model_name: str) -> None:
    """Refuse a model with running statistics (BatchNorm) in one line that names the fix."""
    stats = [name for name, _ in model.named_buffers()
             if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    if stats:
        raise ConfigError(f"model {model_name!r} keeps BatchNorm running statistics ({stats[0]}), which federated "
                          "clients cannot train as one vectorised computation; use a model without them, e.g. "
                          "{name: cnn-small, norm: group}")


@dataclass(frozen=True)
class LocalSGD:
    """One client's local training: epochs, batch size, SGD settings, the data set's augmentation."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    crop_padding: int = 0
    hflip: bool = False


@dataclass(frozen=True)
class ClientPlan:
    """Everything random a client does in one round, drawn from its seed: its batches (rows of the shared
    training tensor, (steps, B)), and each batch's crop offsets (steps, 2, B) and flips (steps, B)."""

    batches: torch.Tensor
    offsets: torch.Tensor
    flips: torch.Tensor

    @classmethod
    def draw(cls, rows: torch.Tensor, config: LocalSGD, seed: int, epochs: int | None = None,
             augment: bool = True) -> ClientPlan:
        """Each epoch a fresh permutation of the client's `rows` cut into full batches (the ragged last batch
        dropped, as Lockdown's loaders do); `augment=False` draws no crops or flips."""
        generator = torch.Generator().manual_seed(seed)
        size, per_epoch = config.batch_size, len(rows) // config.batch_size
        batches, offsets, flips = [], [], []
        for _ in range(config.epochs if epochs is None else epochs):
            order = rows[torch.randperm(len(rows), generator=generator)]
            for step in range(per_epoch):
                batches.append(order[step * size:(step + 1) * size])
                if augment and config.crop_padding > 0:
                    offsets.append(torch.randint(0, 2 * config.crop_padding + 1, (2, size), generator=generator))
                else:
                    offsets.append(torch.full((2, size), config.crop_padding if augment else 0))
                flips.append(torch.rand(size, generator=generator) < 0.5 if augment and config.hflip
                             else torch.zeros(size, dtype=torch.bool))
        empty = torch.empty(0, size, dtype=torch.long)
        return cls(torch.stack(batches) if batches else empty,
                   torch.stack(offsets) if offsets else empty.view(0, 1, size).expand(0, 2, size),
                   torch.stack(flips) if flips else empty.bool())

    @property
    def steps(self) -> int:
        return len(self.batches)


def crop_and_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Random-crop (after zero padding) and flip a float batch (M, C, H, W) by given offsets (2, M) and flips (M,),
    the trainer's augmentation (`training.augment_batch`) with its draws made beforehand."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        offsets = offsets.to(x.device)
        rows = (offsets[0].view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (offsets[1].view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = padded[batch, channel, rows, cols]
    if flips.any():
        x = torch.where(flips.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
    return x


class Clients(Protocol):
    """What trains a round's clients: a `ClientTrainer` in this process, or `RayClients` on Ray workers.
    `in_process` is the trainer in this process (the server's own training, FLTrust's root update, runs there)."""

    @property
    def in_process(self) -> ClientTrainer: ...

    def train(self, start: Tensors, plans: list[ClientPlan], config: LocalSGD, masks: Tensors | None = None,
              vectorised: bool = True) -> Tensors: ...

    def gradient_sums(self, start: Tensors, plans: list[ClientPlan], vectorised: bool = True) -> Tensors: ...


class ClientTrainer:
    """Trains stacked client weights on a shared uint8 training tensor `x` (N, C, H, W) with labels `y`."""

    def __init__(self, template: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 chunk: int | None = None) -> None:
        self.template = template.to(device).train()
        self.buffers = {name: b.to(device) for name, b in template.named_buffers()}
        self.names = [name for name, _ in template.named_parameters()]
        self.x, self.y, self.device, self.chunk = x.to(device), y.to(device), device, chunk

        def loss(params: Tensors, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(self.template, (params, self.buffers), (xb,)), yb)

        self._loss = loss
        self._losses = vmap(loss, in_dims=(0, 0, 0), chunk_size=chunk, randomness="different")

    @property
    def in_process(self) -> ClientTrainer:
        return self

    def _grads(self, params: Tensors, xb: torch.Tensor, yb: torch.Tensor) -> Tensors:
        """Every client's gradient at once: autograd through the vmapped forward pass of the summed client losses
        (each client's loss depends on its own weights only, so the gradient of the sum is each client's own).
        On the CPU this is an order of magnitude faster than `vmap(grad(loss))`, whose batching rule for the
        convolution's backward pass is slow; the numbers are the same."""
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            total = self._losses(leaves, xb, yb).sum()
            return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))

    def _batch(self, plan: ClientPlan, step: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = plan.batches[step].to(self.device)
        xb = crop_and_flip(self.x[rows].float().div_(255.0), plan.offsets[step], plan.flips[step], padding)
        return xb, self.y[rows]

    def _stacked_batches(self, plans: list[ClientPlan], step: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step` of every client, (K, B, ...); a client whose steps are done repeats its first batch (and
        its update is dropped)."""
        pairs = [self._batch(plan, step if step < plan.steps else 0, padding) for plan in plans]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def train(self, start: Tensors, plans: list[ClientPlan], config: LocalSGD, masks: Tensors | None = None,
              vectorised: bool = True) -> Tensors:
        """Run every client's plan from its weights in `start` (name -> (K, *shape)); gradients (and so the weights
        that move) restricted to `masks` where given (Lockdown). Returns the trained weights, stacked."""
        if not vectorised:
            return self._train_one_by_one(start, plans, config, masks)
        params = {n: start[n].detach().to(self.device).clone() for n in self.names}
        velocity = {n: torch.zeros_like(p) for n, p in params.items()} if config.momentum > 0 else None
        masks = None if masks is None else {n: m.to(self.device) for n, m in masks.items()}
        steps = torch.tensor([plan.steps for plan in plans], device=self.device)
        for step in range(int(steps.max()) if len(plans) else 0):
            xb, yb = self._stacked_batches(plans, step, config.crop_padding)
            grads = self._grads(params, xb, yb)
            active = (steps > step).to(xb.dtype)
            with torch.no_grad():
                for n in self.names:
                    params[n] = _sgd(params[n], grads[n], velocity, n, config,
                                     active.view(-1, *[1] * (grads[n].dim() - 1)), None if masks is None else masks[n])
        return params

    def _train_one_by_one(self, start: Tensors, plans: list[ClientPlan], config: LocalSGD,
                          masks: Tensors | None) -> Tensors:
        """The same training, one client after another with ordinary autograd (the benchmark's baseline)."""
        trained: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        for k, plan in enumerate(plans):
            params = {n: start[n][k].detach().to(self.device).clone() for n in self.names}
            velocity = {n: torch.zeros_like(p) for n, p in params.items()} if config.momentum > 0 else None
            for step in range(plan.steps):
                xb, yb = self._batch(plan, step, config.crop_padding)
                for p in params.values():
                    p.requires_grad_(True)
                grads = dict(zip(self.names, torch.autograd.grad(self._loss(params, xb, yb), list(params.values()))))
                with torch.no_grad():
                    for n in self.names:
                        params[n] = _sgd(params[n].detach(), grads[n], velocity, n, config, None,
                                         None if masks is None else masks[n][k].to(self.device))
            for n in self.names:
                trained[n].append(params[n].detach())
        return {n: torch.stack(v) if v else start[n].clone() for n, v in trained.items()}

    def gradient_sums(self, start: Tensors, plans: list[ClientPlan], vectorised: bool = True) -> Tensors:
        """Each client's gradient summed over the batches of its plan at fixed weights (Lockdown's
        `screen_gradients`)."""
        params = {n: start[n].detach().to(self.device) for n in self.names}
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        if vectorised:
            steps = torch.tensor([plan.steps for plan in plans], device=self.device)
            for step in range(int(steps.max()) if len(plans) else 0):
                xb, yb = self._stacked_batches(plans, step, 0)
                grads = self._grads(params, xb, yb)
                active = (steps > step).to(xb.dtype)
                for n in self.names:
                    sums[n] += grads[n] * active.view(-1, *[1] * (grads[n].dim() - 1))
            return sums
        for k, plan in enumerate(plans):
            own = {n: params[n][k].clone().requires_grad_(True) for n in self.names}
            for step in range(plan.steps):
                xb, yb = self._batch(plan, step, 0)
                for n, g in zip(self.names, torch.autograd.grad(self._loss(own, xb, yb), list(own.values()))):
                    sums[n][k] += g
        return sums


def _sgd(p: torch.Tensor, g: torch.Tensor, velocity: Tensors | None, name: str, config: LocalSGD,
         active: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch.optim.SGD's step (weight decay added to the gradient, then momentum without dampening); where
    `active` is 0 the client's weights and momentum stay as they are; outside `mask` nothing moves (Lockdown masks
    the gradient, and its weights outside the mask are zero, so weight decay leaves them too)."""
    d = g + config.weight_decay * p if config.weight_decay else g
    if mask is not None:
        d = d * mask
    if velocity is not None:
        v = velocity[name]  # starts at zero, so the first step's momentum is d itself, as in torch.optim.SGD
        new_v = config.momentum * v + d
        velocity[name] = new_v if active is None else torch.where(active > 0, new_v, v)
        d = velocity[name]
    step = config.lr * d
    return p - (step if active is None else step * active)


__all__ = ["ClientPlan", "ClientTrainer", "Clients", "LocalSGD", "check_template", "crop_and_flip"]

