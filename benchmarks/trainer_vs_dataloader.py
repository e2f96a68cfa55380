"""Benchmark 1: bdbench's trainer against a plain PyTorch DataLoader loop with per-sample transforms.

The baseline trains the way the older toolkits do: a `Dataset` whose `__getitem__` turns one
uint8 image into a PIL image, pads and randomly crops it, converts it to a float tensor, and a
`DataLoader` collates batches (num_workers 0 and 2), in float32. bdbench's `train` keeps the data
set as one uint8 tensor and augments whole batches; it is timed with its CPU fast path
(`cpu_bfloat16`: channels-last under bfloat16 autocast, which pays on CPUs with native bfloat16)
and without it (float32, the CPU default), to show what the batching alone gives. Both train the same model from the same
initial weights with the same optimiser, schedule, batch size and epochs; runs alternate (ours,
baseline, ...) after one untimed warm-up run of each, so that load from other processes falls on
both alike. Prints images per second and the ratio.

    python benchmarks/trainer_vs_dataloader.py [--epochs 2] [--repeats 2] [--threads N] [--subset 4000] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from bdbench.data import Dataset, load_dataset
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, _scheduler, cpu_has_native_bfloat16, train

GTSRB32 = Path(__file__).resolve().parents[2] / "shared" / "data" / "gtsrb32.npz"


class PerSampleImages(TorchDataset):
    """Images as HWC uint8 arrays, transformed one at a time as a torchvision pipeline would:
    PIL image -> RandomCrop(size, padding) -> (horizontal flip) -> ToTensor."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, padding: int, hflip: bool) -> None:
        self.images = x.permute(0, 2, 3, 1).numpy()
        self.labels = y.numpy()
        self.padding, self.hflip = padding, hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        array = self.images[i]
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        size = image.size[0]
        if self.padding:
            image = ImageOps.expand(image, self.padding, fill=0)
            top, left = np.random.randint(0, 2 * self.padding + 1, size=2)
            image = image.crop((left, top, left + size, top + size))
        if self.hflip and np.random.rand() < 0.5:
            image = ImageOps.mirror(image)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(pixels.reshape(size, size, -1)).permute(2, 0, 1).contiguous()
        return tensor, int(self.labels[i])


def dataloader_train(model: torch.nn.Module, data: Dataset, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                     num_workers: int, device: torch.device) -> None:
    """The baseline loop: same optimiser, schedule, batch size and epochs as `bdbench.training.train`; the
    batches are collated on the CPU and moved to `device`, in float32."""
    model.to(device)
    loader = DataLoader(PerSampleImages(x, y, data.crop_padding, data.allow_hflip), batch_size=config.batch_size,
                        shuffle=True, drop_last=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    scheduler = _scheduler(optimizer, config, config.epochs * len(loader))
    model.train()
    for _ in range(config.epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def workloads(subset: int) -> list[tuple[str, Dataset, str, dict]]:
    found = [("cnn-small on mnist5k", load_dataset("mnist5k"), "cnn-small", {})]
    if GTSRB32.is_file():
        gtsrb, name = load_dataset("npz", path=str(GTSRB32)), f"gtsrb32 (first {subset} training images)"
    else:
        gtsrb, name = synthetic_32x32(subset), f"synthetic 32x32x3 ({subset} images; {GTSRB32} absent)"
    found.append((f"preact-resnet18 width 0.25 on {name}", gtsrb, "preact-resnet18", {"width": 0.25}))
    return found


def synthetic_32x32(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 43, (n,), generator=g)
    return Dataset("synthetic32", x, y, x[:100], y[:100], tuple(map(str, range(43))), (0.5,) * 3, (0.25,) * 3,
                   allow_hflip=False, crop_padding=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--subset", type=int, default=4000, help="training images of the 32x32 set")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides train there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05)
    print(f"{args.epochs} epochs, batch 128, {args.threads} torch threads, median of {args.repeats} alternating runs, "
          f"on {device}; this CPU {'has' if cpu_has_native_bfloat16() else 'lacks'} native bfloat16")
    for title, data, model_name, options in workloads(args.subset):
        x, y = data.x_train[:args.subset], data.y_train[:args.subset]
        images = config.epochs * (len(x) // config.batch_size) * config.batch_size

        def fresh() -> torch.nn.Module:
            torch.manual_seed(0)
            net = create_model(model_name, data.num_classes, data.in_channels, data.image_size, **options)
            return with_normalization(net, data.mean, data.std)

        def bdbench(bf16: bool) -> None:
            train(fresh(), x, y, config.model_copy(update={"cpu_bfloat16": bf16}), seed=0,
                  crop_padding=data.crop_padding, hflip=data.allow_hflip, device=device)

        # On CUDA the trainer always runs bfloat16 autocast, channels-last (`trains_in_bfloat16`): one variant.
        ours = {"bdbench, bfloat16 autocast": lambda: bdbench(True)} if device.type == "cuda" else {
            "bdbench, cpu_bfloat16": lambda: bdbench(True), "bdbench, float32": lambda: bdbench(False)}
        runs = {
            **ours,
            "DataLoader, num_workers=0": lambda: dataloader_train(fresh(), data, x, y, config, 0, device),
            "DataLoader, num_workers=2": lambda: dataloader_train(fresh(), data, x, y, config, 2, device),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for run in runs.values():  # one untimed warm-up of each (oneDNN picks and caches its kernels)
            run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
        rate = {name: images / statistics.median(s) for name, s in seconds.items()}
        print(f"\n{title}: {len(x)} training images")
        for name, r in rate.items():
            print(f"  {name:<27} {r:8.1f} images/s   (runs: {', '.join(f'{s:.1f}s' for s in seconds[name])})")
        for mine in ours:
            for name in runs:
                if name.startswith("DataLoader"):
                    print(f"  ratio {mine} / {name}: {rate[mine] / rate[name]:.2f}x")


if __name__ == "__main__":
    main()
