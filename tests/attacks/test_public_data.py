"""The attacker's public data: the attacker pool split off the training set (never trained on by the
victim) and the public out-of-distribution data sets, on digits and on slices of the natural data sets."""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.attacks.public_data import (
    ATTACKER_POOL_SHARE,
    attacker_pool,
    attacker_pool_rows,
    pood_images,
    pood_spec,
    victim_rows,
)
from bdbench.data import load_dataset
from bdbench.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR10, GTSRB = SHARED_DATA / "cifar10.npz", SHARED_DATA / "gtsrb32.npz"
needs_natural_data = pytest.mark.skipif(not (CIFAR10.is_file() and GTSRB.is_file()),
                                        reason="../shared/data/cifar10.npz or gtsrb32.npz is absent")


def _slice(dataset, count):
    return dataclasses.replace(dataset, x_train=dataset.x_train[:count], y_train=dataset.y_train[:count])


@pytest.fixture(scope="module")
def cifar10_slice():
    return _slice(load_dataset("npz", path=str(CIFAR10), allow_hflip=True), 2000)


def _check_split(y):
    pool, victim = attacker_pool_rows(y), victim_rows(y)
    assert len(set(pool.tolist()) & set(victim.tolist())) == 0  # disjoint
    assert torch.equal(torch.sort(torch.cat([pool, victim])).values, torch.arange(len(y)))  # and all of it
    for label in torch.unique(y).tolist():
        members = int((y == label).sum())
        assert int((y[pool] == label).sum()) == min(members - 1, max(1, round(ATTACKER_POOL_SHARE * members)))
    assert torch.equal(attacker_pool_rows(y), pool)  # fixed: the same rows every time


def test_attacker_pool_is_a_fixed_share_of_every_class_disjoint_from_the_victims_rows(digits):
    _check_split(digits.y_train)


@needs_natural_data
def test_attacker_pool_on_a_cifar10_slice(cifar10_slice):
    _check_split(cifar10_slice.y_train)


@needs_natural_data
@pytest.mark.parametrize("name, params", [
    ("dfb", {"surrogate": {"epochs": 1, "width": 8}, "encoder_epochs": 1}),
    ("narcissus", {"pood_epochs": 1, "finetune_epochs": 1, "trigger_epochs": 1, "pood": {"name": "digits"}}),
])
def test_pool_attacks_never_hand_the_victim_an_image_of_the_attacker_pool(cifar10_slice, name, params):
    attack = ATTACKS.build(name, params)
    attack.prepare(cifar10_slice, 0, AttackWorkshop(seed=0))
    poisoned = attack.poison(cifar10_slice, 0.01, 0, torch.Generator().manual_seed(0))
    pool_x, _ = attacker_pool(cifar10_slice)
    assert len(poisoned.x) + len(pool_x) == len(cifar10_slice.x_train)
    victim_images = {bytes(image.flatten().tolist()) for image in poisoned.x[~poisoned.poison_mask]}
    victim_images |= {bytes(image.flatten().tolist()) for image in
                      cifar10_slice.x_train[victim_rows(cifar10_slice.y_train)][poisoned.poison_mask]}
    assert not any(bytes(image.flatten().tolist()) in victim_images for image in pool_x)
    assert int(poisoned.poison_mask.sum()) == round(0.01 * len(poisoned.x))


@needs_natural_data
def test_narcissus_default_pood_for_cifar10_is_gtsrb_at_cifar10s_shape(cifar10_slice, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # default pools are relative to the working directory, as grids' paths are
    spec = pood_spec(cifar10_slice, None, "narcissus")
    x, y = pood_images(cifar10_slice, spec, 0, "narcissus")
    gtsrb = load_dataset("npz", path=str(GTSRB))
    assert x.shape == (len(gtsrb.x_train), 3, 32, 32) and torch.equal(y, gtsrb.y_train)  # no class shared


def test_narcissus_pood_for_digits_is_mnist5k_without_the_target_digit(digits):
    x, y = pood_images(digits, pood_spec(digits, None, "narcissus"), 3, "narcissus")
    assert x.shape[1:] == digits.x_train.shape[1:] and x.dtype == torch.uint8
    assert 3 not in y.tolist() and len(set(y.tolist())) == 9


def test_narcissus_refuses_a_missing_or_unusable_pood_in_one_line(digits, tmp_path):
    attack = ATTACKS.build("narcissus", {"pood": {"name": "npz", "path": str(tmp_path / "absent.npz")}})
    with pytest.raises(ConfigError, match="public out-of-distribution pool .*absent.npz is missing") as info:
        attack.check(digits, 0)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no default for it: give narcissus pood"):
        ATTACKS.build("narcissus", {}).check(dataclasses.replace(digits, name="signs"), 0)
    with pytest.raises(ConfigError, match="the task's own data set"):
        pood_images(digits, {"name": "digits"}, 0, "narcissus")
