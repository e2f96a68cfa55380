"""`ray`: experiments as Ray tasks, on a cluster joined with `--ray-address HOST:PORT` or on a
local one started for the run (`--workers` CPUs' worth of experiments) and shut down after it.

Each task asks for `threads` CPUs and, where the cluster has GPUs, `gpus / workers` of a GPU
(capped at one), so that several small experiments share a GPU. Rows come back to the driver,
which alone writes the results database. Workers need not see the output folder: the victim
stage runs through Ray's object store. A group's lead receives the artifacts the driver already
holds for it (its victim, the attack's learned triggers), and returns what it trained; the
driver stores that under OUT/cache and sends it on to the lead's followers. Every node needs
bdbench installed (same version) in the Python environment Ray runs, and with it the plugins the
grid uses: installed plugins register themselves there, and each task imports the grid's
`plugins:` modules before it runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Generator, Sequence

import torch

from bdbench.attacks.workshop import dataset_key
from bdbench.executors.base import EXECUTORS, Resources, lost_row, run_staged
from bdbench.experiment import run_experiment
from bdbench.grid import ExperimentSpec
from bdbench.plugins import import_modules
from bdbench.ray_support import import_ray, ray_cluster
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache, MemoryCache

Artifacts = dict[tuple[str, str], tuple[dict[str, torch.Tensor], dict[str, Any]]]


def _ray_task(spec: ExperimentSpec, artifacts: Artifacts, threads: int) -> tuple[dict, Artifacts, str | None]:
    """One experiment inside a Ray worker: its row, the artifacts it made, and its traceback if it failed."""
    import ray

    import_modules(spec.plugins, where="in a Ray worker")
    torch.set_num_threads(threads)
    device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
    cache = MemoryCache(artifacts)
    with tempfile.TemporaryDirectory() as logs:
        row = run_experiment(spec, cache, device, log_dir=Path(logs))
        failure = Path(logs) / f"{spec.experiment_id}.log"
        traceback = failure.read_text() if failure.is_file() else None
    return row, cache.produced, traceback


def stored_artifacts(cache: ArtifactCache, spec: ExperimentSpec) -> Artifacts:
    """What the output folder already holds for a spec: its victim and the attack's learned tensors."""
    wanted = [("victims", spec.victim_key)]
    # Attack artifacts are keyed by the workshop's own description; pick them by seed and data set.
    attack_seed, dataset_keys = derive_seed(spec.seed, "attack"), {dataset_key(spec.dataset), spec.dataset.model_dump_json()}
    for key in cache.keys("attacks"):
        info = cache.load_info("attacks", key) or {}
        if info.get("seed") == attack_seed and info.get("dataset") in dataset_keys:
            wanted.append(("attacks", key))
    found: Artifacts = {}
    for kind, key in wanted:
        tensors, stored = cache.load_tensors(kind, key), cache.load_info(kind, key)
        if tensors is not None and stored is not None:
            found[(kind, key)] = (tensors, stored)
    return found


@EXECUTORS.register("ray")
def run_ray(specs: Sequence[ExperimentSpec], out: Path, resources: Resources) -> Generator[dict, None, None]:
    """Ray tasks on a cluster (or a local one); a victim's experiments start after it is trained."""
    ray = import_ray("--executor ray")
    with ray_cluster(ray, resources.ray_address, resources.workers * resources.threads_per_experiment):
        threads = resources.threads_per_experiment
        gpus = ray.cluster_resources().get("GPU", 0.0)
        task = ray.remote(_ray_task).options(num_cpus=threads, num_gpus=min(1.0, gpus / resources.workers) if gpus else 0,
                                             max_retries=1)
        cache = ArtifactCache(out / "cache")
        sent: dict[Any, tuple[ExperimentSpec, Artifacts]] = {}

        # What a lead hands its followers: the artifacts as a dict (to merge) and as one object
        # in Ray's store (so each follower's task refers to it instead of copying it).
        def submit(spec: ExperimentSpec, shared: tuple[Artifacts, Any] | None) -> Any:
            artifacts, artifacts_ref = shared or _put(stored_artifacts(cache, spec))
            ref = task.remote(spec, artifacts_ref, threads)
            sent[ref] = (spec, artifacts)
            return ref

        def _put(artifacts: Artifacts) -> tuple[Artifacts, Any]:
            return artifacts, ray.put(artifacts)

        def finished(refs: list[Any]) -> list[Any]:
            return ray.wait(refs, num_returns=1)[0]

        def collect(ref: Any) -> tuple[dict, tuple[Artifacts, Any]]:
            spec, artifacts = sent.pop(ref)
            try:
                row, produced, traceback = ray.get(ref)
            except ray.exceptions.RayError as exc:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                return lost_row(spec, f"Ray lost this experiment: {type(exc).__name__}: {message}"), _put(artifacts)
            for (kind, key), (tensors, info) in produced.items():
                cache.save_tensors(kind, key, tensors, info)
            if traceback is not None:
                (out / "logs").mkdir(parents=True, exist_ok=True)
                (out / "logs" / f"{spec.experiment_id}.log").write_text(traceback)
            return row, _put({**artifacts, **produced})

        yield from run_staged(specs, submit, finished, collect, max_in_flight=resources.workers)
