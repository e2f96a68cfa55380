"""Ray, the optional extra, for the two parts of bdbench that use it: the `ray` executor (experiments as Ray tasks)
and federations whose clients train on Ray workers (`federated.client_workers`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from bdbench.errors import ConfigError


def import_ray(what: str) -> Any:
    """The `ray` module, or a one-line `ConfigError` naming what needs it and how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"{what} needs Ray: pip install 'bdbench[ray]'") from None
    return ray


@contextmanager
def ray_cluster(ray: Any, address: str | None, num_cpus: int) -> Iterator[None]:
    """Ray as this process finds it, or joined or started for the block. Already initialised (the caller's own
    `ray.init()`, or this code running inside a Ray task, as a federation does under `--executor ray`), it is used
    as it is and left running. Otherwise the cluster at `address` is joined, or a local one of `num_cpus` CPUs is
    started, and shut down when the block ends."""
    if ray.is_initialized():
        yield
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address} ({exc}); "
                              "start it with `ray start --head` or check the address") from None
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


__all__ = ["import_ray", "ray_cluster"]
