"""The federation's settings, as a grid's `federated:` section gives them (validated by pydantic, one-line errors
through `bdbench.grid.load_grid`)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DirichletSplit(BaseModel):
    """Non-IID split: each class's samples shared among the clients in Dirichlet(alpha) proportions, drawn again
    until every client holds at least `min_samples` (Hsu et al. 2019; Lockdown's `distribute_data_dirichlet`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dirichlet: float = Field(gt=0)  # alpha: smaller is more skewed
    min_samples: int = Field(10, ge=1)

    def describe(self) -> str:
        return f"dirichlet(alpha={self.dirichlet:g})"


class FederatedConfig(BaseModel):
    """A federation: `clients`, of which `malicious` (a count: ids 0..m-1, Lockdown's fixed ids; or a list of ids)
    train on poisoned data; `participation` (share of clients chosen per round, at least one); `rounds` of
    `local_epochs` of SGD at `client_lr` (batch `batch_size`, momentum, weight decay); the server adds
    `server_lr` times the aggregate. `split`: `iid` (stratified equal shares) or `{dirichlet: alpha, min_samples: 10}`.
    `eval_every`: rounds between points of the per-round curve (the last round is always one);
    `checkpoint_every`: rounds between the checkpoints a killed run resumes from; `vectorised`: clients train
    as one `vmap` computation, or one after another (the same numbers); None picks vectorised on CUDA and one
    after another on the CPU, where `benchmarks/federated_vectorised.py` measured the vmapped convolutions slower;
    `client_chunk`: clients per vmap chunk (bounds memory; None: all at once); `client_workers`: each round's
    clients split into that many chunks, each trained as a Ray task (`bdbench.federated.ray_clients`; the same
    weights as in-process training; None: in this process). `client_attack`: what the malicious
    clients do besides training on their poisoned share (`bdbench.federated.attacks`: `dba`, `scaling`,
    `neurotoxin`, or `{name: ..., <params>}`); None: plain data poisoning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: int = Field(10, ge=2)
    malicious: int | list[int] = 0
    participation: float = Field(1.0, gt=0, le=1)
    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=2)
    client_lr: float = Field(0.1, gt=0)
    client_momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    server_lr: float = Field(1.0, gt=0)
    split: Literal["iid"] | DirichletSplit = "iid"
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    vectorised: bool | None = None
    client_chunk: int | None = Field(None, ge=1)
    client_workers: int | None = Field(None, ge=1)
    client_attack: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _malicious_ids(self) -> FederatedConfig:
        ids = self.malicious_ids
        if isinstance(self.malicious, int) and not 0 <= self.malicious <= self.clients:
            raise ValueError(f"malicious {self.malicious} is not a count of 0..{self.clients} clients")
        if len(set(ids)) != len(ids) or any(not 0 <= i < self.clients for i in ids):
            raise ValueError(f"malicious ids {self.malicious} must be distinct client ids in 0..{self.clients - 1}")
        self.client_attack_spec  # noqa: B018 - a client attack without a name is refused here
        return self

    @property
    def malicious_ids(self) -> list[int]:
        return list(range(self.malicious)) if isinstance(self.malicious, int) else list(self.malicious)

    @property
    def client_attack_spec(self) -> tuple[str, dict[str, Any]] | None:
        """The client attack as (name, parameters), or None."""
        if self.client_attack is None or isinstance(self.client_attack, str):
            return None if self.client_attack is None else (self.client_attack, {})
        params = dict(self.client_attack)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"federated.client_attack {self.client_attack} needs a 'name' (dba, scaling, neurotoxin)")
        return name, params

    @property
    def per_round(self) -> int:
        """Clients chosen each round: floor(clients * participation), at least one."""
        return max(1, math.floor(self.clients * self.participation + 1e-9))

    def split_name(self) -> str:
        return "iid" if self.split == "iid" else self.split.describe()

    def settings(self) -> dict[str, Any]:
        """The settings that shape the trained global model (what a victim key hashes): all but the bookkeeping
        ones (how often to evaluate and checkpoint, vectorised or not, chunking, Ray workers), which change no weight. Without a
        client attack the key is the one federations had before client attacks existed."""
        bookkeeping = {"eval_every", "checkpoint_every", "vectorised", "client_chunk", "client_workers"}
        return self.model_dump(mode="json", exclude=bookkeeping | ({"client_attack"} if self.client_attack is None
                                                                    else set()))


__all__ = ["DirichletSplit", "FederatedConfig"]
