"""Deployed precisions: each maps a trained FP32 model (plus calibration images from the
defender's clean budget, where a scheme needs them) to the model as it is deployed."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from bdbench.registry import Registry

PRECISIONS: Registry[Callable[[nn.Module, torch.Tensor], nn.Module]] = Registry("precision")


@PRECISIONS.register("fp32")
def fp32(model: nn.Module, calibration_x: torch.Tensor) -> nn.Module:
    """Full precision: the trained model as it is (a private copy)."""
    return copy.deepcopy(model)
