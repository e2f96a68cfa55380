"""Training killed part-way resumes from its last epoch checkpoint and ends where uninterrupted training ends."""

from __future__ import annotations

import logging

import pytest
import torch

from bdbench.experiment import run_experiment
from bdbench.grid import expand, load_grid
from bdbench.models import create_model, with_normalization
from bdbench.progress import listening
from bdbench.store import ArtifactCache, StoredCheckpoint
from bdbench.training import TrainConfig, train

CONFIG = TrainConfig(epochs=4, batch_size=64, lr=0.05)


class Killed(BaseException):
    """The process dying (a session's end, a pre-empted node): nothing catches it."""


class NoisyHook:
    """A per-batch attack hook in WaNet's and BPP's style: its draws come from the trainer's generator."""

    resumable = True

    def __call__(self, x, y, generator, index):
        return (x + 0.05 * torch.rand(x.shape, generator=generator)).clamp(0, 1), y


def _model(ds, width=8):
    torch.manual_seed(0)
    net = with_normalization(create_model("cnn-small", 10, 1, ds.image_size, width=width), ds.mean, ds.std)
    return torch.nn.Sequential(net, torch.nn.Dropout(0.3))  # draws from the global generator while training


def _train(ds, checkpoint=None, hook=None, width=8):
    return train(_model(ds, width), ds.x_train, ds.y_train, CONFIG, seed=5, crop_padding=1, hook=hook, checkpoint=checkpoint)


def _checkpoint(cache, die_after=None, settings=None):
    checkpoint = StoredCheckpoint(cache, "training", "victim", settings)
    checkpoint.every_s = 0.0
    if die_after is not None:
        save = checkpoint.save

        def save_then_die(state):
            save(state)
            if state["epochs_done"] == die_after:
                raise Killed

        checkpoint.save = save_then_die  # type: ignore[method-assign]
    return checkpoint


def _assert_same_weights(a, b):
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_training_killed_after_a_checkpoint_resumes_to_the_same_weights(digits, tmp_path, caplog):
    whole = _train(digits, hook=NoisyHook())
    cache = ArtifactCache(tmp_path)
    with pytest.raises(Killed):
        _train(digits, _checkpoint(cache, die_after=2), NoisyHook())
    assert cache.load_info("training", "victim")["epochs_done"] == 2

    resumed_checkpoint = _checkpoint(cache)
    epochs = []
    with caplog.at_level(logging.WARNING), listening(lambda what, number, total: epochs.append(number)):
        resumed = _train(digits, resumed_checkpoint, NoisyHook())
    assert epochs == [3, 4]  # only the epochs after the checkpoint ran again
    assert "training resumes from checkpoint training/victim after epoch 2 of 4" in caplog.text  # names its key
    assert resumed_checkpoint.earlier_s > 0 and resumed_checkpoint.earlier_cpu_s > 0
    _assert_same_weights(whole, resumed)


def test_a_hook_with_state_of_its_own_gets_no_checkpoint(digits, tmp_path):
    class StatefulHook(NoisyHook):
        resumable = False

    cache = ArtifactCache(tmp_path)
    _train(digits, _checkpoint(cache), StatefulHook())
    assert cache.load_info("training", "victim") is None
    _train(digits, _checkpoint(cache))  # without a hook the same training saves one
    assert cache.load_info("training", "victim")["epochs_done"] == CONFIG.epochs - 1


def test_an_unreadable_checkpoint_is_discarded_and_training_starts_over(digits, tmp_path, caplog):
    cache = ArtifactCache(tmp_path)
    cache.save_tensors("training", "victim", {"state": torch.tensor([7, 7, 7], dtype=torch.uint8)}, {"epochs_done": 2})
    epochs = []
    with caplog.at_level(logging.WARNING), listening(lambda what, number, total: epochs.append(number)):
        model = _train(digits, _checkpoint(cache))
    assert "unreadable" in caplog.text and "first epoch" in caplog.text
    assert epochs == [1, 2, 3, 4]
    _assert_same_weights(_train(digits), model)


def test_a_checkpoint_made_with_other_settings_is_not_resumed(digits, tmp_path, caplog):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(Killed):
        _train(digits, _checkpoint(cache, die_after=2, settings={"attack": {"size": 3}}))
    epochs = []
    with caplog.at_level(logging.WARNING), listening(lambda what, number, total: epochs.append(number)):
        _train(digits, _checkpoint(cache, settings={"attack": {"size": 4}}))
    assert "other settings" in caplog.text and epochs == [1, 2, 3, 4]


def test_a_checkpoint_of_another_model_is_not_loaded_and_changes_nothing(digits, tmp_path, caplog):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(Killed):
        _train(digits, _checkpoint(cache, die_after=2), width=4)
    assert cache.load_info("training", "victim")["train_s"] > 0
    epochs = []
    checkpoint = _checkpoint(cache)
    with caplog.at_level(logging.WARNING), listening(lambda what, number, total: epochs.append(number)):
        model = _train(digits, checkpoint)
    assert "checkpoint training/victim does not fit" in caplog.text and epochs == [1, 2, 3, 4]
    assert checkpoint.earlier_s == checkpoint.earlier_cpu_s == 0.0  # the other model's seconds are not this one's
    _assert_same_weights(_train(digits), model)


def test_a_killed_victim_resumes_in_the_next_run_and_its_row_matches_an_uninterrupted_one(tiny_grid, tmp_path,
                                                                                         monkeypatch):
    tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}], defenses=["none"])
    spec = expand(load_grid(tiny_grid))[0]
    device = torch.device("cpu")
    fresh = run_experiment(spec, ArtifactCache(tmp_path / "fresh"), device)

    cache = ArtifactCache(tmp_path / "killed")
    monkeypatch.setattr(StoredCheckpoint, "every_s", 0.0)
    save = StoredCheckpoint.save

    def save_then_die(self, state):
        save(self, state)
        if state["epochs_done"] == 3:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(StoredCheckpoint, "save", save_then_die)
        with pytest.raises(Killed):
            run_experiment(spec, cache, device)
    assert cache.load_info("victims", spec.victim_key) is None
    assert cache.load_info("training", spec.victim_key)["epochs_done"] == 3

    resumed = run_experiment(spec, cache, device)
    assert resumed["status"] == fresh["status"] == "ok"
    assert (resumed["clean_acc"], resumed["asr"]) == (fresh["clean_acc"], fresh["asr"])
    assert cache.load_info("training", spec.victim_key) is None  # done with once the victim is stored
    assert cache.load_tensors("victims", spec.victim_key).keys() == \
        ArtifactCache(tmp_path / "fresh").load_tensors("victims", spec.victim_key).keys()
    for name, value in cache.load_tensors("victims", spec.victim_key).items():
        assert torch.equal(value, ArtifactCache(tmp_path / "fresh").load_tensors("victims", spec.victim_key)[name]), name
