"""The one in-memory data set type: uint8 image tensors plus the facts trainers and attacks need."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images as uint8 tensors of shape (N, C, H, W) with int64 labels, split into train and test.

    `mean`/`std` are per-channel statistics in [0, 1] units used by the model's input
    normalisation; `allow_hflip` says whether horizontal flips keep a label's meaning
    (never for digits or traffic signs); `crop_padding` is the random-crop padding.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    allow_hflip: bool = False
    crop_padding: int = 2

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: x_{split} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: y_{split} must be int64 of length {x.shape[0]}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
            f"{self.in_channels}x{self.image_size}x{self.x_train.shape[3]}, {self.num_classes} classes"
        )


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units.

    Summed in chunks, so that a large data set never needs a float64 copy of itself.
    """
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), chunk):
        xf = x[start:start + chunk].to(torch.float64).div_(255.0)
        total += xf.sum(dim=(0, 2, 3))
        squares += xf.square_().sum(dim=(0, 2, 3))
    count = x.numel() // x.shape[1]
    mean = total / count
    # Unbiased, as torch.std: sum((x - mean)^2) / (count - 1).
    variance = (squares - count * mean.square()) / max(1, count - 1)
    std = variance.clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
