"""A federation's checkpoints are victims' (`store.StoredCheckpoint`): one made with other settings, of an older
format, unreadable or of another federation is discarded with a warning and the federation runs from its first
round; a resumed federated victim's recorded training time covers the rounds before the kill."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from bdbench.experiment import run_experiment
from bdbench.federated import FederatedConfig
from bdbench.federated.simulation import Federation, run_federation
from bdbench.grid import ExperimentSpec, expand, load_grid
from bdbench.models import create_model, with_normalization
from bdbench.store import ArtifactCache, StoredCheckpoint

GRID = {"dataset": "digits", "model": {"name": "cnn-small", "width": 8, "norm": "group"},
        "attacks": [{"name": "badnets", "patch_size": 2}], "poison_rates": [0.5], "target_label": 7,
        "federated": {"clients": 6, "malicious": 2, "rounds": 3, "local_epochs": 1, "batch_size": 32,
                      "client_lr": 0.05, "checkpoint_every": 1, "server_defenses": ["fedavg"]}}
CONFIG = FederatedConfig(clients=4, rounds=3, local_epochs=1, batch_size=32, client_lr=0.05, checkpoint_every=1)
SETTINGS = {"server_defense": {"name": "fedavg"}}


class Killed(BaseException):
    """The process dying (a session's end, a pre-empted node): nothing catches it."""


def _rounds_run(monkeypatch, burn_cpu_s: float = 0.0) -> list[int]:
    """The rounds federations run from now on, each first spending `burn_cpu_s` seconds of CPU (a slow round)."""
    rounds: list[int] = []
    run_round = Federation.run_round

    def counted(self, *args, **kwargs):
        rounds.append(self.round + 1)
        began = time.process_time()
        while time.process_time() - began < burn_cpu_s:
            pass
        return run_round(self, *args, **kwargs)

    monkeypatch.setattr(Federation, "run_round", counted)
    return rounds


def _killed_after_round_2(spec: ExperimentSpec, cache: ArtifactCache, monkeypatch, burn_cpu_s: float = 0.0) -> None:
    """`run_experiment` killed right after the federation saved its round-2 checkpoint."""
    save = ArtifactCache.save_tensors

    def save_then_die(self, kind, key, tensors, info):
        save(self, kind, key, tensors, info)
        if kind == "federated" and info.get("round") == 2:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(ArtifactCache, "save_tensors", save_then_die)
        rounds = _rounds_run(patch, burn_cpu_s)
        with pytest.raises(Killed):
            run_experiment(spec, cache, torch.device("cpu"))
    assert rounds == [1, 2]
    assert cache.load_info("victims", spec.victim_key) is None
    assert cache.load_info("federated", spec.victim_key)["round"] == 2


def test_a_federated_checkpoint_made_with_other_settings_is_not_resumed(tmp_path, monkeypatch, caplog):
    spec = expand(load_grid(GRID))[0]
    cache = ArtifactCache(tmp_path)
    _killed_after_round_2(spec, cache, monkeypatch)
    settings = ExperimentSpec.settings

    def changed(self, victim_only=False):  # as when a server defense's default changed since the kill
        return {**settings(self, victim_only), "server_defense": {"name": "fedavg", "revision": 2}}

    monkeypatch.setattr(ExperimentSpec, "settings", changed)
    rounds = _rounds_run(monkeypatch)
    with caplog.at_level(logging.WARNING):
        row = run_experiment(spec, cache, torch.device("cpu"))
    assert row["status"] == "ok" and rounds == [1, 2, 3]
    assert "other settings; running the federation from its first round" in caplog.text
    assert cache.load_info("federated", spec.victim_key) is None  # done with once the victim is stored


def test_a_resumed_federated_victims_training_time_covers_the_rounds_before_the_kill(tmp_path, monkeypatch, caplog):
    spec = expand(load_grid(GRID))[0]
    cache = ArtifactCache(tmp_path)
    _killed_after_round_2(spec, cache, monkeypatch, burn_cpu_s=1.5)  # rounds 1 and 2 take 3 CPU seconds
    rounds = _rounds_run(monkeypatch)
    with caplog.at_level(logging.WARNING):
        row = run_experiment(spec, cache, torch.device("cpu"))
    assert row["status"] == "ok" and rounds == [3]
    assert row["victim_train_s"] >= 3.0 and row["victim_train_cpu_s"] >= 3.0
    assert f"federation resumes after round 2 of 3 from checkpoint federated/{spec.victim_key}" in caplog.text
    assert cache.load_info("victims", spec.victim_key)["train_cpu_s"] == row["victim_train_cpu_s"]


def test_a_corrupt_federated_victim_resumes_from_its_checkpoint(tmp_path, monkeypatch, caplog):
    """The rounds a checkpoint holds are kept when the stored global model is unreadable (a kill between storing it
    and removing the checkpoint, then a damaged file): the federation resumes, as a centralized victim's training
    does, and the checkpoint's own settings decide whether it fits."""
    spec = expand(load_grid(GRID))[0]
    cache = ArtifactCache(tmp_path)
    _killed_after_round_2(spec, cache, monkeypatch)
    cache.save_tensors("victims", spec.victim_key, {"garbage": torch.zeros(1)}, {"settings": spec.settings(True)})
    rounds = _rounds_run(monkeypatch)
    with caplog.at_level(logging.WARNING):
        row = run_experiment(spec, cache, torch.device("cpu"))
    assert "running the federation again" in caplog.text and "federation resumes after round 2 of 3" in caplog.text
    assert row["status"] == "ok" and rounds == [3] and row["victim_cached"] is False
    assert cache.load_info("federated", spec.victim_key) is None  # done with once the victim is stored


def _template(digits, width: int = 8):
    torch.manual_seed(0)
    return with_normalization(create_model("cnn-small", 10, 1, 8, width=width, norm="group"), digits.mean, digits.std)


def _federate(digits, checkpoint=None, width: int = 8, stop_after=None):
    return run_federation(CONFIG, ("fedavg", {}), digits, None, 0.0, 0, _template(digits, width), 0,
                          torch.device("cpu"), checkpoint=checkpoint, stop_after=stop_after)


class _Kept:
    """A checkpoint in memory: the last state saved."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def load(self):
        return None

    def reject(self) -> None:
        raise AssertionError("nothing was loaded")

    def save(self, state) -> None:
        self.state = state


@pytest.mark.parametrize(("left", "warning"), [
    ("unreadable", "is unreadable"),
    ("older format", "records no settings (an older format)"),
    ("another federation", "does not fit this federation (weights."),
])
def test_a_federated_checkpoint_that_cannot_be_resumed_is_discarded_and_the_federation_starts_over(
        digits, tmp_path, monkeypatch, caplog, left, warning):
    cache = ArtifactCache(tmp_path)
    seconds = {"train_s": 100.0, "train_cpu_s": 100.0}
    if left == "unreadable":
        cache.save_tensors("federated", "k", {"state": torch.tensor([7, 7, 7], dtype=torch.uint8)},
                           {"round": 2, "settings": SETTINGS, **seconds})
    elif left == "older format":  # the federation's tensors themselves, as bdbench saved them before
        kept = _Kept()
        _federate(digits, kept, stop_after=2)
        assert kept.state is not None and int(kept.state["round"]) == 2
        cache.save_tensors("federated", "k", kept.state, {"round": 2})
    else:  # a federation of a narrower model left it under the same key
        checkpoint = StoredCheckpoint(cache, "federated", "k", SETTINGS)
        _federate(digits, checkpoint, width=4, stop_after=2)
        cache.save_tensors("federated", "k", cache.load_tensors("federated", "k"),
                           {**cache.load_info("federated", "k"), **seconds})
    whole = _federate(digits)
    rounds = _rounds_run(monkeypatch)
    checkpoint = StoredCheckpoint(cache, "federated", "k", SETTINGS, "running the federation from its first round")
    with caplog.at_level(logging.WARNING):
        resumed = _federate(digits, checkpoint)
    assert warning in caplog.text and "running the federation from its first round" in caplog.text
    assert rounds == [1, 2, 3] and resumed.resumed_from == 0
    assert checkpoint.earlier_s == checkpoint.earlier_cpu_s == 0.0  # its seconds were spent on something else
    info = cache.load_info("federated", "k")  # what is there now is this federation's own round-2 checkpoint
    assert info["round"] == 2 and info["settings"] == SETTINGS and info["train_s"] < 100.0
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
