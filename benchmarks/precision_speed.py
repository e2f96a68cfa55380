"""CPU inference speed of each deployed precision against FP32, on the same model and images.

The model is trained for one epoch on random images first so that BatchNorm statistics and
calibration ranges are not degenerate; speed does not depend on accuracy. Precisions and FP32 are
timed alternately, `--rounds` times each, and the ratio uses the median of each, so that load drift
on a shared machine hits both sides alike. Inference runs on the CPU (int8 kernels have no CUDA
path here) with the process's torch threads.

    .venv/bin/python benchmarks/precision_speed.py [--model preact-resnet18] [--images 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bdbench.models import create_model, with_normalization
from bdbench.precision import PRECISIONS
from bdbench.training import TrainConfig, predict, train


def seconds_to_predict(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    predict(model, x, batch_size=128)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preact-resnet18")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", default="int8-static,int8-dynamic,int8-sim")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, 10, (args.images,), generator=generator)
    torch.manual_seed(0)
    fp32 = with_normalization(create_model(args.model, 10, 3, 32), (0.5,) * 3, (0.25,) * 3)
    fp32 = train(fp32, x, y, TrainConfig(epochs=1, batch_size=128), seed=0, device=torch.device("cpu"))
    print(f"CPU inference, {args.model} at 32x32x3, {args.images} images in batches of 128, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds; torch {torch.__version__}")
    print(f"| {'precision':<16} | {'img/s':>8} | {'fp32 img/s':>10} | {'speed-up':>8} | quantized layers")
    print(f"|{'-' * 18}|{'-' * 9}:|{'-' * 11}:|{'-' * 9}:|---")
    for name in args.precisions.split(","):
        deployed = PRECISIONS.get(name).deploy(fp32, x[:256])
        seconds_to_predict(deployed.model, x[:128])  # warm-up: kernel selection, packing
        seconds_to_predict(fp32, x[:128])
        ours, reference = [], []
        for _ in range(args.rounds):
            ours.append(seconds_to_predict(deployed.model, x))
            reference.append(seconds_to_predict(fp32, x))
        rate, base = args.images / statistics.median(ours), args.images / statistics.median(reference)
        print(f"| {name:<16} | {rate:>8.0f} | {base:>10.0f} | {rate / base:>7.2f}x | {deployed.quantized_layers}")


if __name__ == "__main__":
    main()
