"""Benchmark: several seeds of one victim architecture trained as one vectorised computation against one
seed at a time (issue 26).

The baseline is bdbench's trainer (`training.train`), run once per seed. The vectorised path
(`train_seeds_vectorised`) stacks the K models' weights and BatchNorm buffers along a leading seed axis
(`torch.func.stack_module_state`), runs one forward pass of all seeds through
`torch.func.vmap(functional_call)` and one backward pass of the summed losses per step (each seed's loss
depends on its own weights only, so each seed gets its own gradient; the federated clients do the same), and
steps one `torch.optim.SGD` (nesterov momentum, weight decay) with the trainer's schedule over the stacked
weights: SGD is elementwise and the schedule is the same for every seed, so that is each seed's own step.
BatchNorm's running statistics are stacked buffers, updated in place under vmap, one row per seed. Each seed
draws its batch order and augmentation from its own generator, in the trainer's order and with the trainer's
`augment_batch`, so seed s of the stack computes what `train(..., seed=s)` computes: the benchmark prints the
largest weight (and buffer) difference between the two paths, and `tests/test_vectorised_seeds.py` holds it
under float tolerance.

Cases: `cnn-small` (BatchNorm, width 32 and 16) on 28x28x1 mnist5k images and `preact-resnet18` width 0.25 on
32x32x3 images (gtsrb32 from `--data`, else random images of that shape), batch 128, K seeds (default 3
and 8), T steps (default 5) after one untimed warm-up of each path, in float32 and in bfloat16 autocast (the
trainer's `cpu_bfloat16` path: channels-last under autocast; the vectorised path runs under autocast in the
default layout, as vmap's batched convolution regroups the seeds into the channels anyway). Runs alternate
(vectorised, one at a time, ...) `--repeats` times, so load from other processes falls on both alike. Prints
model-steps per second (K x T / seconds) of each path, their ratio, and the process CPU seconds of each (the
figure to compare on a loaded core), and the largest difference of the trained weights.

Measured on this project's 2-core machine (Intel, AVX-512 with AVX512-BF16, torch 2.13.0+cpu) on 2026-12-02,
core 1 only, one torch thread; core 1 was shared with three to four other jobs (load average 11-17 on 2 cores,
wall times 5-9x the CPU seconds), so the CPU seconds are what to compare; 2 threads could not be measured, as
core 0 runs other long measurements. One at a time / vectorised in process CPU seconds (above 1 would mean
vectorised is faster), batch 128, cnn-small on mnist5k, PreAct-ResNet18 on gtsrb32:

    case (steps per seed, runs)            seeds  float32  bfloat16   CPU s per model-step, float32
    cnn-small width 32 (3 steps, 2 runs)     3     0.52x    0.31x     0.27 one at a time, 0.52 vectorised
                                             8     0.32x    0.16x     0.27 one at a time, 0.84 vectorised
    cnn-small width 16 (3 steps, 1 run)      3     0.72x    0.37x     0.11 one at a time, 0.15 vectorised
                                             8     0.55x    0.23x     0.12 one at a time, 0.21 vectorised
    preact-resnet18 w 0.25 (2 steps, 1 run)  3     0.78x    0.42x     0.52 one at a time, 0.67 vectorised
                                             8     0.47x    0.26x     0.58 one at a time, 1.23 vectorised

Largest weight or buffer difference between the paths: 2.5e-6 to 8.6e-6 (cnn-small) and 7.2e-5 (PreAct, on a
BatchNorm running variance near 1) in float32; 1.3e-3 to 1.3e-2 in bfloat16, whose rounding differs between a
grouped and a plain convolution.

Vectorised seeds do not pay on this CPU, and pay less the more seeds are stacked. A profile of cnn-small
(width 16, 3 seeds, float32) showed the convolutions costing about the same either way (vmap runs the K seeds'
convolutions as one grouped convolution with K groups); what the stack adds is BatchNorm's batching rule
(per-seed statistics through extra multiplications and copies), max pooling, and the copies that move the seed
axis into the channels and back around every layer. In bfloat16 the trainer's one-at-a-time path runs
channels-last on the CPU's native bfloat16 kernels and is 1.8-2.3x as fast as in float32, while the stacked
path gains little (0.95-1.28x its float32 speed), hence the lower ratios. Where stacking should
pay is a GPU, whose kernels a step of one small model (cnn-small, PreAct-ResNet18 at width 0.25, batch 128)
leaves mostly idle; that is not measured yet (`--device cuda`, run by `gpu_check.py`). Hence the trainer trains
one seed at a time.

    python benchmarks/vectorised_seeds.py [--cases cnn32,cnn16,preact] [--seeds 3,8] [--steps 5] [--repeats 2]
                                          [--dtypes float32,bfloat16] [--threads 1] [--device cpu] [--data PATH]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from bdbench.data import load_dataset
from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, _scheduler, augment_batch, train, trains_in_bfloat16

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gtsrb32.npz"
RANDOM_LAYERS = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


def train_seeds_vectorised(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, config: TrainConfig, *,
                           seeds: list[int], crop_padding: int = 0, hflip: bool = False,
                           device: torch.device | None = None) -> list[nn.Module]:
    """`train(models[k], x, y, config, seed=seeds[k], ...)` for every k, as one vectorised computation; trains the
    models in place and returns them in eval mode. The K models must share one architecture. Without the
    trainer's `hook` and `loss_fn` (attacks that change batches, defenses' objectives), and without random
    layers (the trainer seeds those from the global generator, which one vmapped pass cannot split by seed)."""
    if len(models) != len(seeds) or not models:
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds; give one seed per model")
    if any(isinstance(m, RANDOM_LAYERS) for model in models for m in model.modules()):
        raise ValueError("a model with dropout cannot be trained vectorised here; train it with training.train")
    device = device or torch.device("cpu")
    crop_padding = config.crop_padding if config.crop_padding is not None else crop_padding
    hflip = config.hflip if config.hflip is not None else hflip
    bf16 = trains_in_bfloat16(config, device)
    for model in models:
        model.to(device).train()
    stacked, buffers = stack_module_state(models)
    params = {name: p.detach().to(device).requires_grad_(True) for name, p in stacked.items()}
    buffers = {name: b.to(device) for name, b in buffers.items()}
    template = copy.deepcopy(models[0]).to("meta")

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor,
             yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(template, (p, b), (xb,)), yb)

    losses = vmap(loss)
    x_dev, y_dev = x.to(device), y.to(device)
    n = len(x_dev)
    batch_size = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    optimizer = torch.optim.SGD(list(params.values()), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    scheduler = _scheduler(optimizer, config, config.epochs * steps_per_epoch)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for _ in range(config.epochs):
        orders = [torch.randperm(n, generator=g).to(device) for g in generators]
        for step in range(steps_per_epoch):
            batches = [order[step * batch_size:(step + 1) * batch_size] for order in orders]
            xb = torch.stack([augment_batch(x_dev[idx].float().div_(255.0), crop_padding, hflip, g)
                              for idx, g in zip(batches, generators)])
            yb = torch.stack([y_dev[idx] for idx in batches])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                total = losses(params, buffers, xb, yb).sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        for k, model in enumerate(models):
            model.load_state_dict({name: t[k] for name, t in {**params, **buffers}.items()})
    return [model.eval() for model in models]


def largest_difference(a: list[nn.Module], b: list[nn.Module]) -> float:
    """The largest absolute difference of any weight or floating-point buffer between paired models."""
    return max(((pa - pb).abs().max().item() for ma, mb in zip(a, b)
                for pa, pb in zip(ma.state_dict().values(), mb.state_dict().values()) if pa.is_floating_point()),
               default=0.0)


@dataclass(frozen=True)
class Case:
    title: str
    model: str
    options: dict
    data: str  # "mnist5k" or "rgb32"


CASES = {
    "cnn32": Case("cnn-small width 32", "cnn-small", {"width": 32}, "mnist5k"),
    "cnn16": Case("cnn-small width 16", "cnn-small", {"width": 16}, "mnist5k"),
    "preact": Case("preact-resnet18 width 0.25", "preact-resnet18", {"width": 0.25}, "rgb32"),
}


def _data(kind: str, path: Path, rows: int):
    """(x, y, num_classes, mean, std, crop_padding, hflip, name) of the first `rows` training images."""
    if kind == "mnist5k":
        ds, name = load_dataset("mnist5k"), "mnist5k"
    elif path.is_file():
        ds, name = load_dataset("npz", path=str(path)), path.stem
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (rows, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (rows,), generator=g)
        return x, y, 10, (0.5,) * 3, (0.25,) * 3, 4, True, f"random 32x32x3 ({path} absent)"
    return (ds.x_train[:rows], ds.y_train[:rows], ds.num_classes, ds.mean, ds.std, ds.crop_padding,
            ds.allow_hflip, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="cnn32,cnn16,preact", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--seeds", default="3,8", help="comma-separated numbers of seeds trained together")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of each seed")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default=None,
                        help="float32, bfloat16 or both (default: both on the CPU, bfloat16 on CUDA, the trainer's only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=SHARED, help="an .npz of 32x32x3 images (gtsrb32)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    dtypes = (args.dtypes or ("bfloat16" if device.type == "cuda" else "float32,bfloat16")).split(",")
    if set(dtypes) - {"float32", "bfloat16"}:
        raise SystemExit(f"--dtypes {args.dtypes!r}: give float32, bfloat16 or both")
    if device.type == "cuda" and "float32" in dtypes:
        raise SystemExit("--dtypes float32 on CUDA: the trainer always trains in bfloat16 autocast there; "
                         "give --dtypes bfloat16")
    print(f"on {device} with {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
          f"{args.steps} steps of batch {args.batch} per seed, median of {args.repeats} alternating runs")
    for case in (CASES[name] for name in args.cases.split(",")):
        x, y, classes, mean, std, padding, hflip, data_name = _data(case.data, args.data, args.steps * args.batch)
        for k in (int(s) for s in args.seeds.split(",")):
            for dtype in dtypes:
                _compare(case, data_name, x, y, classes, mean, std, padding, hflip, k, dtype, args, device)


def _compare(case: Case, data_name: str, x, y, classes, mean, std, padding, hflip, k: int, dtype: str,
             args: argparse.Namespace, device: torch.device) -> None:
    seeds = list(range(k))
    config = TrainConfig(epochs=1, batch_size=args.batch, cpu_bfloat16=dtype == "bfloat16")

    def fresh() -> list[nn.Module]:
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            net = create_model(case.model, classes, x.shape[1], x.shape[2], **case.options)
            models.append(with_normalization(net, mean, std))
        return models

    def one_at_a_time(x, y) -> list[nn.Module]:
        return [train(m, x, y, config, seed=s, crop_padding=padding, hflip=hflip, device=device)
                for m, s in zip(fresh(), seeds)]

    def together(x, y) -> list[nn.Module]:
        return train_seeds_vectorised(fresh(), x, y, config, seeds=seeds, crop_padding=padding, hflip=hflip,
                                      device=device)

    def timed(run) -> tuple[float, float, list[nn.Module]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        models = run(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu, models

    warm = args.batch  # one step of each path, untimed
    together(x[:warm], y[:warm]), one_at_a_time(x[:warm], y[:warm])
    runs: dict[str, list[tuple[float, float]]] = {"vectorised": [], "one at a time": []}
    for _ in range(args.repeats):
        wall, cpu, stacked = timed(together)
        runs["vectorised"].append((wall, cpu))
        wall, cpu, apart = timed(one_at_a_time)
        runs["one at a time"].append((wall, cpu))
    diff = largest_difference([m.cpu() for m in stacked], [m.cpu() for m in apart])
    steps = k * args.steps
    print(f"\n{case.title} on {data_name} ({x.shape[1]}x{x.shape[2]}x{x.shape[3]}), {k} seeds, {dtype}:")
    medians = {}
    for name, values in runs.items():
        wall, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        medians[name] = (wall, cpu)
        print(f"  {name:14s} {steps / wall:7.2f} model-steps/s  ({wall:6.2f} s wall, {cpu:6.2f} CPU s)")
    (tw, tc), (aw, ac) = medians["vectorised"], medians["one at a time"]
    print(f"  {case.title}, {k} seeds, {dtype}: vectorised / one at a time ratio {aw / tw:.2f}x wall, "
          f"{ac / tc:.2f}x CPU seconds; largest weight difference {diff:.2e}")


if __name__ == "__main__":
    main()
