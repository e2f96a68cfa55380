"""Benchmark: rounds of the built-in `federated` grid's federation (FedAvg, no attack) with its clients trained in
this process against on Ray workers (`federated.client_workers`), and what Ray adds.

Trains the same rounds both ways from the same global weights and checks the weights agree bit for bit after
each. For the Ray side it times starting the local cluster, putting the training tensor and template into the
object store, and each round (the first includes the workers' start: importing torch and bdbench, fetching the
training tensor); CPU seconds are read from /proc for this process and all its descendants (Ray's daemons and
workers), so the difference to the in-process round's CPU seconds is Ray's overhead whatever else loads the
machine. Prints one line per phase.

    python benchmarks/federated_ray_clients.py [--grid federated] [--set KEY=VALUE ...] [--workers 2]
                                               [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bdbench.data import load_dataset
from bdbench.experiment import new_model
from bdbench.federated.aggregation import SERVER_DEFENSES
from bdbench.federated.clients import ClientTrainer, LocalSGD
from bdbench.federated.ray_clients import RayClients
from bdbench.federated.simulation import Federation, client_shares
from bdbench.grid import expand, load_grid
from bdbench.ray_support import import_ray, ray_cluster


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every live descendant (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    family, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in family]
        family.update(frontier)
    return sum(times.get(pid, 0.0) for pid in family)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="federated")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = next(s for s in expand(load_grid(args.grid, args.overrides))
                if s.attack.name == "none" and s.federated is not None and s.federated.server_defense.name == "fedavg")
    config = spec.federated
    assert config is not None
    config = config.model_copy(update={"vectorised": False})
    data = load_dataset(spec.dataset.name, **spec.dataset.params)
    shares = client_shares(data.y_train, config, spec.seed)
    local = LocalSGD(config.local_epochs, config.batch_size, config.client_lr, config.client_momentum,
                     config.weight_decay, data.crop_padding, data.allow_hflip)
    template = new_model(spec, data, "victim_init")
    values = sum(p.numel() for p in template.parameters())
    print(f"{config.clients} clients of {data.name} ({len(data.y_train)} images), {spec.model.name} "
          f"{spec.model.params} ({values} weights), {config.local_epochs} local epochs of batch {config.batch_size}, "
          f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores, affinity {sorted(os.sched_getaffinity(0))}")

    def federation() -> Federation:
        return Federation(config, SERVER_DEFENSES.build("fedavg"), template, spec.seed, torch.device("cpu"))

    trainer = ClientTrainer(template, data.x_train, data.y_train, torch.device("cpu"))
    here, reference = federation(), []
    for r in range(args.rounds):
        wall, cpu = time.perf_counter(), tree_cpu_seconds()
        here.run_round(trainer, shares, local)
        reference.append({n: w.clone() for n, w in here.weights.items()})
        print(f"in-process round {r + 1}: {time.perf_counter() - wall:7.1f} s wall, "
              f"{tree_cpu_seconds() - cpu:7.1f} CPU s")

    ray = import_ray("the benchmark")
    wall, cpu = time.perf_counter(), tree_cpu_seconds()
    with ray_cluster(ray, None, args.workers * args.threads):
        print(f"Ray start ({args.workers} CPUs): {time.perf_counter() - wall:7.1f} s wall, "
              f"{tree_cpu_seconds() - cpu:7.1f} CPU s (all Ray processes)")
        wall, cpu = time.perf_counter(), tree_cpu_seconds()
        clients = RayClients(ray, trainer, args.workers, args.threads)
        sent = data.x_train.numel() + data.y_train.numel() * 8
        print(f"object store put of the training tensor, labels and template ({sent / 2**20:.0f} MiB): "
              f"{time.perf_counter() - wall:7.2f} s wall, {tree_cpu_seconds() - cpu:7.2f} CPU s")
        there = federation()
        for r in range(args.rounds):
            wall, cpu = time.perf_counter(), tree_cpu_seconds()
            there.run_round(clients, shares, local)
            same = all(torch.equal(there.weights[n], reference[r][n]) for n in there.names)
            print(f"Ray round {r + 1} ({args.workers} tasks of {config.per_round // args.workers} clients, "
                  f"{2 * config.per_round * values * 4 / 2**20:.1f} MiB of weights out and back): "
                  f"{time.perf_counter() - wall:7.1f} s wall, {tree_cpu_seconds() - cpu:7.1f} CPU s; "
                  f"weights {'bit for bit equal to' if same else 'DIFFERENT from'} in-process")
        wall, cpu = time.perf_counter(), tree_cpu_seconds()
    print(f"Ray shutdown: {time.perf_counter() - wall:7.1f} s wall")


if __name__ == "__main__":
    main()
