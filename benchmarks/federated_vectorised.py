"""Benchmark: one federated round's local training, all clients as one vectorised computation against one
client at a time.

Both paths train the same clients from the same global weights on the same batches with the same augmentation
(`bdbench.federated.clients`; a test holds their results equal): the vectorised one stacks the clients' weights
and runs one forward pass through `torch.func.vmap(functional_call)` and one backward pass per step for all
clients, the other runs each client's steps with ordinary autograd. Runs alternate (vectorised, one at a time,
...) after one untimed warm-up of each, so that load from other processes falls on both alike. Prints images per
second of each and the ratio.

    python benchmarks/federated_vectorised.py [--dataset mnist5k] [--clients 40] [--width 8] [--norm group]
                                              [--pool 1] [--batch 64] [--steps 4] [--repeats 2] [--threads N]
                                              [--device cpu]

`--dataset` is a built-in name or an .npz file (the `federated` grid's model and data:
`--dataset ../shared/data/gtsrb32.npz --width 8 --pool 4`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bdbench.data import load_dataset
from bdbench.federated.clients import ClientPlan, ClientTrainer, LocalSGD
from bdbench.federated.split import split_iid
from bdbench.models import create_model, with_normalization


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k", help="a built-in data set's name or an .npz file")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--width", type=float, default=8)
    parser.add_argument("--norm", default="group")
    parser.add_argument("--pool", type=int, default=1, help="cnn-small's pooled grid side before its head")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="local steps per client (a round's share of them)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_dataset("npz", path=args.dataset) if args.dataset.endswith(".npz") else load_dataset(args.dataset)
    width = int(args.width) if args.model == "cnn-small" else args.width
    options = {"width": width, **({"norm": args.norm, "pool": args.pool} if args.model == "cnn-small" else {})}
    torch.manual_seed(0)
    net = with_normalization(create_model(args.model, data.num_classes, data.in_channels, data.image_size, **options),
                             data.mean, data.std)
    weights = {n: p.detach().unsqueeze(0).expand(args.clients, *p.shape).clone() for n, p in net.named_parameters()}
    local = LocalSGD(1, args.batch, 0.1, weight_decay=1e-4, crop_padding=data.crop_padding, hflip=data.allow_hflip)
    shares = split_iid(data.y_train, args.clients, seed=0)
    plans = [ClientPlan.draw(share, local, seed) for seed, share in enumerate(shares)]
    plans = [ClientPlan(p.batches[:args.steps], p.offsets[:args.steps], p.flips[:args.steps]) for p in plans]
    if min(p.steps for p in plans) < args.steps:
        raise SystemExit(f"{args.clients} clients of {args.dataset} have fewer than {args.steps} batches of "
                         f"{args.batch}; lower --clients, --batch or --steps")
    trainer = ClientTrainer(net, data.x_train, data.y_train, device)
    images = args.clients * args.steps * args.batch

    def timed(vectorised: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train(weights, plans, local, vectorised=vectorised)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(True), timed(False)  # warm-up
    together, apart = [], []
    for _ in range(args.repeats):
        together.append(timed(True))
        apart.append(timed(False))
    t, a = statistics.median(together), statistics.median(apart)
    print(f"{args.model} (width {width}, norm {args.norm}, pool {args.pool}) on {args.dataset}, {args.clients} clients x {args.steps} "
          f"steps of {args.batch} on {device} with {torch.get_num_threads()} torch thread(s):")
    print(f"  vectorised        {images / t:9.0f} images/s ({t:.2f} s)")
    print(f"  one at a time     {images / a:9.0f} images/s ({a:.2f} s)")
    print(f"  vectorised / one at a time: {a / t:.2f}x")


if __name__ == "__main__":
    main()
