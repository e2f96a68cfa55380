"""Finding and reading the layers that defenses inspect, for any registered model.

Every model is a `NormalizedClassifier` whose network ends in an `nn.Linear`; the input of that
last linear layer is the penultimate representation (what Activation Clustering, Spectral
Signatures, SPECTRE and SCAn analyse), and the input of the last global pooling layer is the final
spatial feature map (what Grad-CAM and Gram-matrix statistics use). Layers are found by walking
`model.modules()` in registration order, so no defense needs per-architecture code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _last(model: nn.Module, types: tuple[type[nn.Module], ...], what: str) -> nn.Module:
    found = [m for m in model.modules() if isinstance(m, types)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no {what}; defenses that read it cannot run on this model")
    return found[-1]


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final `nn.Linear` (the classification head); its input is the penultimate representation."""
    return _last(model, (nn.Linear,), "nn.Linear classification layer")  # type: ignore[return-value]


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last `nn.Conv2d` registered in the model."""
    return _last(model, (nn.Conv2d,), "nn.Conv2d layer")  # type: ignore[return-value]


def feature_map_layer(model: nn.Module) -> nn.Module:
    """The module whose input is the final spatial feature map: the last global pooling layer, or the
    last convolution (read at its output) where a model has no pooling."""
    pools = [m for m in model.modules() if isinstance(m, _POOLS)]
    return pools[-1] if pools else last_conv(model)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every normalisation layer (BatchNorm, GroupNorm, LayerNorm, InstanceNorm), in order."""
    return [m for m in model.modules() if isinstance(m, _NORMS)]


@contextmanager
def capture(module: nn.Module, which: Literal["input", "output"] = "output") -> Iterator[list[torch.Tensor]]:
    """Record the input or output tensor of `module` on every forward pass inside the block.

    Tensors are kept as produced (on their device, with their autograd history), so Grad-CAM can
    differentiate through them; callers that only read values run under `torch.no_grad()`.
    """
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append(inputs[0] if which == "input" else output)

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _spatial_module(model: nn.Module) -> tuple[nn.Module, Literal["input", "output"]]:
    module = feature_map_layer(model)
    return module, ("input" if isinstance(module, _POOLS) else "output")


@torch.no_grad()
def read_activations(model: nn.Module, x: torch.Tensor, layer: Literal["penultimate", "feature_map"],
                     batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """Activations of uint8 images (N, C, H, W) at `layer`, as float32 on the CPU, model in eval mode.

    `penultimate`: (N, D), the input of the classification layer. `feature_map`: (N, C', H', W'),
    the final spatial feature map.
    """
    if layer == "penultimate":
        module, which = classifier_layer(model), "input"
    elif layer == "feature_map":
        module, which = _spatial_module(model)
    else:
        raise ValueError(f"layer must be 'penultimate' or 'feature_map', not {layer!r}")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    out = []
    with capture(module, which) as seen:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size].to(device).float().div_(255.0))
            out.append(seen.pop().float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Grad-CAM heat maps (Selvaraju et al., ICCV 2017) of float images `x` in [0, 1] for `classes`,
    at the final spatial feature map, upsampled to the image size and scaled to [0, 1] per image."""
    module, which = _spatial_module(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    maps = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        cb = classes[start:start + batch_size].to(device)
        with capture(module, which) as seen, torch.enable_grad():
            logits = model(xb)
            features = seen[0]
            score = logits.gather(1, cb.view(-1, 1)).sum()
            grads, = torch.autograd.grad(score, features)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * features).sum(1, keepdim=True)).detach()
        cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
        maps.append((cam / peak).squeeze(1).cpu())
    return torch.cat(maps)
