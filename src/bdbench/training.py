"""The one trainer: victims, fine-tuning defenses and retraining all call `train`.

In the style of airbench/nanoGPT: the whole data set sits on the device as uint8, each batch
is augmented as one tensor (random crop with padding, horizontal flip only where the data set
allows it), SGD with a one-cycle or cosine schedule steps per batch, and every random draw
comes from one generator seeded by the caller. On CUDA the loop runs channels-last under bfloat16
autocast (weights, optimiser state and BatchNorm statistics stay float32). On the CPU it runs in
float32 unless the config sets `cpu_bfloat16`: then it too runs channels-last under bfloat16
autocast, which on a CPU with native bfloat16 instructions (AVX512-BF16 or AMX) trains small
convolutional networks about twice as fast (`benchmarks/trainer_vs_dataloader.py`), with other
numerics. Rows record which was used (`train_dtype`). Predictions on the CPU stay float32, so
that clean accuracy and ASR are measured at full precision.

Training given a `checkpoint` (victims, stored in the output folder's cache) saves its whole state at the
end of an epoch, at most once every `checkpoint.every_s` seconds: weights and BatchNorm statistics, the optimiser's
momentum, the schedule's position, the trainer's generator and the global generators that random layers
draw from. Training that was killed part-way then resumes at the epoch after the last checkpoint and ends
with the same weights, bit for bit, as training that was never interrupted (tested). A hook that keeps
state of its own between batches (InputAware's generator and its optimiser) is not in that state, so
training with one checkpoints only when the hook says it keeps none (`resumable = True`: WaNet's noise mode,
BPP's negative samples). A federation keeps its rounds' state through the same `Checkpoint` protocol
(`bdbench.federated.simulation`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bdbench.progress import steps
from bdbench.seeding import derive_seed

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Training settings. `crop_padding` and `hflip` left as None take the data set's own facts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    crop_padding: int | None = Field(None, ge=0)
    hflip: bool | None = None
    cpu_bfloat16: bool = False  # the CPU fast path: channels-last and bfloat16 autocast (CUDA always has them)


class BatchHook(Protocol):
    """The one hook through which an attack may control training (WaNet's noise mode,
    input-aware generators, BPP's negative samples): it receives each augmented batch as
    float images in [0, 1] with labels, the batch's row numbers in the training set (`index`, on
    the training device: how a per-batch attack knows which rows are its poisoned samples) and the
    trainer's generator, and returns the batch to train on. The returned images may carry a
    graph into the attack's own parameters: the trainer's backward pass then reaches them too."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                 index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Checkpoint(Protocol):
    """Where a long computation keeps its state so that a run killed part-way resumes where it stood: `load`
    returns the last state saved (a dict of tensors, numbers and containers), or None; `reject` is called when
    that state does not fit this computation (another schedule, model or federation) and must forget it, and
    whatever it carried about the computation (its seconds); `save` replaces it. `train` takes one that also
    says how often to save (`TrainingCheckpoint`); a federation (`bdbench.federated.simulation.run_federation`)
    saves every `checkpoint_every` rounds, its config's own cadence. `bdbench.store.StoredCheckpoint` is one
    for both, kept in the output folder's cache. The warnings of a resume name the checkpoint by `str()`
    (`StoredCheckpoint`'s: `training/<victim key>`)."""

    def load(self) -> dict[str, Any] | None:
        ...

    def reject(self) -> None:
        ...

    def save(self, state: dict[str, Any]) -> None:
        ...


class TrainingCheckpoint(Checkpoint, Protocol):
    """Where `train` keeps its state between epochs (see the module docstring): a `Checkpoint` that `train`
    saves at the end of an epoch once `every_s` seconds have passed since the last save (or since training
    started)."""

    every_s: float


