"""Deployed precisions: each maps a trained FP32 model (plus calibration images from the
defender's clean budget, where a scheme needs them) to the model as it is deployed.

Motivation: "Quantization Blindspots" (arXiv 2512.06243) reported that INT8 and INT4 deployment
silently breaks backdoor defenses. Part of that came from the tooling: PyTorch's dynamic
quantization only touches `nn.Linear`, a dynamically quantized layer passes no gradient to its
input, and exceptions were counted as "not detected". So every precision here says exactly which
layers it quantizes, and, where the deployed model is not an ordinary differentiable float network,
offers a straight-through twin (`Deployed.twin`): a float network with the deployed weights, whose
activation rounding (if any) is passed straight through, on which gradient-based defenses can run.

Precisions:
- `fp32`: the trained model.
- `int8-dynamic`: `torch.ao.quantization.quantize_dynamic` on `nn.Linear` (int8 per-tensor weights,
  activations quantized per batch at run time); convolutions stay FP32.
- `int8-static`: FX-graph post-training static quantization of convolutions and linear layers (and
  whatever else the x86/fbgemm backend fuses) with activation ranges calibrated on the clean budget.
- `int8-sim`, `int4-sim`: BatchNorm folded into the convolution before it (where one directly
  precedes it), then every Conv/Linear weight fake-quantized symmetric per output channel
  (PyTorch's scheme: scale = max|w| / ((2^b - 1) / 2), integers in [-2^(b-1), 2^(b-1) - 1]).
- `int4-sim-tensor`: the study's scheme: every weight tensor (convolutions, linear layers and the
  BatchNorm scales) rounded per tensor, asymmetric, to 16 levels between its min and max; biases
  untouched; nothing folded.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from bdbench.registry import Registry

_QUANTIZABLE = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Deployed:
    """A model as deployed: the model, which layers were quantized, and its straight-through twin
    (None where `model` itself is an ordinary float network with its deployed weights)."""

    model: nn.Module
    quantized_layers: str
    twin: nn.Module | None = None


@dataclass(frozen=True)
class Precision:
    """A registered precision: `deploy(model, calibration_x)` with `calibration_x` uint8 images."""

    description: str
    deploy: Callable[[nn.Module, torch.Tensor], Deployed]


PRECISIONS: Registry[Precision] = Registry("precision")


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it moves to torchao (the API still works) and that its
    kernels have no backward (which passes_input_gradient checks for itself)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torchao.*")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated")
        # What passes_input_gradient detects: int8 kernels have no backward.
        warnings.filterwarnings("ignore", message=r".*an autograd kernel was not registered")
        yield


def is_int8_kernel(module: nn.Module) -> bool:
    """Whether `module` is one of torch.ao's quantized layers (packed int8 weights, read by `weight()`)."""
    return type(module).__module__.startswith("torch.ao.nn") and callable(getattr(module, "weight", None))


def _count(modules: Sequence[nn.Module]) -> str:
    """'Conv2d x20, Linear x1': the types of the quantized layers and how many of each."""
    counts = Counter(type(m).__name__ for m in modules)
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())) or "none"


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with each BatchNorm that directly follows a convolution folded
    into it (an FX graph rewrite; BatchNorms after anything else, as in pre-activation blocks, stay).

    Models that FX cannot trace are returned unfolded (a copy), which the layer count then shows.
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        return fuse(model, inplace=True)
    except Exception:  # untraceable control flow: keep every BatchNorm as it is
        return model


