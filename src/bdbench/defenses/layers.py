"""Finding and reading the layers that defenses inspect, for any registered model.

Every model is a `NormalizedClassifier` whose network ends in an `nn.Linear`; the input of that
last linear layer is the penultimate representation (what Activation Clustering, Spectral
Signatures, SPECTRE and SCAn analyse), and the last 4-D output before it is the final spatial
feature map (what Grad-CAM and Gram-matrix statistics use). The ends of the last few stages are
where attention distillation compares feature maps; the normalisation layer that directly reads a
convolution's output is what channel-Lipschitz pruning folds into it. Layers are found by walking
`model.modules()` or by tracing one forward pass, so no defense needs per-architecture code.
`mask_channels` zeroes chosen channels of a layer's output, which is how pruning defenses prune.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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


@dataclass(frozen=True)
class _Call:
    """One module's forward call in a traced pass: its name, its first input and its output, and the
    version counters of both at that moment (an in-place op in between changes a tensor's version)."""

    name: str
    module: nn.Module
    input: torch.Tensor | None
    input_version: int
    output: torch.Tensor | None
    output_version: int


def _trace(model: nn.Module, x: torch.Tensor) -> list[_Call]:
    """Every submodule call of one forward pass of `x` (eval mode, no gradients), in the order the
    calls finish, up to the moment the classification layer starts."""
    head = classifier_layer(model)
    calls: list[_Call] = []
    head_called = False

    def note(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if head_called:
                return
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            out = output if isinstance(output, torch.Tensor) else None
            calls.append(_Call(name, module, first, -1 if first is None else first._version,
                               out, -1 if out is None else out._version))
        return hook

    def stop(_module: nn.Module, _inputs: tuple) -> None:
        nonlocal head_called
        head_called = True

    handles = [m.register_forward_hook(note(name)) for name, m in model.named_modules() if m is not model]
    handles.append(head.register_forward_pre_hook(stop))
    was_training = model.training
    model.eval()  # no BatchNorm statistics change and no dropout while tracing
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


def feature_map_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The module whose output is the final spatial feature map: of all modules, the last to finish
    a forward pass of the float images `x` with a 4-D output larger than 1x1 before the
    classification layer runs (global pooling and squeeze-excitation outputs are 1x1); the last
    4-D output of any size where a model shrinks the image to 1x1 first.

    Found by tracing one forward pass, so it is right whether a model pools with a module or with
    `F.adaptive_avg_pool2d`, and whatever order its submodules were registered in. For a vision
    transformer, whose blocks work on tokens, it is the patch embedding.
    """
    order = [(call.module, call.output.shape[-2:].numel() > 1) for call in _trace(model, x)
             if call.output is not None and call.output.ndim == 4 and not _channels_last(call.module)]
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

    channel_mask: torch.Tensor  # a buffer: nn.Module's attribute lookup types it as Tensor | Module otherwise

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


def _map_key(output: torch.Tensor | None) -> tuple[int, ...] | None:
    """The resolution of a feature map, (H, W) of an (N, C, H, W) map or (T,) of (N, T, D) tokens;
    None for anything else (vectors, 1x1 maps, a single token)."""
    if output is None:
        return None
    if output.ndim == 4 and output.shape[-2:].numel() > 1:
        return tuple(output.shape[-2:])
    if output.ndim == 3 and output.shape[1] > 1:
        return (output.shape[1],)
    return None


def stage_outputs(model: nn.Module, x: torch.Tensor, count: int = 3) -> list[str]:
    """Names of the modules whose outputs end the network's last `count` stages, deepest last: the
    feature maps that attention distillation compares (the residual groups of Zagoruyko and
    Komodakis's attention transfer and of NAD).

    Found by tracing one forward pass of the float images `x`. The backbone is the longest chain of
    sibling modules in which each takes the previous one's output (an `nn.Sequential` of blocks, or
    a ResNet's stem and stages), counted by how many resolutions its feature maps pass through; a
    stage is a run of its feature maps at one resolution, and ends with the run's last module that
    is not a normalisation layer. A network that never changes resolution (a vision transformer's
    token blocks) has one stage per block: there the last `count` blocks are returned.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    calls = _trace(model, x)
    parent_of = {call.name: call.name.rpartition(".")[0] for call in calls}
    best: tuple[tuple[int, int], list[_Call]] | None = None
    depth = {parent: 0 if not parent else parent.count(".") + 1 for parent in parent_of.values()}
    for parent in sorted(depth, key=lambda name: depth[name]):  # outermost first: a tie keeps the outer chain
        siblings = [call for call in calls if parent_of[call.name] == parent]
        chain: list[_Call] = []
        for call in siblings + [None]:  # None closes the last chain
            if call is not None and (not chain or call.input is chain[-1].output):
                chain.append(call)
                continue
            maps = [c for c in chain if _map_key(c.output) is not None and not isinstance(c.module, _NORMS)]
            score = (len({_map_key(c.output) for c in maps}), len(maps))
            if maps and (best is None or score > best[0]):
                best = (score, maps)
            chain = [call] if call is not None else []
    if best is None:
        raise ValueError(f"{type(model).__name__} has no feature maps before its classifier; defenses that "
                         "compare them cannot run on this model")
    (resolutions, _), maps = best
    if resolutions == 1:
        return [c.name for c in maps[-count:]]
    ends = [c.name for c, after in zip(maps, maps[1:] + [None])
            if after is None or _map_key(after.output) != _map_key(c.output)]
    return ends[-count:]


def output_shapes(model: nn.Module, x: torch.Tensor, names: list[str]) -> list[torch.Size]:
    """The output shape of each of the modules `names` (as in `model.named_modules()`) in one traced pass of the
    float images `x` (eval mode, no gradients, so no BatchNorm statistics change)."""
    shapes = {call.name: call.output.shape for call in _trace(model, x) if call.output is not None}
    return [shapes[name] for name in names]


def conv_norm_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Conv2d, nn.Module | None]]:
    """Every `nn.Conv2d` that runs on the float images `x`, with the normalisation layer that reads
    its output directly (the very tensor, unchanged in between), or None where something else does
    (a residual sum, an activation, a permutation to channels-last). Found by tracing one pass."""
    calls = _trace(model, x)
    produced = {id(c.output): c for c in calls if isinstance(c.module, nn.Conv2d) and c.output is not None}
    reader: dict[int, nn.Module] = {}
    for call in calls:
        source = produced.get(id(call.input)) if isinstance(call.module, _NORMS) else None
        if source is not None and source.output is call.input and source.output_version == call.input_version:
            reader[id(source.module)] = call.module
    seen: dict[int, tuple[nn.Conv2d, nn.Module | None]] = {}
    for call in calls:
        if isinstance(call.module, nn.Conv2d) and id(call.module) not in seen:
            seen[id(call.module)] = (call.module, reader.get(id(call.module)))
    return list(seen.values())


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


@contextmanager
def capture_outputs(model: nn.Module, names: list[str]) -> Iterator[list[list[torch.Tensor]]]:
    """`capture` for several submodules of `model`, named as in `model.named_modules()`: one list of
    outputs per name, in the order of `names`."""
    with ExitStack() as stack:
        yield [stack.enter_context(capture(model.get_submodule(name))) for name in names]


def _hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


_TWICE_DIFFERENTIABLE = {
    nn.Hardsigmoid: _hard_sigmoid,
    nn.Hardswish: lambda x: x * _hard_sigmoid(x),
}


@contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` computes the same function with operations that have second derivatives
    (for hypergradients and other Hessian-vector products): hard-sigmoid and hard-swish as ReLU6
    compositions (PyTorch's fused kernels have no double backward, nor in place), and attention with the
    plain-math kernel (flash attention has none)."""
    patched = [m for m in model.modules() if type(m) in _TWICE_DIFFERENTIABLE]
    for module in patched:
        module.forward = _TWICE_DIFFERENTIABLE[type(module)]  # an instance attribute shadows the class method
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield model
    finally:
        for module in patched:
            del module.forward


@torch.no_grad()
def read_activations(model: nn.Module, x: torch.Tensor, layer: Literal["penultimate", "feature_map"],
                     batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """Activations of uint8 images (N, C, H, W) at `layer`, as float32 on the CPU, model in eval mode.

    `penultimate`: (N, D), the input of the classification layer. `feature_map`: (N, C', H', W'),
    the final spatial feature map.
    """
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    module: nn.Module
    which: Literal["input", "output"]
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
    module = feature_map_layer(model, x[:1].to(device))
    maps = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        cb = classes[start:start + batch_size].to(device)
        with capture(module, "output") as seen, torch.enable_grad():
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
