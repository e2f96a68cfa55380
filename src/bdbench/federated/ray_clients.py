"""A round's clients trained on Ray workers (`federated.client_workers: N`), for federations too large for one
process: the round's participants, in client order, are cut into N contiguous chunks of nearly equal size, each
chunk is one Ray task that runs `ClientTrainer.train` (or Lockdown's `gradient_sums`) on its clients' start
weights, plans and masks, and the driver puts the chunks' results back together in client order.

Nothing changes a weight: every client's batches and augmentation are drawn beforehand in its `ClientPlan` from its
own seed, and a client's training never reads another client's numbers, so one after another (the CPU default)
every client gets the same float operations as in-process, and the weights are bit for bit the same where the
workers run the same kernels with the same torch thread count (tested). Vectorised clients (`vectorised: true`)
run as one vmap computation per chunk instead of per round, whose batched kernels may sum in another order: equal
to float tolerance. The server side (aggregation, Krum, FLAME, FLTrust's root update, Lockdown's pruning and
consensus) stays in the federation's own process.

What travels: the training tensor (poisoned), its labels and the template model go to Ray's object store once per
federation (`ray.put`); each task gets a reference to them, and a worker process keeps the last federation's
trainer built from them, so it fetches them once, not once per round. Per round each task carries only its
clients' start weights (and masks) there and their trained weights back.

Ray: inside a Ray task (a federated experiment under `--executor ray`) or after the caller's own `ray.init()`,
the tasks go to that cluster; otherwise a local cluster of N x (torch threads) CPUs is started for the federation
and shut down after it. Each task asks for the federation's torch thread count of CPUs and runs with that many
threads; on CUDA it also asks for GPUs / N of a GPU (at most one). Ray releases a waiting task's CPUs but not its
GPU, so under `--executor ray` an experiment keeps its own GPU share while its clients wait for theirs: the
cluster needs GPUs beyond the experiments' shares.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from bdbench.errors import ConfigError
from bdbench.federated.clients import ClientPlan, Clients, ClientTrainer, LocalSGD, Tensors
from bdbench.ray_support import import_ray, ray_cluster

# In a Ray worker process: the trainer of the last federation it trained clients of, by its object's id, so the
# training tensor is fetched and unpickled once per worker and federation. One entry: a new federation replaces it.
_RESIDENT: dict[str, ClientTrainer] = {}


def _run_chunk(shared: list[Any], device_type: str, threads: int, method: str, arguments: tuple) -> Tensors:
    """One Ray task: `ClientTrainer.<method>(*arguments)` on one chunk of clients. `shared` holds the reference to
    (template, x, y, vmap chunk) in a list, so that Ray hands the reference over instead of the value."""
    import ray

    torch.set_num_threads(threads)
    key = shared[0].hex()
    trainer = _RESIDENT.get(key)
    if trainer is None:
        template, x, y, chunk = ray.get(shared[0])
        _RESIDENT.clear()
        trainer = _RESIDENT[key] = ClientTrainer(template, x, y, torch.device(device_type), chunk)
    result = getattr(trainer, method)(*arguments)
    return {n: t.detach().cpu() for n, t in result.items()}


def _rows(stacked: Tensors, first: int, end: int) -> Tensors:
    """Clients first..end-1 of stacked tensors, each in its own storage (a pickled view would carry the whole)."""
    return {n: t[first:end].detach().cpu().clone() for n, t in stacked.items()}


class RayClients:
    """Trains a round's clients as `workers` Ray tasks, with what `trainer` (in this process) holds."""

    def __init__(self, ray: Any, trainer: ClientTrainer, workers: int, threads: int) -> None:
        self._ray, self._trainer, self.workers, self._threads = ray, trainer, workers, threads
        gpus = 0.0
        if trainer.device.type == "cuda":
            available = ray.cluster_resources().get("GPU", 0.0)
            if not available:
                raise ConfigError("the federation trains on CUDA but its Ray cluster has no GPU; start the cluster's "
                                  "nodes with their GPUs, or run on the CPU")
            gpus = min(1.0, available / workers)
        template = copy.deepcopy(trainer.template).cpu()
        self._shared = [ray.put((template, trainer.x.cpu(), trainer.y.cpu(), trainer.chunk))]
        self._task = ray.remote(_run_chunk).options(num_cpus=threads, num_gpus=gpus)

    @property
    def in_process(self) -> ClientTrainer:
        return self._trainer

    def train(self, start: Tensors, plans: list[ClientPlan], config: LocalSGD, masks: Tensors | None = None,
              vectorised: bool = True) -> Tensors:
        """`ClientTrainer.train`, each chunk of clients on a Ray worker."""
        return self._gather(len(plans), lambda a, b: ("train", (_rows(start, a, b), plans[a:b], config,
                                                                None if masks is None else _rows(masks, a, b),
                                                                vectorised)))

    def gradient_sums(self, start: Tensors, plans: list[ClientPlan], vectorised: bool = True) -> Tensors:
        """`ClientTrainer.gradient_sums`, each chunk of clients on a Ray worker."""
        return self._gather(len(plans), lambda a, b: ("gradient_sums", (_rows(start, a, b), plans[a:b], vectorised)))

    def _gather(self, clients: int, call: Callable[[int, int], tuple[str, tuple]]) -> Tensors:
        """Submit one task per chunk of clients first..end-1 (`call(first, end)` gives its method and arguments)
        and concatenate their results in client order."""
        chunks = min(self.workers, clients)
        bounds = [(clients * i // chunks, clients * (i + 1) // chunks) for i in range(chunks)]
        device = self._trainer.device.type
        refs = [self._task.remote(self._shared, device, self._threads, *call(a, b)) for a, b in bounds]
        parts = self._ray.get(refs)
        return {n: torch.cat([part[n] for part in parts]).to(self._trainer.device) for n in self._trainer.names}


@contextmanager
def client_trainer(trainer: ClientTrainer, workers: int | None) -> Iterator[Clients]:
    """What trains a federation's clients: `trainer` itself (`workers` None), or `workers` Ray tasks per round on
    the cluster this process is in, or on a local one started here and shut down when the block ends."""
    if workers is None:
        yield trainer
        return
    ray = import_ray("federated.client_workers")
    threads = torch.get_num_threads()
    with ray_cluster(ray, None, workers * threads):
        yield RayClients(ray, trainer, workers, threads)


__all__ = ["RayClients", "client_trainer"]
