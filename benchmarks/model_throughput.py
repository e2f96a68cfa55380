"""Training throughput of every registered model at 32x32x3, 10 classes, default width.

Each model trains through the one trainer (`bdbench.training.train`: batch augmentation, SGD)
on random uint8 images: one warm-up call, then `--steps` timed steps of `--batch-size`. cnn-small
is timed again right before each model, and the ratio is to that neighbouring measurement, so a
machine whose load drifts during the run (a shared one) skews the ratios less than the rates.

    .venv/bin/python benchmarks/model_throughput.py [--steps 3] [--batch-size 128] [--models a,b]
"""

from __future__ import annotations

import argparse
import time

import torch

from bdbench.models import MODELS, count_parameters, create_model
from bdbench.training import TrainConfig, default_device, train


def images_per_second(name: str, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(name, 10, 3, 32)
    generator = torch.Generator().manual_seed(0)

    def run(n_steps: int) -> float:
        n = batch_size * n_steps
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        y = torch.randint(0, 10, (n,), generator=generator)
        config = TrainConfig(epochs=1, batch_size=batch_size, schedule="constant", lr=0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train(model, x, y, config, seed=0, crop_padding=4, hflip=True, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(warmup)  # first calls pay for kernel selection and allocation
    return batch_size * steps / run(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS.names()))
    args = parser.parse_args()
    device = default_device()
    names = ["cnn-small"] + [n for n in args.models.split(",") if n != "cnn-small"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"training throughput at 32x32x3, 10 classes, batch {args.batch_size}, "
          f"{args.steps} steps after {args.warmup} warm-up; {where}; torch {torch.__version__}")
    print(f"| {'model':<18} | {'parameters':>11} | {'train img/s':>11} | {'cnn-small img/s':>15} | {'ratio':>6} |")
    print(f"|{'-' * 20}|{'-' * 12}:|{'-' * 12}:|{'-' * 16}:|{'-' * 7}:|")
    for name in names:
        reference = images_per_second("cnn-small", args.batch_size, args.steps, args.warmup, device)
        rate = reference if name == "cnn-small" else images_per_second(name, args.batch_size, args.steps,
                                                                      args.warmup, device)
        print(f"| {name:<18} | {count_parameters(name):>11,d} | {rate:>11.1f} | {reference:>15.1f} | "
              f"{rate / reference:>6.3f} |", flush=True)


if __name__ == "__main__":
    main()
