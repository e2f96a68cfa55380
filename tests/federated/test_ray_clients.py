"""A federation's clients trained on Ray workers (`federated.client_workers`, `bdbench.federated.ray_clients`): the
same weights and per-round curve as training them in this process, for FedAvg with poisoning attackers, FLTrust
(whose root update stays server side) and Lockdown's masked training and gradient regrowth, on a real local Ray
cluster; the one-line errors."""

from __future__ import annotations

import sys

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.errors import ConfigError
from bdbench.federated import FederatedConfig
from bdbench.federated.clients import ClientTrainer
from bdbench.federated.ray_clients import RayClients, client_trainer
from bdbench.federated.simulation import CURVE_FIELDS, run_federation
from bdbench.models import create_model, with_normalization
from bdbench.ray_support import import_ray, ray_cluster
from bdbench.runner import run_grid

TIMED = "server_defense_s"  # the one curve field that is a wall-clock measurement


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray cluster (2 CPUs) for this module's federations, started by bdbench's own `ray_cluster`, which
    the federations then join instead of starting their own (starting one takes most of these tests' time)."""
    ray = pytest.importorskip("ray", reason="client workers need the optional extra: pip install 'bdbench[ray]'")
    # Ray runs its workers at nice 15, so on a machine busy with other jobs (the project's shared one) the client
    # tasks would wait minutes for a slice of the core; at normal priority they take their share.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_worker_niceness", "0")  # read by the raylet as it starts
        with ray_cluster(ray, None, 2):
            yield ray
    assert not ray.is_initialized()


@pytest.fixture
def calls(monkeypatch):
    """How often the round's clients went to Ray, by method."""
    counted = {"train": 0, "gradient_sums": 0}
    for name in counted:
        method = getattr(RayClients, name)

        def counting(self, *args, _method=method, _name=name, **kwargs):
            counted[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(RayClients, name, counting)
    return counted


def _federate(digits, defense: tuple[str, dict], **settings):
    attack = ATTACKS.build("badnets", {"patch_size": 2})
    attack.prepare(digits, 7, AttackWorkshop(seed=0, device=torch.device("cpu"), cache=None, dataset_key="digits"))
    torch.manual_seed(0)
    net = with_normalization(create_model("cnn-small", 10, 1, 8, width=8, norm="group"), digits.mean, digits.std)
    config = FederatedConfig(clients=5, malicious=1, rounds=3, local_epochs=1, batch_size=32, client_lr=0.05,
                             client_momentum=0.9, **settings)
    return run_federation(config, defense, digits, attack, 0.5, 7, net, 0, torch.device("cpu"))


def _same(in_process, on_ray, exact: bool) -> None:
    for (name, a), b in zip(in_process.model.state_dict().items(), on_ray.model.state_dict().values()):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-6), name
    untimed = [f for f in CURVE_FIELDS if f != TIMED]
    assert [[e[f] for f in untimed] for e in on_ray.curve] == [[e[f] for f in untimed] for e in in_process.curve]
    assert len(on_ray.curve) == 3 and on_ray.bytes_up == in_process.bytes_up


@pytest.mark.parametrize(("defense", "vectorised"), [("fedavg", False), ("fedavg", True), ("fltrust", False)])
def test_clients_on_ray_workers_train_the_in_process_weights(digits, ray_session, calls, defense, vectorised):
    """One after another (the CPU default) each client runs the same float operations in a worker as in this
    process: bit for bit. Vectorised, a chunk is one vmap computation instead of the whole round: to tolerance.
    FLTrust's own root update is server side and stays in this process."""
    server = (defense, {"root_size": 64} if defense == "fltrust" else {})
    in_process = _federate(digits, server, vectorised=vectorised)
    assert calls["train"] == 0
    on_ray = _federate(digits, server, vectorised=vectorised, client_workers=2)
    assert calls["train"] == 3  # the clients' training, once per round, each 2 Ray tasks (2 + 3 clients)
    _same(in_process, on_ray, exact=not vectorised)
    assert ray_session.is_initialized()  # a federation joins the running cluster and leaves it running


def test_lockdown_masks_and_regrowth_on_ray_workers_give_the_in_process_weights(digits, ray_session, calls):
    lockdown = ("lockdown", {"theta": 2, "alpha0": 0.5})
    in_process = _federate(digits, lockdown)
    on_ray = _federate(digits, lockdown, client_workers=3)
    assert calls["train"] == 3 and calls["gradient_sums"] == 2  # regrowth from round 2 on, its screens on Ray
    _same(in_process, on_ray, exact=True)


def test_client_workers_without_ray_is_one_line_naming_the_extra(digits, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    trainer = ClientTrainer(torch.nn.Linear(2, 2), digits.x_train, digits.y_train, torch.device("cpu"))
    refusal = r"^federated\.client_workers needs Ray: pip install 'bdbench\[ray\]'$"
    with pytest.raises(ConfigError, match=refusal), client_trainer(trainer, 2):
        pass
    with client_trainer(trainer, None) as clients:  # in this process, no Ray needed
        assert clients is trainer
    with pytest.raises(ConfigError, match=r"^--executor ray needs Ray"):
        import_ray("--executor ray")
    grid = {"name": "fed", "dataset": "digits", "model": {"name": "cnn-small", "width": 8, "norm": "group"},
            "attacks": ["none"], "federated": {"clients": 4, "rounds": 1, "client_workers": 2}}
    with pytest.raises(ConfigError, match=r"^federated\.client_workers needs Ray"):  # before any work
        run_grid(grid, out=tmp_path, progress=False)
    assert not (tmp_path / "results.sqlite").exists()