def fake_quantize_per_channel(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel rounding of `weight` to `bits`-bit integers, dequantized."""
    levels = 2 ** bits - 1
    amax = weight.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
    scale = (amax / (levels / 2)).view(-1, *([1] * (weight.ndim - 1)))
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(weight / scale), low, high) * scale


def fake_quantize_per_tensor_asymmetric(weight: torch.Tensor, levels: int = 16) -> torch.Tensor:
    """Rounding of every value of `weight` to `levels` evenly spaced values from its min to its max."""
    low, high = weight.min(), weight.max()
    if high <= low:
        return weight.clone()
    scale = (high - low) / (levels - 1)
    return torch.round((weight - low) / scale) * scale + low


@torch.no_grad()
def _weights_per_channel(model: nn.Module, bits: int) -> Deployed:
    folded = fold_batchnorm(model)
    layers = [m for m in folded.modules() if isinstance(m, _QUANTIZABLE)]
    for layer in layers:
        layer.weight.copy_(fake_quantize_per_channel(layer.weight, bits))
    return Deployed(folded, _count(layers))


def _int8_sim(model: nn.Module, calibration_x: torch.Tensor) -> Deployed:
    return _weights_per_channel(model, 8)


def _int4_sim(model: nn.Module, calibration_x: torch.Tensor) -> Deployed:
    return _weights_per_channel(model, 4)


@torch.no_grad()
def _int4_sim_tensor(model: nn.Module, calibration_x: torch.Tensor) -> Deployed:
    model = copy.deepcopy(model).eval()
    layers = [m for m in model.modules()
              if isinstance(m, _QUANTIZABLE + _NORMS) and getattr(m, "weight", None) is not None]
    for layer in layers:
        layer.weight.copy_(fake_quantize_per_tensor_asymmetric(layer.weight, 16))
    return Deployed(model, _count(layers))


def _fp32(model: nn.Module, calibration_x: torch.Tensor) -> Deployed:
    return Deployed(copy.deepcopy(model), "none")


@torch.no_grad()
def _int8_dynamic(model: nn.Module, calibration_x: torch.Tensor) -> Deployed:
    twin = copy.deepcopy(model).eval()  # stays on the model's device, for the defenses
    with _quiet():  # the quantized kernels run on the CPU only
        from torch.ao.quantization import quantize_dynamic

        deployed = quantize_dynamic(copy.deepcopy(twin).cpu(), {nn.Linear}, dtype=torch.qint8)
    quantized = dict(deployed.named_modules())
    layers = []
    for name, layer in twin.named_modules():
        if isinstance(layer, nn.Linear) and not isinstance(quantized.get(name), nn.Linear):
            layer.weight.copy_(quantized[name].weight().dequantize())  # exactly the int8 weights served
            layers.append(layer)
    return Deployed(deployed, _count(layers), twin=twin)


@torch.no_grad()
def _int8_static(model: nn.Module, calibration_x: torch.Tensor) -> Deployed:
    torch.backends.quantized.engine = "x86"
    example = calibration_x[:1].float().div(255.0)
    with _quiet():  # the quantized kernels run on the CPU only
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(model).eval().cpu(), get_default_qconfig_mapping("x86"), (example,))
        for start in range(0, len(calibration_x), 256):
            prepared(calibration_x[start:start + 256].float().div(255.0))
        deployed = convert_fx(prepared)
    quantized = [m for m in deployed.modules() if is_int8_kernel(m)]
    # The twin: the same per-channel int8 weights with BatchNorm folded (what the x86 backend
    # stores); activation rounding is passed straight through.
    return Deployed(deployed, _count(quantized), twin=_weights_per_channel(model, 8).model)


def _register(name: str, description: str, deploy: Callable[[nn.Module, torch.Tensor], Deployed]) -> None:
    PRECISIONS.register(name, description)(Precision(description, deploy))


_register("fp32", "full precision: the trained model as it is", _fp32)
_register("int8-dynamic", "PyTorch dynamic quantization: nn.Linear weights int8 per tensor, activations quantized "
          "per batch; convolutions stay FP32", _int8_dynamic)
_register("int8-static", "FX post-training static int8 quantization (x86/fbgemm) of convolutions and linear layers, "
          "activation ranges calibrated on the clean budget", _int8_static)
_register("int8-sim", "BatchNorm folded into the preceding convolution, Conv/Linear weights rounded to int8 "
          "symmetric per output channel; activations FP32", _int8_sim)
_register("int4-sim", "BatchNorm folded into the preceding convolution, Conv/Linear weights rounded to int4 "
          "symmetric per output channel; activations FP32", _int4_sim)
_register("int4-sim-tensor", "Quantization Blindspots' scheme: every weight tensor (Conv, Linear, norm scales) "
          "rounded per tensor, asymmetric, to 16 levels; biases untouched; nothing folded", _int4_sim_tensor)


def passes_input_gradient(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether `model` gives float images `x` a non-zero, finite gradient (what input-optimising
    defenses such as Neural Cleanse need). Any failure to differentiate counts as no gradient."""
    x = x.detach().to(_device(model)).clone().requires_grad_(True)
    try:
        with torch.enable_grad(), _quiet():
            out = model(x)
            if not out.requires_grad:
                return False
            grad, = torch.autograd.grad(out.float().logsumexp(1).sum(), x, allow_unused=True)
    except RuntimeError:
        return False
    return grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