def hook_is_resumable(hook: BatchHook | None) -> bool:
    """Whether training with `hook` can stop at an epoch's end and resume from the trainer's own state: no hook,
    or one that declares `resumable = True` (it keeps no state between batches; its draws come from the
    trainer's generator)."""
    return hook is None or bool(getattr(hook, "resumable", False))


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""A training objective: (model, images, labels) -> scalar loss. Defenses with their own objective
(attention distillation, loss flooding, unlearning) pass one; the default is cross-entropy."""


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def trains_in_bfloat16(config: TrainConfig, device: torch.device) -> bool:
    """Whether `train` runs channels-last under bfloat16 autocast: always on CUDA, on the CPU when
    the config asks for it."""
    return device.type == "cuda" or (device.type == "cpu" and config.cpu_bfloat16)


@dataclass(frozen=True)
class LoopPrecision:
    """The trainer's numerics for a defense's own loop (trigger inversion, margin ascent, mask learning):
    bfloat16 autocast wherever `train` would train the victim that way (`trains_in_bfloat16`: always on
    CUDA, on the CPU with `cpu_bfloat16`), float32 otherwise. Parameters and optimiser state stay float32
    either way. The layout is channels-last everywhere (`memory_format`)."""

    device_type: str
    bf16: bool

    @property
    def memory_format(self) -> torch.memory_format:
        """Channels-last, in float32 on the CPU too: a layout, not a precision (the same float32 sums, in
        another order, so equal to rounding), and oneDNN's convolutions run on it without reordering the
        activations every pass: on PreAct-ResNet18 (width 0.25, 28x28, one thread, AVX-512 AMD EPYC) a forward
        and input-gradient pass costs 0.64-0.86x the CPU time of the default layout, a BatchNorm-in-training
        forward and backward 0.70x, on cnn-small 0.69x (with GroupNorm 1.09x); Neural Cleanse on the
        `model-defenses` BadNets victim 0.82x, MM-BD 0.87x (issue 26; `benchmarks/defense_cost.py`). `train` keeps the
        default layout in float32 (where its step would take 0.71x too), so that victims stay bit for bit
        those trained before."""
        return torch.channels_last

    def autocast(self) -> torch.autocast:
        """A fresh autocast context for one forward pass (a no-op in float32)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16)


def loop_precision(config: TrainConfig, device: torch.device) -> LoopPrecision:
    """`LoopPrecision` of a defense loop on `device` for a victim trained with `config`."""
    return LoopPrecision(device.type, trains_in_bfloat16(config, device))


