"""Finding and reading the layers that defenses inspect, for any registered model.

Every model is a `NormalizedClassifier` whose network ends in an `nn.Linear`; the input of that
last linear layer is the penultimate representation (what Activation Clustering, Spectral
Signatures, SPECTRE and SCAn analyse), and the last 4-D output before it is the final spatial
feature map (what Grad-CAM and Gram-matrix statistics use). Layers are found by walking
`model.modules()` or by tracing one forward pass, so no defense needs per-architecture code.
`mask_channels` zeroes chosen channels of a layer's output, which is how pruning defenses prune.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

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


def feature_map_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The module whose output is the final spatial feature map: of all modules, the last to finish
    a forward pass of the float images `x` with a 4-D output larger than 1x1 before the
    classification layer runs (global pooling and squeeze-excitation outputs are 1x1); the last
    4-D output of any size where a model shrinks the image to 1x1 first.

    Found by tracing one forward pass, so it is right whether a model pools with a module or with
    `F.adaptive_avg_pool2d`, and whatever order its submodules were registered in. For a vision
    transformer, whose blocks work on tokens, it is the patch embedding.
    """
    head = classifier_layer(model)
    order: list[tuple[nn.Module, bool]] = []
    head_called = False

    def note(module: nn.Module, _inputs: tuple, output: object) -> None:
        if (not head_called and isinstance(output, torch.Tensor) and output.ndim == 4
                and not _channels_last(module)):
            order.append((module, output.shape[-2:].numel() > 1))

    def stop(_module: nn.Module, _inputs: tuple) -> None:
        nonlocal head_called
        head_called = True

    handles = [m.register_forward_hook(note) for m in model.modules() if m is not model]
    handles.append(head.register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} produces no spatial feature map; defenses that read it "
                         "cannot run on this model")
    spatial = [module for module, larger in order if larger]
    return spatial[-1] if spatial else order[-1][0]


def _channels_last(module: nn.Module) -> bool:
    """Whether a 4-D output of `module` is (N, H, W, C): linear layers and a plain LayerNorm act on
    the last dimension (ConvNeXt's MLP), so their maps are not (N, C, H, W) feature maps."""
    return isinstance(module, nn.Linear) or type(module) is nn.LayerNorm


class MaskedOutput(nn.Module):
    """`inner` with chosen output channels (dimension 1) zeroed by the buffer `channel_mask`.

    A module rather than a forward hook, so the mask survives what rebuilds a model from its
    graph (BatchNorm folding, FX quantization for a deployed precision), and is saved with it.
    """

    def __init__(self, inner: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("channel_mask", keep.detach().to(torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.channel_mask


def mask_channels(model: nn.Module, module: nn.Module, keep: torch.Tensor) -> MaskedOutput:
    """Zero the output channels of `module` (a submodule of `model`) where the boolean `keep` is
    False, on every later forward pass, training included: how pruning defenses remove a channel
    from any model. `module` is replaced in `model` by a `MaskedOutput` around it; calling again
    with the same `module` (or its wrapper) replaces the mask. Shapes never change.
    """
    mask = keep.detach().to(torch.float32).view(1, -1, 1, 1)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, MaskedOutput) and (child is module or child.inner is module):
                child.channel_mask = mask.to(child.channel_mask.device)
                return child
            if child is module:
                device = next((p.device for p in model.parameters()), torch.device("cpu"))
                wrapper = MaskedOutput(module, keep).to(device)
                setattr(parent, name, wrapper)
                return wrapper
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


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


@torch.no_grad()
def read_activations(model: nn.Module, x: torch.Tensor, layer: Literal["penultimate", "feature_map"],
                     batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """Activations of uint8 images (N, C, H, W) at `layer`, as float32 on the CPU, model in eval mode.

    `penultimate`: (N, D), the input of the classification layer. `feature_map`: (N, C', H', W'),
    the final spatial feature map.
    """
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    if layer == "penultimate":
        module, which = classifier_layer(model), "input"
    elif layer == "feature_map":
        module, which = feature_map_layer(model, x[:1].to(device).float().div_(255.0)), "output"
    else:
        raise ValueError(f"layer must be 'penultimate' or 'feature_map', not {layer!r}")
    out = []
    with capture(module, which) as seen:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size].to(device).float().div_(255.0))
            out.append(seen.pop().float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Grad-CAM heat maps (Selvaraju et al., ICCV 2017) of float images `x` in [0, 1] for `classes`,
    at the final spatial feature map, upsampled to the image size and scaled to [0, 1] per image."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    module, which = feature_map_layer(model, x[:1].to(device)), "output"
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