def images_per_pass(device: torch.device) -> int:
    """How many images one forward pass of a batched defense loop (Neural Cleanse's labels, MM-BD's
    classes) should carry on `device`: 2,048 on a GPU, which a small pass leaves idle; 128 on a CPU,
    where larger passes fall out of the caches and run no faster per image
    (`benchmarks/nc_batched_vs_per_label.py`). Groups of a pass add up their gradients before one
    step, so the pass size changes the cost, never the optimisation."""
    return 2048 if device.type == "cuda" else 128


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX): where `cpu_bfloat16` pays."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def augment_batch(x: torch.Tensor, crop_padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, for a whole float batch at once."""
    n, _, h, w = x.shape
    if crop_padding > 0:
        padded = F.pad(x, (crop_padding,) * 4)
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, n), generator=generator).to(x.device)
        rows = (offsets[0].view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (offsets[1].view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = padded[batch, channel, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def to_layout(model: nn.Module, memory_format: torch.memory_format, device: torch.device | None = None) -> nn.Module:
    """`model.to(device, memory_format=memory_format)`, in place. torch's overloads of `Module.to` leave out the
    `memory_format` keyword that it takes (and documents), hence the one ignore."""
    if device is None:
        return model.to(memory_format=memory_format)  # type: ignore[call-overload]
    return model.to(device=device, memory_format=memory_format)  # type: ignore[call-overload]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """The optimiser steps `train` takes in one epoch over `n` examples at `batch_size`: full batches
    only (the ragged last one is dropped, since BatchNorm needs full ones), one batch of all `n` when
    `n` is below `batch_size`."""
    return max(1, n // min(batch_size, n))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    seed: int,
    crop_padding: int = 0,
    hflip: bool = False,
    device: torch.device | None = None,
    hook: BatchHook | None = None,
    loss_fn: LossFn = cross_entropy,
    checkpoint: TrainingCheckpoint | None = None,
) -> nn.Module:
    """Train `model` in place on uint8 images `x` (N, C, H, W) and labels `y` and return it in eval mode.

    `y` holds class indices (N,) or soft label distributions (N, K). `crop_padding`/`hflip`
    are the data set's defaults; the config's own values, when set, win. `hook` lets an attack
    change each batch; `loss_fn` replaces the cross-entropy objective. With `checkpoint` (and a resumable
    hook, `hook_is_resumable`), training resumes from the state it holds and saves its state there (see the
    module docstring).
    """
    device = device or default_device()
    crop_padding = config.crop_padding if config.crop_padding is not None else crop_padding
    hflip = config.hflip if config.hflip is not None else hflip
    generator = torch.Generator().manual_seed(seed)
    on_cuda = device.type == "cuda"
    bf16 = trains_in_bfloat16(config, device)
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    to_layout(model, memory_format, device).train()
    x_dev, y_dev = x.to(device), y.to(device)
    n = len(x_dev)
    batch_size = min(config.batch_size, n)
    per_epoch = steps_per_epoch(n, config.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    scheduler = _scheduler(optimizer, config, config.epochs * per_epoch)
    if not hook_is_resumable(hook):
        checkpoint = None
    # Random layers (dropout, stochastic depth) draw from the global generators: seed those from
    # `seed` for the length of training, so that the experiment's seed fixes them too.
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.manual_seed(derive_seed(seed, "random_layers"))
        progress = _TrainingState(model, optimizer, scheduler, generator, device, config.epochs, per_epoch)
        state = checkpoint.load() if checkpoint is not None else None
        if checkpoint is not None and state is not None:
            if progress.fits(state):
                log.warning("training resumes from checkpoint %s after epoch %d of %d", checkpoint,
                            state["epochs_done"], config.epochs)
            else:
                log.warning("checkpoint %s does not fit this training (another schedule or model); training from "
                            "the first epoch", checkpoint)
                checkpoint.reject()
                state = None
        start = progress.restore(state)
        last_save = time.monotonic()
        for epoch in steps("training epoch", config.epochs, start):
            order = torch.randperm(n, generator=generator).to(device)
            for step in range(per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                xb = x_dev[idx].float().div_(255.0)
                xb = augment_batch(xb, crop_padding, hflip, generator)
                yb = y_dev[idx]
                if hook is not None:
                    xb, yb = hook(xb, yb, generator, idx)
                xb = xb.contiguous(memory_format=memory_format)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(model, xb, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            if (checkpoint is not None and epoch + 1 < config.epochs
                    and time.monotonic() - last_save >= checkpoint.every_s):
                checkpoint.save(progress.state(epoch + 1))
                last_save = time.monotonic()
    return to_layout(model, torch.contiguous_format).eval()


@dataclass
class _TrainingState:
    """Everything `train`'s result depends on between two epochs, saved to and restored from a checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    device: torch.device
    epochs: int
    per_epoch: int

    def state(self, epochs_done: int) -> dict[str, Any]:
        state = {"epochs_done": epochs_done, "epochs": self.epochs, "steps_per_epoch": self.per_epoch,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                 "global_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any] | None) -> int:
        """Load `state`, one that `fits`, and return the epochs it has done; 0 when there is none."""
        if state is None:
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["global_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        return int(state["epochs_done"])

    def fits(self, state: dict[str, Any]) -> bool:
        """Whether `state` was saved by this training (same schedule, model and generators), checked on a copy
        before anything is changed."""
        keys = {"epochs_done", "epochs", "steps_per_epoch", "model", "optimizer", "scheduler", "generator",
                "global_rng"}
        if not keys <= state.keys() or (state["epochs"], state["steps_per_epoch"]) != (self.epochs, self.per_epoch):
            return False
        if not 0 < int(state["epochs_done"]) < self.epochs:
            return False
        try:
            copy.deepcopy(self.model).load_state_dict(state["model"])  # names and shapes, on a copy
        except (RuntimeError, TypeError, AttributeError):
            return False
        saved = state["optimizer"].get("param_groups", [])
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.optimizer.param_groups]:
            return False
        return all(isinstance(state[k], torch.Tensor) and state[k].shape == now.shape
                   for k, now in (("generator", self.generator.get_state()), ("global_rng", torch.get_rng_state())))


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512,
                   device: torch.device | None = None) -> torch.Tensor:
    """Logits for uint8 images (N, C, H, W), as float32 on the CPU, with the model in eval mode."""
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device).float().div_(255.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512,
            device: torch.device | None = None) -> torch.Tensor:
    """Predicted class indices for uint8 images (N, C, H, W)."""
    return predict_logits(model, x, batch_size, device).argmax(1)
